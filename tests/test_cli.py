"""The pamjax command line: help, the simulate JSON contract, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pamjax.cli import build_parser, main

SIMULATE_KEYS = {
    "requests_total", "requests_finished", "requests_rejected", "requests_unfinished",
    "output_tokens", "throughput_tokens_per_s", "ttft_ms", "tpot_ms", "energy_j_per_token",
    "tier_token_share", "tier_attention_time_share", "migrated_token_fraction_per_step",
    "simulated_seconds", "wall_seconds", "decode_steps", "bound_tokens_per_s",
    "binding_resource", "efficiency",
}


def test_every_command_has_help_with_an_example(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "example: pamjax" in capsys.readouterr().out


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "pamjax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "simulate" in out and "reproduce" in out


def test_simulate_writes_the_documented_json(tmp_path, capsys):
    path = tmp_path / "pam.json"
    rc = main(["simulate", "--system", "pam", "--model", "llama3-8b", "--workload",
               "humaneval", "--batch", "4", "--max-requests", "6", "--slo-ms", "150",
               "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "SLO met" in out
    summary = json.loads(path.read_text())
    assert SIMULATE_KEYS <= set(summary)
    assert summary["requests_finished"] == summary["requests_total"] == 6
    assert set(summary["tpot_ms"]) == {"mean", "p50", "p99"}
    assert set(summary["tier_token_share"]) == {"hbm", "ddr", "ssd"}
    assert summary["output_tokens"] > 0 and summary["throughput_tokens_per_s"] > 0
    assert 0 < summary["efficiency"] <= 1 and "bound tok/s" in out
    assert summary["efficiency"] == pytest.approx(
        summary["throughput_tokens_per_s"] / summary["bound_tokens_per_s"])


@pytest.mark.parametrize("argv,needle", [
    (["simulate", "--system", "nope"], "invalid choice"),
    (["simulate", "--system", "pam", "--batch", "0"], "must be >= 1"),
    (["simulate", "--system", "pam", "--batch", "x"], "not an integer"),
    (["simulate", "--system", "pam", "--rate", "-1"], "must be a finite number > 0"),
    (["simulate", "--system", "pam", "--rate", "nan"], "must be a finite number > 0"),
    (["simulate", "--system", "pam", "--trace", "/no/such/file.csv"], "file not found"),
    (["compare", "--systems", "pam,bogus"], "unknown system"),
    (["compare", "--batches", "4,-2"], "batch sizes must be integers >= 1"),
    (["reproduce", "everything"], "invalid choice"),
    (["bounds", "--claim", "pam-vllm=2"], "is not SYSTEM_A/SYSTEM_B=RATIO"),
    (["bounds", "--claim", "pam/nope=2"], "unknown system 'nope'"),
    (["bounds", "--claim", "pam/attacc=-1"], "must be a finite number > 0"),
    (["bounds", "--claim", "pam/attacc=2", "--reference-tokens-per-s", "0"],
     "must be a finite number > 0"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_nonzero(argv, needle, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unusable_output_and_unfit_requests_fail_before_simulating(tmp_path, capsys,
                                                                   monkeypatch):
    import pamjax.simulation
    import pamjax.studies.study

    def refuse(*args, **kwargs):
        raise AssertionError("simulated although the input was unusable")

    monkeypatch.setattr(pamjax.simulation, "simulate", refuse)
    monkeypatch.setattr(pamjax.studies.study, "run_sweep", refuse)
    rc = main(["simulate", "--system", "pam", "--model", "llama3-8b", "--json", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["compare", "--systems", "pam", "--out", str(blocker)])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a folder" in err
    huge = tmp_path / "huge.csv"
    huge.write_text("arrival_s,prompt_tokens,output_tokens\n0,2000000000,1\n")
    rc = main(["simulate", "--system", "pam", "--model", "opt-175b", "--trace", str(huge)])
    err = capsys.readouterr().err
    assert rc == 2 and "none of its 1 request(s) fits" in err and "2,000,000,000" in err


def test_malformed_trace_is_refused_with_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n0.5,ten,5\n")
    rc = main(["simulate", "--system", "pam", "--trace", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.csv:3" in err and len(err.strip().splitlines()) == 1


def test_bounds_table_and_claims(tmp_path, capsys):
    path = tmp_path / "bounds.json"
    argv = ["bounds", "--model", "opt-175b", "--workload", "sharegpt", "--slo-ms", "150",
            "--systems", "pam,vllm-offload", "--json", str(path)]
    assert main(argv + ["--claim", "pam/vllm-offload=2", "--reference-tokens-per-s",
                        "1000"]) == 0
    out = capsys.readouterr().out
    assert "bound tok/s" in out and "binding" in out and "claim pam/vllm-offload" in out
    payload = json.loads(path.read_text())
    pam = payload["bounds"][0]
    assert pam["system"] == "pam" and pam["bound_tokens_per_s"] > 2000
    assert payload["claim"]["attainable"] is True
    # A ratio above PAM's bound over the reference must be refused, naming the resource.
    impossible = pam["bound_tokens_per_s"] / 1000 * 1.01
    assert main(argv + ["--claim", f"pam/vllm-offload={impossible}",
                        "--reference-tokens-per-s", "1000"]) == 0
    out = capsys.readouterr().out
    assert "NOT attainable" in out and pam["binding_resource"] in out
    assert json.loads(path.read_text())["claim"]["attainable"] is False


def test_claim_reference_is_simulated_by_default(capsys):
    assert main(["bounds", "--model", "llama3-8b", "--systems", "pam", "--claim",
                 "pam/ls-pim=1", "--batches", "4", "--steps", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    # A system is never more than its own bound over a simulated reference of itself.
    assert "ls-pim reference" in out and "simulated peak over batches 4" in out
    assert "claim pam/ls-pim = 1: ATTAINABLE" in out


def test_presets_lists_everything(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for word in ("hbm", "ddr", "ssd", "llama3-70b", "opt-175b", "vllm-offload", "pam",
                 "sharegpt", "write-doc"):
        assert word in out


def test_same_seed_gives_byte_identical_outputs(tmp_path, capsys):
    def simulate_json(name):
        path = tmp_path / name
        main(["simulate", "--system", "pam", "--model", "llama3-8b", "--workload", "sharegpt",
              "--batch", "4", "--max-requests", "6", "--seed", "3", "--json", str(path)])
        summary = json.loads(path.read_text())
        summary.pop("wall_seconds")  # host time, the only field that may differ
        return json.dumps(summary, sort_keys=True)

    assert simulate_json("a.json") == simulate_json("b.json")

    def compare_csv(folder):
        main(["compare", "--model", "llama3-8b", "--systems", "pam,ls-pim", "--batches", "2,4",
              "--steps", "8", "--seed", "3", "--quiet", "--out", str(tmp_path / folder)])
        return (tmp_path / folder / "compare_sweep.csv").read_bytes()

    assert compare_csv("x") == compare_csv("y")
    capsys.readouterr()
