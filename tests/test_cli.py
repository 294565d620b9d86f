"""The pamjax command line: help, the simulate JSON contract, and one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from pamjax.cli import build_parser, main

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples" / "models"

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


def test_presets_prints_a_model_files_derived_figures(capsys):
    assert main(["presets"]) == 0
    plain = capsys.readouterr().out
    assert main(["presets", "--model-file", str(EXAMPLES / "mixtral-8x7b.toml")]) == 0
    out = capsys.readouterr().out
    # The usual listing is unchanged; the file's figures come after the model presets.
    section = out[out.index("\nmodel file "):out.index("\nsystems:")]
    assert out.replace(section, "") == plain
    figures = dict(line.strip().rsplit("  ", 1) for line in section.splitlines()[2:])
    figures = {k.strip(): v.strip() for k, v in figures.items()}
    assert figures["name"] == "mixtral-8x7b"
    assert figures["heads q/kv"] == "32/8" and figures["GQA group (q/kv heads)"] == "4"
    assert figures["experts"] == "8 routed (top 2), 0 shared, 14336 wide"
    assert figures["params B (total)"] == "46.7"  # Mistral AI: 46.7B total
    assert figures["params B (active per token)"] == "12.88"  # and 12.9B per token
    assert figures["weight GB"] == "93.41" and figures["KV KiB per token"] == "128"
    # 2 FLOPs x (active linear weights + LM head): 2 x (12.88e9 - 32000 x 4096) ~ 25.5 G.
    assert figures["FC GFLOP per token (active)"] == "25.5"


def test_presets_reads_a_hugging_face_config(capsys):
    path = EXAMPLES / "qwen3-30b-a3b" / "config.json"
    assert main(["presets", "--model-file", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"model file {path}:" in out and "qwen3-30b-a3b" in out
    assert "128 routed (top 8), 0 shared, 768 wide" in out


def test_presets_refuses_a_bad_model_file_before_printing(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "deepseek_v3", "kv_lora_rank": 512}')
    assert main(["presets", "--model-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "multi-head latent attention" in captured.err


WALL_CLOCK_FIELDS = ("wall_seconds",)
"""Output fields that measure host time (simulate's summary): the only ones two runs of one
command may differ in."""

DETERMINISM_SCRIPT = """
import sys
from pamjax.cli import main
out = sys.argv[1]
for argv in (
    ["simulate", "--system", "pam", "--model", "llama3-8b", "--workload", "humaneval",
     "--batch", "4", "--max-requests", "6", "--seed", "3", "--json", f"{out}/simulate.json"],
    ["compare", "--model", "llama3-8b", "--systems", "pam,ls-pim", "--batches", "2,4",
     "--steps", "8", "--seed", "3", "--quiet", "--out", f"{out}/compare"],
    ["sweep", "--model", "llama3-8b", "--systems", "pam,ls-pim", "--batches", "2",
     "--seeds", "0,1", "--slo-ms", "50,200", "--max-requests", "4", "--steps", "6",
     "--quiet", "--out", f"{out}/sweep"],
):
    assert main(argv) == 0, argv
"""


def _without_wall_clock(path: pathlib.Path, run_dir: pathlib.Path, found: set) -> bytes:
    """The file's bytes with the value of every WALL_CLOCK_FIELDS field replaced by null
    (the fields present are added to ``found``) and the run's own output folder, which the
    provenance's command line names, replaced by OUT."""
    data = path.read_bytes().replace(str(run_dir).encode(), b"OUT")
    for name in WALL_CLOCK_FIELDS:
        data, count = re.subn(rb'"%s": [-+.0-9eE]+' % name.encode(),
                              b'"%s": null' % name.encode(), data)
        if count:
            found.add(name)
    return data


def test_the_same_commands_twice_give_the_same_bytes(tmp_path):
    """simulate --json, compare --out and sweep --out, each run twice in a fresh process
    (with other string hash seeds, so that a set or dict iterated in hash order would
    show; the second loads the first's compiled programs from the persistent cache, as the
    CLI does by default): every JSON and CSV they write is byte-identical apart from
    WALL_CLOCK_FIELDS."""
    env = dict(os.environ, PAMJAX_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("PAMJAX_NO_CACHE", None)
    for run, seed in (("a", "1"), ("b", "2")):
        done = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(tmp_path / run)],
                              env={**env, "PYTHONHASHSEED": seed}, capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.suffix in (".json", ".csv"))
    assert [str(f) for f in files] == [
        "compare/compare.json", "compare/compare_sweep.csv", "compare/compare_sweep.meta.json",
        "simulate.json", "sweep/sweep.csv", "sweep/sweep.json", "sweep/sweep.meta.json"]
    found = set()
    for name in files:
        assert _without_wall_clock(tmp_path / "a" / name, tmp_path / "a", found) == \
            _without_wall_clock(tmp_path / "b" / name, tmp_path / "b", found), name
    assert found == set(WALL_CLOCK_FIELDS)  # every field stripped exists


def test_sweep_prints_the_largest_batch_per_slo(tmp_path, capsys):
    import csv

    from pamjax.studies import sweep

    argv = ["sweep", "--model", "llama3-8b", "--systems", "pam,l-pim", "--batches", "2,4",
            "--slo-ms", "1,1000", "--seeds", "0,1", "--max-requests", "8", "--steps", "8",
            "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 2  # systems x batches x seeds x SLOs
    spec = sweep.make_spec(model="llama3-8b", workload="sharegpt", trace=None, max_requests=8,
                           systems=["pam", "l-pim"], batches=[2, 4], slo_ms=[1, 1000],
                           seeds=[0, 1], overrides=None, steps=8)
    best = {(r["system"], r["slo_ms"]): r for r in sweep.best_batches(spec, tmp_path / "sweep.csv")}
    assert len(best) == 4
    for (system, slo), row in best.items():
        # The largest batch at which every seed's row meets the SLO, from the CSV itself.
        ok = [b for b in (2, 4) if all(r["meets_slo"] == "true" for r in rows
                                        if r["system"] == system and float(r["slo_ms"]) == slo
                                        and int(r["batch"]) == b)]
        assert row["max_batch"] == (max(ok) if ok else 0)
        line = next(x for x in out.splitlines() if x.split()[1:3] == [system, f"{slo:.4g}"])
        assert line.split()[3] == (str(row["max_batch"]) if row["max_batch"] else "none")
    assert best[("pam", 1000.0)]["max_batch"] == 4  # every batch fits and meets 1 s
    assert "8 configurations x 2 SLOs (8 run now)" in out and "compilation(s)" in out


def test_train_policy_prints_its_table_and_writes_json(tmp_path, capsys, monkeypatch):
    pytest.importorskip("evosax")
    from pamjax.learn import goodput_study

    # The study itself is tested in test_learning.py; this checks what the command prints.
    calls = []
    policies = ("pam_rule", "learned", "grid_best", "black_box_best", "learned_net")

    def fake_study(setup, **kwargs):
        calls.append((setup, kwargs))
        return {"heldout_goodput_tokens_per_s": dict(zip(policies, (400.0, 431.5, 410.0,
                                                                    425.25, 433.0))),
                "heldout_goodput_ci95": {p: [1.0, 2.0] for p in policies},
                "evaluations": {"learned": 34.5, "grid": 24.0, "black_box": 345.0,
                                "rule_batch_search": 8.0, "learned_net": 80.25},
                "learned_over_rule": 1.079, "learned_net_over_rule": 1.083,
                "relaxation_rank_correlation": 0.61,
                "wall_seconds": 12.0, "seeds": [0, 1]}

    monkeypatch.setattr(goodput_study, "run_study", fake_study)
    path = tmp_path / "learned.json"
    assert main(["train-policy", "--quick", "--seeds", "2", "--json", str(path),
                 "--quiet"]) == 0
    (setup, kwargs), = calls
    assert setup == goodput_study.QUICK
    assert kwargs == dict(seeds=2, eval_trace=None, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert "TPOT p99 <= 100 ms" in lines[0] and "over 2 seed(s)" in lines[0]
    table = {line.split()[0]: line.split()[1:] for line in lines[3:8]}
    assert table["learned"] == ["431.5", "1", "2", "34.5"]
    assert table["black_box_best"] == ["425.2", "1", "2", "345"]
    assert table["learned_net"] == ["433", "1", "2", "80.25"]
    assert "learned / rule 1.079" in lines[-2] and "0.61" in lines[-2]
    assert "learned_net / rule 1.083" in lines[-2]
    assert lines[-1] == f"wrote {path}"
    written = json.loads(path.read_text())
    assert written["quick"] is True and written["evaluations"]["black_box"] == 345.0
    assert "provenance" in written
    with pytest.raises(SystemExit) as exit_info:
        main(["train-policy", "--seeds", "0"])
    assert exit_info.value.code == 2


def test_bench_prints_every_section_and_writes_json(tmp_path, capsys, monkeypatch):
    from pamjax.studies import bench

    # Timings are bench's business (its functions run in the benchmark itself); this checks
    # that the command prints every section of what run_bench returns and writes it all.
    replay = {"requests_per_s": 11000.0, "requests": 19366, "system": "vllm-offload",
              "max_batch": 64, "page_size": 256, "engine": "event leap (leap.py)",
              "wall_s": 1.76, "wall_s_runs": [1.7, 1.76, 1.8], "busy_steps": 193150,
              "device_iterations": 18994, "wall_us_per_busy_step": 9.1, "compile_s": 2.0,
              "requests_finished": 19366}
    speed = {"batch": 32, "tracked_tokens": 118081.0, "cores": 2, "engine_s_per_step": 0.0136,
             "reference_s_per_step": 1.162, "speedup": 85.4, "speedup_per_core": 42.7,
             "compared_steps": 3, "results_equal": True, "token_steps_per_s": 1.3e7}
    point = {"wall_s_per_step": 0.002}
    fake = {
        "quick": True, "jax": "0.0", "backend": "cpu", "cores": 2, "wall_s": 70.0,
        "targets": bench.TARGETS, "azure_conv_requests_per_s": 11000.0,
        "azure": {**replay, "compare": {"requests": 2000, "leap": {"requests_per_s": 13006.0},
                                        "engine_step": {"requests_per_s": 271.0},
                                        "speedup": 48.0, "summaries_equal": True,
                                        "differing_keys": []}},
        "engine_vs_reference": speed, "engine_vs_reference_one_core": dict(speed, cores=1),
        "engine_vs_reference_speedup_per_core": 85.4,
        "configs_scaling": [{"configs": n, "steps": 16, "wall_s": 0.005 * n,
                             "wall_s_per_config": 0.005} for n in (1, 16)],
        "cost_growth": {"vs_context": {"points": [dict(point, context=c) for c in (1024, 4096)],
                                       "loglog_slope": 0.57},
                        "vs_batch": {"points": [dict(point, batch=b) for b in (8, 32)],
                                     "loglog_slope": 0.58}},
        "state_footprint": [{"case": "batch 128 x 8K context", "page_size": 1,
                             "tracked_units": 1048576, "state_bytes": 12582912,
                             "bytes_per_tracked_unit": 12.0, "bytes_per_tracked_token": 12.0}],
    }
    pam_run = {"requests": 2000, "page_size": 1, "fit_units": True, "unit_sizes": [512, 1024],
               "requests_per_s": 31.5, "ms_per_engine_step": 3.2, "wall_s": 63.0,
               "wall_s_first": 80.0}
    phase = {name: {"prefix_ms": 1.0, "phase_ms": 0.5} for name in bench.PHASES}
    fake["pam"] = {"trace": "conv.csv", "requests": 2000, "token": pam_run,
                   "phases": {"after_steps": 2048, "running": 20, "max_context": 900,
                              "bandwidth_bytes_per_s": 1e10,
                              **{k: {"units_per_slot": u, "phases": phase, "step_ms": 4.0,
                                     "unit_table_bytes": 2**20, "bandwidth_ms": 0.1,
                                     "times_bandwidth_limit": 40.0}
                                 for k, u in (("full", 7979), ("fitted", 1024))}}}
    for label, page, shortcut in (("skip_idle_token", 1, "skip_idle"),
                                  ("skip_idle_page16", 16, "skip_idle"),
                                  ("narrow_token", 1, "narrow")):
        fake["pam"][label] = {
            "shortcut": shortcut, "page_size": page, "units_per_slot": 7979 // page,
            "narrow_units": 2048, "chunk_steps": 256, "chunks": [{}] * 24, "speedup": 1.55,
            "same_schedule": True, "float_max_relative_difference": 2.2e-7,
            "bands": [{"running": "0-7", "chunks": 6, "off_ms_per_step": [20.6, 23.1],
                       "on_ms_per_step": [5.9, 9.6], "speedup": 2.82}]}
    fake["pam"]["bracket_blocking"] = {"rows": 64, "units": 7979, "iters": 20,
                                       "block_elements": 65536, "blocked_ms": [1.8, 2.0],
                                       "whole_table_ms": [6.6, 6.8], "speedup": 3.7,
                                       "identical": True}
    monkeypatch.setattr(bench, "run_bench",
                        lambda quick, progress, **kw: dict(fake, quick=quick))
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--quiet", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("azure_conv_requests_per_s: 11000 (target 10000)", "(48x); summaries equal",
                 "speedup 85.4x", "1 core:", "same results over 3 steps: yes",
                 "configs_scaling", "vs_context: 1024: 2.00 ms",
                 "4096: 2.00 ms; log-log slope 0.57", "batch 128 x 8K context",
                 "benchmark wall time 70 s", "512 1024", "U = 1024: 4.00 ms/step",
                 "(40x)", "24 chunks of 256 steps from t = 0: 1.55x; same schedule: True",
                 "narrow columns (EngineConfig.narrow_units = 2048) off / on, page 1, U = 7979",
                 "20.6-23.1", ("row blocks of 65,536 elements 1.80-2.00 ms, whole table "
                               "6.60-6.80 ms: 3.7x; identical: True")):
        assert text in out, text
    assert "huge runs" not in out  # absent from quick runs
    assert json.loads(path.read_text())["cost_growth"]["vs_batch"]["loglog_slope"] == 0.58
