"""Tests for pamjax.traces: the plain and Azure CSV formats, round trips and bad files."""

from __future__ import annotations

import pathlib
import tempfile
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pamjax.errors import ConfigError, TraceFormatError
from pamjax.traces import DEFAULT_TRACE_ENV, default_azure_trace_path, load_trace, save_trace
from pamjax.workload import Workload, synthetic


def test_plain_csv_round_trip(tmp_path):
    w = synthetic("sharegpt", 1_000, seed=4, rate_per_s=7.3)
    path = save_trace(w, tmp_path / "sharegpt.csv")
    back = load_trace(path)
    assert back.name == "sharegpt"
    np.testing.assert_array_equal(back.arrival_s, w.arrival_s)
    np.testing.assert_array_equal(back.prompt_tokens, w.prompt_tokens)
    np.testing.assert_array_equal(back.output_tokens, w.output_tokens)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1e7, allow_nan=False, allow_infinity=False),
            # Any split of the largest context the engine's int32 positions allow.
            st.integers(1, 2**30),
            st.integers(1, 2**30 - 1),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_round_trip_is_exact_for_any_valid_workload(rows):
    rows.sort(key=lambda r: r[0])
    w = Workload(*(np.array(col) for col in zip(*rows, strict=True)), "prop")
    with tempfile.TemporaryDirectory() as tmp:
        back = load_trace(save_trace(w, pathlib.Path(tmp) / "prop.csv"))
    np.testing.assert_array_equal(back.arrival_s, w.arrival_s)
    np.testing.assert_array_equal(back.prompt_tokens, w.prompt_tokens)
    np.testing.assert_array_equal(back.output_tokens, w.output_tokens)


def test_load_options_time_scale_and_max_requests(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0.5,10,2\n1.0,20,3\n4.0,30,4\n")
    w = load_trace(path, time_scale=0.5, max_requests=2)
    np.testing.assert_allclose(w.arrival_s, [0.25, 0.5])
    np.testing.assert_array_equal(w.prompt_tokens, [10, 20])
    with pytest.raises(ConfigError) as info:
        load_trace(path, time_scale=0.0)
    assert info.value.field == "time_scale"
    with pytest.raises(ConfigError) as info:
        load_trace(path, max_requests=0)
    assert info.value.field == "max_requests"


def test_plain_format_is_flexible_about_layout(tmp_path):
    path = tmp_path / "t.csv"
    # BOM, CRLF, reordered and extra columns, case and blank lines are all tolerated.
    path.write_bytes(
        b"\xef\xbb\xbfPrompt_Tokens, note ,ARRIVAL_S,output_tokens\r\n"
        b"10,a,0.0,2\r\n\r\n20,b,1.5,3.0\r\n"
    )
    w = load_trace(path)
    np.testing.assert_array_equal(w.arrival_s, [0.0, 1.5])
    np.testing.assert_array_equal(w.prompt_tokens, [10, 20])
    np.testing.assert_array_equal(w.output_tokens, [2, 3])


def test_azure_format_parses_seven_digit_fractions(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_bytes(
        b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        b"2023-11-16 23:59:59.9999999,374,44\r\n"
        b"2023-11-17 00:00:00.0000001,396,109\r\n"
        b"2023-11-17 00:00:01.5,879,55"
    )
    w = load_trace(path)
    assert w.name == "azure"
    np.testing.assert_allclose(w.arrival_s, [0.0, 2e-7, 1.5000001], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(w.prompt_tokens, [374, 396, 879])
    np.testing.assert_array_equal(w.output_tokens, [44, 109, 55])


def test_azure_format_honours_utc_offsets(tmp_path):
    path = tmp_path / "azure2024.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,100,10\n"
        "2024-05-10 02:00:01.009930+02:00,100,10\n"
        "2024-05-10T00:00:02Z,100,10\n"
    )
    np.testing.assert_allclose(load_trace(path).arrival_s, [0.0, 1.0, 1.99007], atol=1e-9)


def test_default_trace_path_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DEFAULT_TRACE_ENV, str(tmp_path / "mine.csv"))
    assert default_azure_trace_path() == tmp_path / "mine.csv"
    monkeypatch.delenv(DEFAULT_TRACE_ENV)
    path = default_azure_trace_path()
    assert path is None or path.name == "azure_llm_2023_conv.csv"


def test_real_azure_trace_matches_its_readme():
    path = default_azure_trace_path()
    if path is None or not path.is_file():
        where = f"at {path}" if path is not None else "beside the repository"
        pytest.skip(
            f"Azure trace not found {where}: set ${DEFAULT_TRACE_ENV} to a copy, or place it at "
            "../shared/traces/azure_llm_2023_conv.csv relative to the repository root"
        )
    start = time.perf_counter()
    w = load_trace(path)
    elapsed = time.perf_counter() - start
    # Target is < 1 s (about 0.1 s on a laptop-class core); the bound leaves room for slow CI.
    assert elapsed < 5.0
    assert w.num_requests == 19_366
    assert w.arrival_s[0] == 0.0
    assert w.mean_prompt == pytest.approx(1155, abs=1)
    assert w.mean_output == pytest.approx(211, abs=1)
    assert int(np.median(w.prompt_tokens)) == 1020 and int(w.prompt_tokens.max()) == 14050
    assert int(np.median(w.output_tokens)) == 129 and int(w.output_tokens.max()) == 1000
    # The README's "about 5.4 requests/s" is 19,366 over the hour; first to last request spans
    # 3,502 s, which gives 5.53/s.
    assert w.num_requests / 3600 == pytest.approx(5.4, abs=0.05)
    assert w.num_requests / w.arrival_s[-1] == pytest.approx(5.4, abs=0.2)


PLAIN = b"arrival_s,prompt_tokens,output_tokens\n"
AZURE = b"TIMESTAMP,ContextTokens,GeneratedTokens\n"

# (case, file bytes or None for "does not exist", expected line, text the reason must contain)
BAD_FILES = [
    ("missing", None, 0, "not found"),
    ("empty", b"", 0, "empty"),
    ("blank", b"\n \r\n\n", 0, "empty"),
    ("header_only", PLAIN, 0, "no data rows"),
    ("unknown_header", b"foo,bar,baz\n1,2,3\n", 1, "unknown header"),
    ("no_header", b"0.0,10,5\n1.0,10,5\n", 1, "no header"),
    ("missing_column", b"arrival_s,prompt_tokens\n0.0,10\n", 1, "output_tokens"),
    ("azure_missing_column", b"TIMESTAMP,ContextTokens\n", 1, "GeneratedTokens"),
    ("duplicate_column", b"arrival_s,prompt_tokens,prompt_tokens\n", 1, "repeats"),
    ("non_numeric", PLAIN + b"0.0,10,5\n1.0,ten,5\n", 3, "not a number"),
    ("fractional_tokens", PLAIN + b"0.0,10.5,5\n", 2, "whole number"),
    ("negative_tokens", PLAIN + b"0.0,10,5\n1.0,10,-5\n", 3, ">= 1"),
    ("zero_tokens", PLAIN + b"0.0,0,5\n", 2, ">= 1"),
    ("negative_arrival", PLAIN + b"-1.0,10,5\n", 2, "negative"),
    ("nan_arrival", PLAIN + b"0.0,10,5\nnan,10,5\n", 3, "not finite"),
    ("inf_arrival", PLAIN + b"inf,10,5\n", 2, "not finite"),
    ("backwards", PLAIN + b"0.0,10,5\n2.0,10,5\n1.0,10,5\n", 4, "back in time"),
    ("truncated_last_line", PLAIN + b"0.0,10,5\n1.0,10,5\n2.0,1", 4, "truncated"),
    ("empty_field", PLAIN + b"0.0,10,\n", 2, "empty"),
    ("too_many_fields", PLAIN + b"0.0,10,5,7\n", 2, "fields"),
    ("inf_tokens", PLAIN + b"0.0,10,inf\n", 2, "'inf' is not finite"),
    ("nan_tokens", PLAIN + b"0.0,nan,5\n", 2, "'nan' is not finite"),
    ("context_over_int32", PLAIN + b"0.0,1073741824,1073741824\n", 2, "exceeds 2147483647"),
    ("gzip", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff", 0, "gzip-compressed"),
    ("binary", PLAIN + b"0.0,10,5\n\x89PNG\x00\x00\x1a\n", 3, "binary"),
    ("undecodable", PLAIN + b"0.0,10,5\n\n\xff\xfe,10,5\n", 4, "UTF-8"),
    (
        "azure_bad_timestamp",
        AZURE + b"2023-11-16 18:15:46.68,10,5\nyesterday,10,5\n",
        3,
        "date-time",
    ),
    ("azure_bad_date", AZURE + b"2023-02-30 18:15:46.68,10,5\n", 2, "day is out of range"),
    ("azure_bad_time", AZURE + b"2023-11-16 25:15:46.68,10,5\n", 2, "time of day"),
    (
        "azure_backwards",
        AZURE + b"2023-11-16 18:15:46.6805900,10,5\n2023-11-16 18:15:46.6805899,10,5\n",
        3,
        "back in time",
    ),
    ("azure_zero_tokens", AZURE + b"2023-11-16 18:15:46.6805900,374,0\n", 2, "GeneratedTokens"),
]


@pytest.mark.parametrize("case, content, line, reason", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_trace_files_are_refused(tmp_path, case, content, line, reason):
    path = tmp_path / f"{case}.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TraceFormatError) as info:
        load_trace(path)
    err = info.value
    message = str(err)
    assert path.name in message
    assert err.line == line
    if line:
        assert f"{path.name}:{line}:" in message
    assert reason.lower() in message.lower()


def test_directory_is_refused(tmp_path):
    with pytest.raises(TraceFormatError, match="directory"):
        load_trace(tmp_path)


def test_max_requests_stops_before_later_errors(tmp_path):
    path = tmp_path / "partial.csv"
    path.write_bytes(PLAIN + b"0.0,10,5\n1.0,10,5\n1.0,oops,5\n")
    assert load_trace(path, max_requests=2).num_requests == 2
