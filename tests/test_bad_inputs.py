"""Bad input never gives a traceback: one ``pamjax: error:`` line on stderr, exit status 2.

Every case runs the CLI in-process (``pamjax.cli.main``) on a file of the corpus in
``tests/bad_inputs/`` or on a bad flag value, and checks the line names the input (file and
line, or flag) and the problem. None reaches a simulation, so the module runs in seconds.
The last tests check the library raises the specific exception type with its attributes.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from pamjax import config_files as cf
from pamjax.cli import build_parser, main
from pamjax.errors import CapacityError, ConfigError, TraceFormatError, UnknownNameError
from pamjax.hardware import get_platform
from pamjax.models import get_model
from pamjax.systems import make_params
from pamjax.traces import load_trace
from pamjax.workload import synthetic

CORPUS = pathlib.Path(__file__).resolve().parent / "bad_inputs"


def _has_flag(command: str, flag: str) -> bool:
    commands = build_parser()._subparsers._group_actions[0].choices
    return command in commands and flag in commands[command].format_help()


# --hardware / --model-file / the bounds command arrive with the CLI's config-file support;
# these cases switch on by themselves when they do.
needs_config_flags = pytest.mark.skipif(not _has_flag("simulate", "--hardware"),
                                        reason="pamjax simulate has no --hardware yet")
needs_bounds = pytest.mark.skipif(not _has_flag("bounds", "--hardware"),
                                  reason="pamjax bounds with --hardware does not exist yet")


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors exit from inside parse_args
        rc = exc.code
    return rc, capsys.readouterr().err


def assert_one_error_line(rc, err, *needles):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pamjax: error:"), lines[0]
    assert rc == 2
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


# -- traces -----------------------------------------------------------------------------------

TRACES = [
    # (corpus file, where, what is wrong)
    ("trace_empty.csv", "trace_empty.csv", "empty file"),
    ("trace_blank_lines.csv", "trace_blank_lines.csv", "empty file"),
    ("trace_header_only.csv", "trace_header_only.csv", "no data rows"),
    ("trace_truncated.csv", "trace_truncated.csv:3", "truncated row"),
    ("trace_truncated_field.csv", "trace_truncated_field.csv:3", "output_tokens is empty"),
    ("trace_random_bytes.csv", "trace_random_bytes.csv:1", "binary content"),
    ("trace.csv.gz", "trace.csv.gz", "gzip-compressed"),
    ("trace_image.png", "trace_image.png:3", "binary content"),
    ("trace_latin1.csv", "trace_latin1.csv:2", "not UTF-8"),
    ("trace_non_numeric.csv", "trace_non_numeric.csv:3", "'twelve' is not a number"),
    ("trace_negative_arrival.csv", "trace_negative_arrival.csv:2", "is negative"),
    ("trace_negative_tokens.csv", "trace_negative_tokens.csv:3", "got -3"),
    ("trace_nan_arrival.csv", "trace_nan_arrival.csv:3", "'nan' is not finite"),
    ("trace_inf_tokens.csv", "trace_inf_tokens.csv:2", "'inf' is not finite"),
    ("trace_zero_output.csv", "trace_zero_output.csv:3", "output_tokens must be >= 1"),
    ("trace_fractional_tokens.csv", "trace_fractional_tokens.csv:2", "not a whole number"),
    ("trace_too_many_columns.csv", "trace_too_many_columns.csv:2", "4 fields"),
    ("trace_missing_column.csv", "trace_missing_column.csv:1", "lacks column(s) output_tokens"),
    ("trace_unsorted.csv", "trace_unsorted.csv:4", "goes back in time"),
    ("trace_unknown_header.csv", "trace_unknown_header.csv:1", "unknown header"),
    ("trace_no_header.csv", "trace_no_header.csv:1", "no header row"),
    ("trace_huge_context.csv", "trace_huge_context.csv:2", "exceeds 2147483647"),
    ("trace_bad_month.csv", "trace_bad_month.csv:3", "month must be in 1..12"),
    ("trace_time_goes_back.csv", "trace_time_goes_back.csv:3", "goes back in time"),
    ("no_such_trace.csv", "no_such_trace.csv", "file not found"),
    (".", "bad_inputs", "is a directory"),
]


@pytest.mark.parametrize("name,where,what", TRACES)
def test_bad_trace_for_simulate(capsys, name, where, what):
    rc, err = run_cli(["simulate", "--system", "pam", "--model", "llama3-8b",
                       "--trace", CORPUS / name], capsys)
    assert_one_error_line(rc, err, where, what)


@pytest.mark.parametrize("name,where,what", TRACES[3:6])
def test_bad_trace_for_compare(capsys, tmp_path, name, where, what):
    rc, err = run_cli(["compare", "--model", "llama3-8b", "--trace", CORPUS / name,
                       "--quiet", "--out", tmp_path], capsys)
    assert_one_error_line(rc, err, where, what)


# -- names and flag values --------------------------------------------------------------------

UNKNOWN_NAMES = [
    (["simulate", "--system", "nope"], "--system", "nope"),
    (["simulate", "--system", "pam", "--model", "gpt-5"], "--model", "gpt-5"),
    (["simulate", "--system", "pam", "--workload", "imagenet"], "--workload", "imagenet"),
    (["compare", "--systems", "pam,nope"], "--systems", "nope"),
    (["compare", "--model", "gpt-5"], "--model", "gpt-5"),
    (["reproduce", "everything"], "study", "everything"),
    (["frobnicate"], "command", "frobnicate"),
]


@pytest.mark.parametrize("argv,what,name", UNKNOWN_NAMES)
def test_unknown_names(capsys, argv, what, name):
    rc, err = run_cli(argv, capsys)
    assert_one_error_line(rc, err, name)
    assert what in err or "invalid choice" in err


SIMULATE_FLAGS = ["--batch", "--slo-ms", "--page-size", "--rate", "--max-requests"]
COMPARE_FLAGS = ["--steps", "--slo-ms", "--max-requests"]
BAD_NUMBERS = ["-1", "0", "nan", "inf", "abc"]


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("flag", SIMULATE_FLAGS)
def test_bad_simulate_numbers(capsys, flag, value):
    rc, err = run_cli(["simulate", "--system", "pam", flag, value], capsys)
    assert_one_error_line(rc, err, f"argument {flag}", value)


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("flag", COMPARE_FLAGS)
def test_bad_compare_numbers(capsys, flag, value):
    rc, err = run_cli(["compare", flag, value], capsys)
    assert_one_error_line(rc, err, f"argument {flag}", value)


@pytest.mark.parametrize("value", ["0", "8,-1", "nan", "4,x", ","])
def test_bad_batch_lists(capsys, value):
    rc, err = run_cli(["compare", "--batches", value], capsys)
    assert_one_error_line(rc, err, "argument --batches", value)


def test_rate_with_a_trace_is_refused(capsys, tmp_path):
    trace = tmp_path / "good.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,12,4\n")
    rc, err = run_cli(["simulate", "--system", "pam", "--trace", trace, "--rate", "2"], capsys)
    assert_one_error_line(rc, err, "--rate=2.0", "a trace has its own arrival times")


def test_negative_seed_for_a_synthetic_workload(capsys):
    rc, err = run_cli(["simulate", "--system", "pam", "--model", "llama3-8b", "--seed", "-1"],
                      capsys)
    assert_one_error_line(rc, err, "seed=-1", "non-negative")


def test_event_leap_for_a_system_it_does_not_reproduce(capsys):
    rc, err = run_cli(["simulate", "--system", "pam", "--model", "llama3-8b", "--max-requests",
                       "4", "--engine", "leap"], capsys)
    assert_one_error_line(rc, err, "engine='leap'", "does not apply to pam")


# -- recorded scores --------------------------------------------------------------------------

SYNTHETIC = ["simulate", "--system", "pam", "--model", "llama3-8b", "--workload", "humaneval",
             "--max-requests", "2"]


def test_missing_scores_file(capsys):
    rc, err = run_cli([*SYNTHETIC, "--scores", CORPUS / "no_scores.npy"], capsys)
    assert_one_error_line(rc, err, "no_scores.npy", "file not found")


def test_scores_file_that_is_not_numpy(capsys):
    rc, err = run_cli([*SYNTHETIC, "--scores", CORPUS / "trace_truncated.csv"], capsys)
    assert_one_error_line(rc, err, "trace_truncated.csv", "not a .npy/.npz")


def test_scores_file_of_strings(capsys, tmp_path):
    path = tmp_path / "words.npy"
    np.save(path, np.array([["a", "b"], ["c", "d"]]))
    rc, err = run_cli([*SYNTHETIC, "--scores", path], capsys)
    assert_one_error_line(rc, err, "words.npy", "must be numbers")


# -- hardware and model files -----------------------------------------------------------------

HARDWARE = [
    ("hw_unknown_field.toml", "hw_unknown_field.toml", "ddr.num_dimms=80: unknown field"),
    ("hw_negative.toml", "hw_negative.toml", "ddr.num_devices=-40: must be > 0"),
    ("hw_string_number.toml", "hw_string_number.toml", "hbm.device.tCCD_L='4': must be a number"),
    ("hw_bool_number.json", "hw_bool_number.json", "gpu.num_gpus=True: must be a number"),
    ("hw_nan.toml", "hw_nan.toml", "gpu.peak_tflops=nan: must be a finite number"),
    ("hw_malformed.toml", "hw_malformed.toml:3", "malformed TOML"),
    ("hw_empty.toml", "hw_empty.toml", "empty file"),
    ("hw_image.toml", "hw_image.toml:3", "binary content"),
    ("hw_unknown_base.toml", "hw_unknown_base.toml", "base='dgx-a100': unknown platform"),
    ("hw.yaml", "hw.yaml", "unknown file type '.yaml'"),
    ("no_such_hw.toml", "no_such_hw.toml", "file not found"),
    # Loads, but 40 stacks of one row per bank hold no model's weights: CapacityError.
    ("hw_tiny_hbm.toml", "llama3-8b", "does not fit"),
]

MODELS = [
    ("model_missing_field.toml", "model_missing_field.toml", "vocab=None: missing"),
    ("model_bad_kv_heads.toml", "model_bad_kv_heads.toml", "kv_heads=5: must divide"),
    ("model_zero_layers.toml", "model_zero_layers.toml", "layers=0: must be a positive"),
    ("model_malformed.json", "model_malformed.json:4", "malformed JSON"),
    ("trace_image.png", "trace_image.png", "unknown file type '.png'"),
]


@needs_config_flags
@pytest.mark.parametrize("name,where,what", HARDWARE)
def test_bad_hardware_file_for_simulate(capsys, name, where, what):
    rc, err = run_cli([*SYNTHETIC, "--hardware", CORPUS / name], capsys)
    assert_one_error_line(rc, err, where, what)


def with_file(argv, flag, path):
    """``argv`` plus ``flag path``; a --model-file replaces --model (giving both is an
    error of its own, tested in test_workflow.py)."""
    argv = list(argv)
    if flag == "--model-file" and "--model" in argv:
        i = argv.index("--model")
        del argv[i:i + 2]
    return [*argv, flag, path]


@needs_config_flags
@pytest.mark.parametrize("name,where,what", MODELS)
def test_bad_model_file_for_simulate(capsys, name, where, what):
    rc, err = run_cli(with_file(SYNTHETIC, "--model-file", CORPUS / name), capsys)
    assert_one_error_line(rc, err, where, what)


@needs_config_flags
@pytest.mark.parametrize("flag,name,where,what", [
    ("--hardware", *HARDWARE[1]), ("--model-file", *MODELS[1]),
    ("--hardware", *HARDWARE[-1]),
])
def test_bad_config_file_for_compare(capsys, tmp_path, flag, name, where, what):
    rc, err = run_cli(with_file(["compare", "--model", "llama3-8b", "--systems", "pam",
                                 "--batches", "2", "--steps", "2", "--quiet", "--out",
                                 tmp_path], flag, CORPUS / name), capsys)
    assert_one_error_line(rc, err, where, what)


@needs_bounds
@pytest.mark.parametrize("flag,name,where,what", [
    ("--hardware", *HARDWARE[0]), ("--model-file", *MODELS[2]),
    ("--hardware", *HARDWARE[-1]),
])
def test_bad_config_file_for_bounds(capsys, flag, name, where, what):
    rc, err = run_cli(with_file(["bounds", "--model", "llama3-8b"], flag, CORPUS / name),
                      capsys)
    assert_one_error_line(rc, err, where, what)


# -- the library raises the specific type, with its attributes -------------------------------

def test_trace_errors_carry_path_line_and_reason():
    with pytest.raises(TraceFormatError) as info:
        load_trace(CORPUS / "trace_zero_output.csv")
    err = info.value
    assert (pathlib.Path(err.path).name, err.line) == ("trace_zero_output.csv", 3)
    assert "output_tokens must be >= 1 token, got 0" == err.reason


def test_config_errors_carry_field_and_value():
    with pytest.raises(ConfigError) as info:
        cf.load_platform_file(CORPUS / "hw_negative.toml")
    assert (info.value.field, info.value.value) == ("ddr.num_devices", -40)
    with pytest.raises(ConfigError) as info:
        synthetic("sharegpt", 0, seed=0)
    assert (info.value.field, info.value.value) == ("num_requests", 0)
    with pytest.raises(ConfigError) as info:
        get_platform(overrides={"hbm.device.tCCD_L": -4})
    assert info.value.value == -4 and info.value.field.endswith("tCCD_L")


def test_unknown_names_carry_kind_name_and_choices():
    with pytest.raises(UnknownNameError) as info:
        get_model("gpt-5")
    assert (info.value.kind, info.value.name) == ("model", "gpt-5")
    assert "llama3-70b" in info.value.choices
    with pytest.raises(UnknownNameError) as info:
        synthetic("imagenet", 4, seed=0)
    assert (info.value.kind, info.value.name) == ("workload", "imagenet")


def test_weights_that_cannot_fit_raise_capacity_error():
    platform = cf.load_platform_file(CORPUS / "hw_tiny_hbm.toml")
    with pytest.raises(CapacityError, match="model llama3-8b .* does not fit"):
        make_params("pam", "llama3-8b", platform)
