"""Tests for pamjax.workload: synthetic datasets, Workload validation and trace loading.

Statistical checks use fixed seeds, so they are deterministic; the tolerances state how far a
correct generator may drift with the given sample size (about three standard errors).
"""

from __future__ import annotations

import math
import pathlib
import tempfile
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pamjax.errors import ConfigError, TraceFormatError, UnknownNameError
from pamjax.workload import (
    DATASETS,
    DEFAULT_TRACE_ENV,
    DatasetStats,
    Workload,
    default_azure_trace_path,
    load_trace,
    save_trace,
    synthetic,
)

# Sample size and relative tolerance for mean checks: the heaviest-tailed length (WildChat
# prompts) has a coefficient of variation near 1.3, so the standard error of a 4,000-sample
# mean is ~2 %, and ±5 % is about 2.5 standard errors; with fixed seeds the test never flakes.
N_SAMPLES = 4_000
MEAN_TOL = 0.05

ONLINE = ("sharegpt", "wildchat", "humaneval")
OFFLINE = ("arxiv-sum", "write-doc")


def test_dataset_table_covers_the_spec_names():
    assert set(DATASETS) == set(ONLINE + OFFLINE)
    for name, stats in DATASETS.items():
        assert stats.name == name
        assert stats.mode == ("online" if name in ONLINE else "offline")


def test_declared_means_match_pam_spec():
    online = [DATASETS[n] for n in ONLINE]
    assert sum(s.prompt_mean for s in online) / 3 == pytest.approx(183)
    assert sum(s.output_mean for s in online) / 3 == pytest.approx(299)
    assert DATASETS["sharegpt"].mean_context == pytest.approx(534)
    assert DATASETS["wildchat"].mean_context == pytest.approx(738)
    for name in OFFLINE:
        s = DATASETS[name]
        assert s.prompt_min + s.output_min >= 1500
        assert s.prompt_max + s.output_max <= 8000


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_synthetic_is_deterministic_for_a_seed(name):
    a = synthetic(name, 500, seed=7, rate_per_s=3.0)
    b = synthetic(name, 500, seed=7, rate_per_s=3.0)
    for field in ("arrival_s", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.name == name


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_different_seeds_differ(name):
    a = synthetic(name, 500, seed=1, rate_per_s=3.0)
    b = synthetic(name, 500, seed=2, rate_per_s=3.0)
    assert not np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.output_tokens, b.output_tokens)
    assert not np.array_equal(a.arrival_s, b.arrival_s)


def test_lengths_do_not_depend_on_the_arrival_rate():
    closed = synthetic("sharegpt", 300, seed=3)
    open_loop = synthetic("sharegpt", 300, seed=3, rate_per_s=10.0)
    np.testing.assert_array_equal(closed.prompt_tokens, open_loop.prompt_tokens)
    np.testing.assert_array_equal(closed.output_tokens, open_loop.output_tokens)


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_sample_means_match_targets(name):
    stats = DATASETS[name]
    w = synthetic(name, N_SAMPLES, seed=0)
    assert w.mean_prompt == pytest.approx(stats.prompt_mean, rel=MEAN_TOL)
    assert w.mean_output == pytest.approx(stats.output_mean, rel=MEAN_TOL)


def test_sample_means_match_the_online_aggregates():
    ws = {n: synthetic(n, N_SAMPLES, seed=0) for n in ONLINE}
    assert np.mean([w.mean_prompt for w in ws.values()]) == pytest.approx(183, rel=MEAN_TOL)
    assert np.mean([w.mean_output for w in ws.values()]) == pytest.approx(299, rel=MEAN_TOL)
    for name, target in (("sharegpt", 534), ("wildchat", 738)):
        w = ws[name]
        assert w.mean_prompt + w.mean_output == pytest.approx(target, rel=MEAN_TOL)


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_lengths_within_bounds(name):
    stats = DATASETS[name]
    w = synthetic(name, N_SAMPLES, seed=5)
    assert w.prompt_tokens.dtype == np.int32 and w.output_tokens.dtype == np.int32
    assert stats.prompt_min <= w.prompt_tokens.min() <= w.prompt_tokens.max() <= stats.prompt_max
    assert stats.output_min <= w.output_tokens.min() <= w.output_tokens.max() <= stats.output_max
    # Heavy tails: the longest prompt is well above the mean (not a narrow bell).
    assert w.prompt_tokens.max() > 1.5 * stats.prompt_mean
    if stats.mode == "offline":
        context = w.prompt_tokens.astype(np.int64) + w.output_tokens
        assert context.min() >= 1500 and context.max() <= 8000


def test_poisson_arrivals_match_the_rate():
    rate = 20.0
    w = synthetic("wildchat", N_SAMPLES, seed=11, rate_per_s=rate)
    assert w.arrival_s.dtype == np.float64
    assert w.arrival_s[0] > 0
    gaps = np.diff(np.concatenate([[0.0], w.arrival_s]))
    assert (gaps >= 0).all()
    assert w.num_requests / w.arrival_s[-1] == pytest.approx(rate, rel=MEAN_TOL)
    # Exponential gaps have a coefficient of variation of 1 (a regular clock would have 0).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("name", ("humaneval", "arxiv-sum"))
def test_closed_loop_arrivals_are_all_zero(name):
    w = synthetic(name, 100, seed=0)
    assert w.arrival_s.dtype == np.float64
    assert (w.arrival_s == 0).all()


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UnknownNameError) as info:
        synthetic("alpaca", 10, seed=0)
    assert info.value.kind == "workload" and info.value.name == "alpaca"
    assert set(info.value.choices) == set(DATASETS)
    assert "sharegpt" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_requests": 0}, "num_requests"),
        ({"num_requests": -3}, "num_requests"),
        ({"num_requests": 2.5}, "num_requests"),
        ({"rate_per_s": 0.0}, "rate_per_s"),
        ({"rate_per_s": -1.0}, "rate_per_s"),
        ({"rate_per_s": math.nan}, "rate_per_s"),
        ({"rate_per_s": math.inf}, "rate_per_s"),
        ({"seed": -1}, "seed"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, field):
    args = {"num_requests": 10, "seed": 0, "rate_per_s": None} | kwargs
    num = args.pop("num_requests")
    with pytest.raises(ConfigError) as info:
        synthetic("sharegpt", num, **args)
    assert info.value.field == field


def test_workload_properties_and_head():
    w = Workload(np.array([0.0, 1.0, 1.0, 2.5]), [10, 20, 30, 40], [5, 6, 7, 100], "demo")
    assert w.num_requests == 4
    assert w.mean_prompt == pytest.approx(25.0)
    assert w.mean_output == pytest.approx(29.5)
    assert w.max_context == 140
    assert w.prompt_tokens.dtype == np.int32 and w.arrival_s.dtype == np.float64
    h = w.head(2)
    assert h.num_requests == 2 and h.name == "demo"
    np.testing.assert_array_equal(h.prompt_tokens, [10, 20])
    assert w.head(99).num_requests == 4
    with pytest.raises(ConfigError):
        w.head(0)
    assert "num_requests=4" in repr(w)


def test_workload_arrays_are_copied_and_read_only():
    prompt = np.array([3, 4])
    w = Workload(np.zeros(2), prompt, np.array([1, 1]))
    prompt[0] = 99
    assert w.prompt_tokens[0] == 3
    with pytest.raises(ValueError):
        w.prompt_tokens[0] = 5


@pytest.mark.parametrize(
    "arrival, prompt, output, field",
    [
        ([0.0, 1.0], [1, 2, 3], [1, 2], "Workload.prompt_tokens"),
        ([0.0, 1.0], [1, 2], [1], "Workload.output_tokens"),
        ([], [], [], "Workload.arrival_s"),
        ([0.0, 1.0], [1, 0], [1, 1], "Workload.prompt_tokens"),
        ([0.0, 1.0], [1, 1], [-2, 1], "Workload.output_tokens"),
        ([0.0, 1.0], [1.5, 1], [1, 1], "Workload.prompt_tokens"),
        ([2.0, 1.0], [1, 1], [1, 1], "Workload.arrival_s"),
        ([-1.0, 1.0], [1, 1], [1, 1], "Workload.arrival_s"),
        ([0.0, math.nan], [1, 1], [1, 1], "Workload.arrival_s"),
        ([[0.0, 1.0]], [1, 1], [1, 1], "Workload.arrival_s"),
        ([0.0], [2**30], [2**30], "Workload.prompt_tokens+output_tokens"),
    ],
)
def test_workload_validation(arrival, prompt, output, field):
    with pytest.raises(ConfigError) as info:
        Workload(np.asarray(arrival, dtype=np.float64), np.asarray(prompt), np.asarray(output))
    assert info.value.field == field


def test_dataset_stats_validation():
    with pytest.raises(ConfigError):
        DatasetStats("x", "online", 5000, 1.0, 1, 100, 10, 1.0, 1, 100, "mean above max")
    with pytest.raises(ConfigError):
        DatasetStats("x", "batch", 50, 1.0, 1, 100, 10, 1.0, 1, 100, "bad mode")
    with pytest.raises(ConfigError):
        DatasetStats("x", "online", 50, 0.0, 1, 100, 10, 1.0, 1, 100, "zero sigma")


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
