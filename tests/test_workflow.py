"""A researcher's workflow (issue 19): provenance in every output, compare's rows from one
batch, `simulate` for studies (several systems, per-request and timeline files, figures,
load scaling), one command-line surface (--hardware, --model-file, --knob, --system-file),
plausibility warnings, the slot check, summarize_batch and the figures' axes.

Small cases: LLaMA-3-8B, a dozen short requests, batch 4 (each simulating test compiles
the engine once or twice).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import types

import numpy as np
import pytest

import pamjax
from pamjax.cli import main
from pamjax.errors import ConfigError
from pamjax.simulation import check_slots, make_config, run, run_batch, simulate
from pamjax.studies import plots
from pamjax.studies.study import peak_under_slo
from pamjax.systems import make_params, max_bank_groups
from pamjax.traces import load_trace, save_trace
from pamjax.workload import Workload, synthetic

ROOT = pathlib.Path(__file__).resolve().parent.parent
SYSTEM_FILE = ROOT / "examples" / "systems" / "pam-hbm-ddr.toml"
MODEL_FILE = ROOT / "examples" / "models" / "llama2-7b.toml"


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> pathlib.Path:
    """12 short requests arriving over ~0.3 s (plain trace format)."""
    w = synthetic("humaneval", 12, seed=1, rate_per_s=40.0)
    short = Workload(w.arrival_s, np.minimum(w.prompt_tokens, 96),
                     np.minimum(w.output_tokens, 40), name="small")
    return save_trace(short, tmp_path_factory.mktemp("trace") / "small.csv")


# -- simulate for studies ---------------------------------------------------------------------

def test_simulate_several_systems_writes_every_output(trace, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["simulate", "--systems", "pam,l-pim,vllm-offload", "--model", "llama3-8b",
            "--trace", str(trace), "--batch", "4", "--out", str(out)]
    rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 0
    assert "setup: platform pam-dgx-h100 (preset, hash " in stdout
    header = next(line for line in stdout.splitlines() if line.lstrip().startswith("system"))
    for column in ("TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"):
        assert column in header
    workload = load_trace(trace)
    for system in ("pam", "l-pim", "vllm-offload"):
        summary = json.loads((out / f"{system}.json").read_text())
        prov = summary["provenance"]
        assert prov["command"] == ["pamjax", *argv]
        assert [s["name"] for s in prov["systems"]] == [system]
        assert prov["model"]["name"] == "llama3-8b" and prov["workload"]["source"] == str(trace)
        assert summary["engine"] == ("leap" if system == "vllm-offload"
                                     else "step, vmapped over 2 configurations")
        requests = read_csv(out / f"{system}_requests.csv")
        assert [float(r["arrival_s"]) for r in requests] == workload.arrival_s.tolist()
        done = [r for r in requests if r["status"] == "finished"]
        assert len(done) == summary["requests_finished"] == 12
        ttft = np.array([float(r["ttft_ms"]) for r in done])
        tpot = np.array([float(r["tpot_ms"]) for r in done if r["tpot_ms"]])
        for key, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
            assert summary[key]["p50"] == pytest.approx(np.percentile(values, 50), rel=1e-9)
            assert summary[key]["p99"] == pytest.approx(np.percentile(values, 99), rel=1e-9)
        timeline = read_csv(out / f"{system}_timeline.csv")
        assert sum(int(r["output_tokens"]) for r in timeline) == summary["output_tokens"]
        end = float(timeline[-1]["time_s"]) + float(timeline[-1]["duration_s"])
        assert end == pytest.approx(summary["simulated_seconds"], rel=1e-5)
        assert max(float(r["running"]) for r in timeline) <= 4
        for name in ("requests", "timeline"):
            meta = json.loads((out / f"{system}_{name}.meta.json").read_text())
            assert meta["provenance"] == prov
        assert meta["resolution"] == "step"
    for figure in ("latency_cdf.png", "timeline.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A system in the vmapped group gives what it gives alone.
    alone = simulate("pam", "llama3-8b", workload, max_batch=4).summary
    vmapped = json.loads((out / "pam.json").read_text())
    for key in ("requests_finished", "output_tokens", "decode_steps"):
        assert vmapped[key] == alone[key]
    assert vmapped["throughput_tokens_per_s"] == pytest.approx(
        alone["throughput_tokens_per_s"], rel=1e-5)


def test_load_scale_divides_the_arrival_times(trace, tmp_path, capsys):
    out = tmp_path / "x2"
    rc, stdout, _ = run_cli(["simulate", "--system", "vllm-offload", "--model", "llama3-8b",
                             "--trace", trace, "--batch", "4", "--load-scale", "2",
                             "--out", out], capsys)
    assert rc == 0 and "load x2" in stdout
    arrivals = [float(r["arrival_s"]) for r in read_csv(out / "vllm-offload_requests.csv")]
    assert arrivals == (load_trace(trace).arrival_s / 2).tolist()
    summary = json.loads((out / "vllm-offload.json").read_text())
    assert summary["provenance"]["workload"]["load_scale"] == 2.0
    # The same requests twice as densely: the run cannot end later.
    assert summary["simulated_seconds"] <= load_trace(trace).arrival_s[-1] + 10.0


# -- compare ----------------------------------------------------------------------------------

def test_peak_under_slo_takes_every_field_from_one_batch():
    def row(batch, tput, tpot, oom=False):
        return {"platform": "p", "model": "m", "system": "a", "batch": batch, "oom": oom,
                "throughput_tokens_per_s": tput, "tpot_p99_ms": tpot,
                "energy_j_per_token": 1.0 / tput, "bound_tokens_per_s": 2 * tput,
                "binding_resource": f"r{batch}", "efficiency": 0.5}

    rows = [row(2, 100.0, 10.0), row(4, 150.0, 20.0), row(8, 140.0, 30.0)]
    best = peak_under_slo(rows, 40.0)["a"]
    assert {k: best[k] for k in rows[1]} == rows[1]  # the peak batch's row, whole
    assert (best["peak_batch"], best["max_batch"], best["at_grid_edge"]) == (4, 8, True)
    none = peak_under_slo(rows, 5.0)["a"]
    assert none["max_batch"] == none["peak_batch"] == 0
    assert none["throughput_tokens_per_s"] == 0.0 and none["smallest_batch"] == rows[0]
    assert "tpot_p99_ms" not in none and none["efficiency"] is None


def test_compare_rows_platform_knobs_and_system_file(tmp_path, capsys):
    # The shapes of test_cli.py's compare (2 systems, batches 2 and 4, seed 3, 8 steps).
    rc, stdout, _ = run_cli(["compare", "--model", "llama3-8b", "--systems", "pam",
                             "--system-file", SYSTEM_FILE, "--batches", "2,4", "--steps", "8",
                             "--seed", "3", "--slo-ms", "1000", "--knob",
                             "prefill_token_budget=4096", "--quiet", "--out", tmp_path], capsys)
    assert rc == 0
    assert "knobs prefill_token_budget=4096" in stdout and "peak batch" in stdout
    summary = json.loads((tmp_path / "compare.json").read_text())
    for system, best in summary["best"].items():
        same = next(r for r in summary["sweep"]
                    if r["system"] == system and r["batch"] == best["peak_batch"])
        assert {k: best[k] for k in same} == same
    assert summary["best"]["pam-hbm-ddr"]["ssd_token_share"] == 0.0
    rows = read_csv(tmp_path / "compare_sweep.csv")
    assert {r["platform"] for r in rows} == {"pam-dgx-h100"}
    meta = json.loads((tmp_path / "compare_sweep.meta.json").read_text())
    prov = meta["provenance"]
    assert prov == summary["provenance"] and meta["columns"] == list(rows[0])
    assert prov["knobs"]["differs_from_default"] == {"prefill_token_budget": 4096}
    assert [(s["name"], s["source"]) for s in prov["systems"]] == [
        ("pam", "preset"), ("pam-hbm-ddr", str(SYSTEM_FILE))]
    assert prov["systems"][1]["fields"]["tiers"] == ["hbm", "ddr"]


def test_sweep_takes_the_shared_options_and_writes_provenance_and_a_figure(tmp_path,
                                                                          capsys):
    hardware = ROOT / "examples" / "hardware" / "pam-80-dimms.toml"
    # The shapes of test_cli.py's sweep (2 systems x batches 2, 4 x seeds 0, 1; 8 requests,
    # 8 steps): the suite compiles them once.
    rc, stdout, _ = run_cli(["sweep", "--model-file", MODEL_FILE, "--systems", "pam",
                             "--system-file", SYSTEM_FILE, "--batches", "2,4", "--seeds",
                             "0,1", "--slo-ms", "1000", "--max-requests", "8", "--steps", "8",
                             "--hardware", hardware, "--knob", "target_rule=throughput",
                             "--quiet", "--out", tmp_path], capsys)
    assert rc == 0 and "platform pam-80-dimms" in stdout
    rows = read_csv(tmp_path / "sweep.csv")
    assert sorted({r["system"] for r in rows}) == ["pam", "pam-hbm-ddr"] and len(rows) == 8
    assert {r["model"] for r in rows} == {"llama2-7b"}
    prov = json.loads((tmp_path / "sweep.meta.json").read_text())["provenance"]
    assert prov["platform"]["source"] == str(hardware)
    assert prov["platform"]["differs_from_preset"] == {
        "ddr.num_devices": {"value": 80, "preset": 40}}
    assert prov["knobs"]["differs_from_default"] == {"target_rule": "throughput"}
    assert prov["model"]["source"] == str(MODEL_FILE)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


# -- one command-line surface -----------------------------------------------------------------

@pytest.mark.parametrize("argv,needles", [
    (["simulate", "--system", "pam", "--knob", "frob=1"],
     ["unknown knob 'frob'", "prefill_token_budget"]),
    (["compare", "--knob", "prefill_token_budget=lots"],
     ["--knob prefill_token_budget", "must be an integer"]),
    (["bounds", "--knob", "target_rule=best"], ["--knob target_rule", "equal-time"]),
    (["sweep", "--override", "knobs.prefill_token_budget=16384"], ["--knob NAME=VALUE"]),
    (["simulate", "--system", "pam", "--model", "opt-175b", "--model-file", MODEL_FILE],
     ["--model='opt-175b'", "conflicts with --model-file"]),
    (["simulate", "--systems", "pam,l-pim", "--json", "x.json"], ["use --out DIR"]),
    (["simulate", "--model", "llama3-8b"], ["give --system, --systems or --system-file"]),
    (["simulate", "--system", "pam", "--load-scale", "2"], ["applies to a --trace"]),
    (["simulate", "--system", "pam", "--system-file", "nope.toml"],
     ["nope.toml", "file not found"]),
])
def test_shared_options_refuse_bad_input_in_one_line(argv, needles, capsys):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("text,needle", [
    ('base = "pam"\ntiers = ["hbm", "nvme"]\n', "tiers=['hbm', 'nvme']: unknown tier 'nvme'"),
    ('base = "pam"\nname = "pam"\nswap_budget = 2\n', "is a preset system's name"),
    ('base = "pam"\nplacement_policy = "random"\n', "'importance-ratio' (1)"),
    ('base = "pam"\nname = "../evil"\n', "letters, digits"),
    ('name = "half"\nsparse = true\n', "attention_on_pim=None: missing"),
    ('base = "pam"\nswap_budget = 1.5\n', "swap_budget=1.5: must be an integer"),
])
def test_bad_system_files_name_the_file_and_field(text, needle, tmp_path, capsys):
    path = tmp_path / "sys.toml"
    path.write_text(text)
    rc, _, err = run_cli(["bounds", "--systems", "pam", "--system-file", path], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(path) in err and needle in err, err


def test_disproportionate_platform_is_warned_about(tmp_path, capsys):
    one_gpu = tmp_path / "one-gpu.toml"
    one_gpu.write_text('base = "pam-dgx-h100"\n[gpu]\nnum_gpus = 1\ntensor_parallel = 1\n'
                       'pipeline_parallel = 1\n')
    argv = ["bounds", "--model", "llama3-8b", "--systems", "pam", "--json",
            tmp_path / "b.json"]
    rc, _, err = run_cli([*argv, "--hardware", one_gpu], capsys)
    assert rc == 0
    assert err.startswith("pamjax: warning: platform one-gpu: 40 HBM stacks for 1 GPU(s)")
    assert "hbm.num_devices = 5" in err and len(err.strip().splitlines()) == 1
    prov = json.loads((tmp_path / "b.json").read_text())["provenance"]
    assert prov["platform"]["differs_from_preset"]["gpu.num_gpus"] == {"value": 1,
                                                                      "preset": 8}
    one_gpu.write_text(one_gpu.read_text() + "[hbm]\nnum_devices = 5\n")
    rc, _, err = run_cli([*argv, "--hardware", one_gpu], capsys)
    assert rc == 0 and err == ""
    rc, _, err = run_cli(argv, capsys)  # the preset: nothing to say
    assert rc == 0 and err == ""


def test_provenance_hash_follows_the_hardware_not_its_name():
    from pamjax.provenance import describe_platform

    preset = pamjax.get_platform()
    renamed = dataclasses.replace(preset, name="mine")
    assert describe_platform(renamed)["hash"] == describe_platform(preset)["hash"]
    more = describe_platform(preset.with_overrides({"ssd.num_devices": 4}), "f.toml")
    assert more["hash"] != describe_platform(preset)["hash"] and more["source"] == "f.toml"
    assert more["differs_from_preset"] == {"ssd.num_devices": {"value": 4, "preset": 8}}


# -- library: the slot check and summarize_batch ----------------------------------------------

def test_a_batch_larger_than_the_slots_is_refused():
    workload = synthetic("sharegpt", 16, seed=0)
    config = make_config(workload, 8, padded_bank_groups=max_bank_groups())
    params = make_params("pam", "llama3-8b", max_batch=64)
    for call in (lambda: run(params, workload, config),
                 lambda: run_batch(config, [params], workload, 4)):
        with pytest.raises(ConfigError, match="max_batch=64.*num_slots=8"):
            call()
    # No more requests than slots: neither can be reached, as simulate sizes its config.
    check_slots(params, make_config(synthetic("sharegpt", 8, seed=0), 8))


def test_summarize_batch_gives_one_summary_per_configuration():
    # test_simulation.py's shapes (4 requests, 2 slots, page 64, calls of 2 x 5 steps), so
    # that the whole suite compiles them once.
    workload = synthetic("sharegpt", 4, seed=0)
    config = make_config(workload, 2, page_size=64, padded_bank_groups=max_bank_groups())
    params = [make_params(s, "llama3-8b", max_batch=2, page_size=64) for s in ("pam", "l-pim")]
    states, metrics = pamjax.run_batch(config, pamjax.stack(params), workload, 10,
                                       chunk_steps=5)
    summaries = pamjax.summarize_batch(workload, states, metrics, labels=["pam", "l-pim"])
    assert [s["label"] for s in summaries] == ["pam", "l-pim"]
    for i, s in enumerate(summaries):
        assert s["output_tokens"] == int(metrics.output_tokens[i].sum()) > 0
        assert s["requests_finished"] + s["requests_unfinished"] == s["requests_total"] == 4
    with pytest.raises(ConfigError, match="labels"):
        pamjax.summarize_batch(workload, states, metrics, labels=["one"])


# -- timelines and figures --------------------------------------------------------------------

def _steps(busy, idle, running, output):
    n = len(busy)
    return types.SimpleNamespace(
        step_time_s=np.array(busy), idle_s=np.array(idle), decode_requests=np.array(running),
        prefill_requests=np.zeros(n, int), rejected=np.zeros(n, int),
        output_tokens=np.array(output), tier_units=np.tile([[5, 2, 0]], (n, 1)),
        migrated_units=np.ones(n, int))


def test_timeline_bins_are_exact_for_steps_that_straddle_them():
    from pamjax.metrics import timeline_rows

    # Steps: 0-0.6 s (4 running), 0.6-0.65 s (2), an idle jump to 0.9 s, 0.9-1.0 s (1).
    m = _steps([0.6, 0.05, 0.0, 0.1], [0.0, 0.0, 0.25, 0.0], [4, 2, 0, 1], [4, 2, 0, 1])
    arrivals = types.SimpleNamespace(arrival_s=np.zeros(1))
    rows, resolution = timeline_rows(m, arrivals, page_size=16)
    assert resolution == {"resolution": "step"} and len(rows) == 4
    assert [r["time_s"] for r in rows] == pytest.approx([0.0, 0.6, 0.65, 0.9])
    assert rows[2]["step_time_ms"] is None and rows[1]["hbm_kv_tokens"] == 80
    rows, resolution = timeline_rows(m, arrivals, page_size=16, max_rows=3)
    assert resolution == {"resolution": "bin", "bin_s": 0.5}  # 1.0 s / 3 -> 0.5 s bins
    # The first step straddles the edge: 0.5 s of it in bin 0, 0.1 s in bin 1.
    assert [r["running"] for r in rows] == pytest.approx(
        [4.0, (4 * 0.1 + 2 * 0.05 + 1 * 0.1) / 0.25])
    assert [r["steps"] for r in rows] == [0, 3] and rows[0]["step_time_ms"] is None
    assert [r["output_tokens"] for r in rows] == [0, 7]
    assert sum(r["migrated_tokens"] for r in rows) == 64


def test_bar_panels_are_linear_unless_values_span_orders_of_magnitude(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def scale(values, log):
        fig, ax = plt.subplots()
        plots._bar_panel(ax, ["g"], {f"s{i}": [v] for i, v in enumerate(values)},
                         {f"s{i}": "C0" for i in range(len(values))}, "OOM", log, "y (log)")
        result = ax.get_yscale(), ax.get_ylabel(), [t.get_text() for t in ax.texts]
        plt.close(fig)
        return result

    assert scale([100.0, 103.0, None], log=True)[:2] == ("linear", "y")
    assert scale([1.0, 1000.0], log=True)[:2] == ("log", "y (log)")
    assert "OOM" in scale([5.0, None], log=False)[2]
    assert plots.short(15230.0) == "15.2k" and plots.short(2.5e6) == "2.5M"


def test_commands_with_fixed_setups_record_their_command(tmp_path, capsys, monkeypatch):
    from pamjax.studies import reproduce

    def fake(study, out_dir, **kwargs):  # the study itself is tested in test_reproduce.py
        path = pathlib.Path(out_dir) / f"{study}.csv"
        path.write_text("variant,speedup\npam,2.0\n")
        return {study: path}

    monkeypatch.setattr(reproduce, "reproduce", fake)
    rc, stdout, _ = run_cli(["reproduce", "ablation", "--quick", "--out", tmp_path], capsys)
    assert rc == 0 and "ablation.meta.json" in stdout
    meta = json.loads((tmp_path / "ablation.meta.json").read_text())
    assert meta["columns"] == ["variant", "speedup"]
    assert meta["provenance"]["command"] == ["pamjax", "reproduce", "ablation", "--quick",
                                             "--out", str(tmp_path)]
    assert meta["provenance"]["pamjax_version"] == pamjax.__version__


# --- Issue 17: the main job's two regimes, OOM and absurd sizes, reproduce's options ---


def _oom_rows(systems, model, workload, batches, **kwargs):
    """What study.run_sweep returns when no point fits (engine.resume rejected them)."""
    return [{"platform": "pam-dgx-h100", "model": model, "system": s, "batch": b,
             "throughput_tokens_per_s": 0.0, "tpot_p99_ms": float("nan"), "oom": True,
             "mean_batch": 0.0, "mean_context_tokens": 0.0, "page_size": 1,
             "bound_tokens_per_s": None,
             "binding_resource": None, "efficiency": None}
            for s in systems for b in sorted(set(batches))]


def test_an_all_oom_compare_exits_0_with_a_plot_that_says_so(tmp_path, capsys, monkeypatch):
    from pamjax.studies import study

    said = []
    real_say = plots._say
    monkeypatch.setattr(plots, "_say", lambda ax, text: (said.append(text),
                                                        real_say(ax, text)))
    monkeypatch.setattr(study, "run_sweep", _oom_rows)
    rc, stdout, stderr = run_cli(["compare", "--systems", "pam,attacc", "--batches", "2,4",
                                  "--quiet", "--out", tmp_path], capsys)
    assert rc == 0 and "Traceback" not in stderr
    assert "OOM: pam at batch 2,4" in stdout and "OOM: attacc at batch 2,4" in stdout
    assert (tmp_path / "compare_batches.png").stat().st_size > 0
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert any("no batch fits" in text for text in said)
    assert any("no system meets the SLO" in text for text in said)


@pytest.mark.parametrize("command", [
    ["compare", "--systems", "pam", "--batches", "3000000", "--slo-ms", "100"],
    ["sweep", "--systems", "pam,ls-pim", "--batches", "64,3000000"],
    ["compare", "--model", "llama3-8b", "--systems", "pam", "--batches", "20000"]])
def test_absurd_batches_are_refused_before_simulating(command, tmp_path, capsys):
    import time

    start = time.perf_counter()
    rc, stdout, stderr = run_cli([*command, "--out", tmp_path], capsys)
    assert rc == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "--batches" in stderr
    assert ("cannot fit" in stderr) != ("above the largest batch simulated" in stderr)
    assert time.perf_counter() - start < 60  # no compilation, no simulation
    assert not any(tmp_path.iterdir())


def test_check_batches_judges_the_steady_states_kv_need():
    from pamjax.studies import study

    pool = synthetic("write-doc", 512, seed=0)
    fits = study.check_batches(["attacc", "pam"], "llama3-70b", pool, [64])
    # AttAcc holds KV in HBM only, PAM in every tier: it holds far more requests.
    assert 0 < fits["attacc"] < fits["pam"]
    need = study.inflight_kv_tokens(pool)
    assert need > float(np.mean(pool.prompt_tokens + pool.output_tokens))  # length-biased
    with pytest.raises(ConfigError, match="cannot fit"):
        study.check_batches(["attacc"], "llama3-70b", pool,
                            [int(study.FIT_MARGIN * fits["attacc"]) + 1])
    study.check_batches(["attacc"], "llama3-70b", pool, [int(study.FIT_MARGIN
                                                             * fits["attacc"])])


def _best(tokens_per_s: dict, binding: dict, hbm_share=None) -> dict:
    return {s: {"system": s, "max_batch": 64 if t else 0, "peak_batch": 64 if t else 0,
                "throughput_tokens_per_s": t, "binding_resource": binding.get(s),
                **({"hbm_token_share": hbm_share[s]} if hbm_share else {})}
            for s, t in tokens_per_s.items()}


def test_runs_findings_come_from_the_numbers():
    from pamjax.cli import _findings

    rows = [{"system": "attacc", "batch": 256, "oom": True, "tpot_p99_ms": None},
            {"system": "l-pim", "batch": 256, "oom": False, "tpot_p99_ms": 400.0}]
    fits = {"attacc": 123, "l-pim": 9999, "pam": 9999}
    pays = _findings(_best({"attacc": 900.0, "l-pim": 1000.0, "pam": 2000.0},
                           {"attacc": "pim_hbm", "l-pim": "pim_tiers", "pam": "gpu_compute"},
                           {"attacc": 1.0, "l-pim": 1.0, "pam": 0.7}),
                     rows, fits)
    assert pays[0].startswith("pam pays off: 2.00x the best baseline (l-pim")
    assert "binding at the peak: attacc pim_hbm, l-pim pim_tiers, pam gpu_compute" in pays
    assert "pam keeps 30% of its KV tokens outside HBM (DDR/SSD-PIM), l-pim 0%" in pays
    assert "attacc: batch 256 out of KV memory (its tiers hold ~123 requests on average)" \
        in pays
    assert "l-pim: batch 256 misses the SLO (TPOT p99 400 ms)" in pays
    even = _findings(_best({"ls-pim": 1000.0, "pam": 1010.0},
                           {"ls-pim": "gpu_compute", "pam": "gpu_compute"}), [], fits)
    assert even[0].startswith("pam does not pay off (within 5%): 1.01x")
    assert even[1].startswith("every system's bound at its peak is gpu_compute")
    loses = _findings(_best({"ls-pim": 1000.0, "pam": 800.0}, {}), [], fits)
    assert loses[0].startswith("pam loses: 0.80x")


def _regime_rows(systems, model, workload, batches, **kwargs):
    """Sweep rows of a fake regime: on write-doc PAM serves twice the others' tokens/s and
    AttAcc runs out of KV at batch 4; on sharegpt every system is alike."""
    rows = []
    for s in systems:
        for b in sorted(set(batches)):
            gain = 2.0 if workload == "write-doc" and s == "pam" else 1.0
            oom = workload == "write-doc" and s == "attacc" and b == 4
            rows.append({
                "platform": "pam-dgx-h100", "model": model, "system": s, "batch": b,
                "throughput_tokens_per_s": 0.0 if oom else 100.0 * b * gain,
                "tpot_p99_ms": 10.0 * b, "oom": oom, "mean_batch": float(b),
                "mean_context_tokens": 500.0, "page_size": 1, "energy_j_per_token": 0.5,
                **{f"{t}_{k}_share": 1.0 if t == "hbm" else 0.0 for t in ("hbm", "ddr", "ssd")
                   for k in ("token", "attention")},
                "bound_tokens_per_s": 1e4, "efficiency": 0.01 * b * gain,
                "binding_resource": "gpu_compute" if gain == 1.0 else "pim_tiers"})
    return rows


def test_run_shows_both_regimes_side_by_side(tmp_path, capsys, monkeypatch):
    from pamjax import cli
    from pamjax.studies import study
    from pamjax.systems import MAIN_SYSTEMS

    # The sweeps are faked (study.run_sweep is tested in test_sweep.py and test_physics.py);
    # this checks what `run` makes of two regimes: tables, findings, files.
    monkeypatch.setattr(study, "run_sweep", _regime_rows)
    monkeypatch.setattr(cli, "RUN_REGIMES", (
        cli.Regime("chat", "sharegpt", (2, 4), "short contexts"),
        cli.Regime("long context", "write-doc", (2, 4), "long contexts")))
    rc, stdout, _ = run_cli(["run", "--quiet", "--out", tmp_path], capsys)
    assert rc == 0
    assert "== chat: sharegpt" in stdout and "== long context: write-doc" in stdout
    chat, long = stdout.split("== long context")
    assert "pam does not pay off (within 5%): 1.00x the best baseline" in chat
    assert "every system's bound at its peak is gpu_compute" in chat
    assert "pam pays off: 2.00x the best baseline" in long
    assert "attacc: batch 4 out of KV memory" in long and "pam / this" in stdout
    summary = json.loads((tmp_path / "run.json").read_text())
    assert list(summary["regimes"]) == ["chat", "long context"]
    for regime in summary["regimes"].values():
        assert set(regime["best"]) == set(MAIN_SYSTEMS)
        assert regime["findings"][0] in stdout
    rows = read_csv(tmp_path / "run_sweep.csv")
    assert [r["regime"] for r in rows] == ["chat"] * 10 + ["long context"] * 10
    assert (tmp_path / "run.png").stat().st_size > 0


def test_reproduce_takes_hardware_and_knobs_and_refuses_the_rest(tmp_path, capsys,
                                                                 monkeypatch):
    from pamjax.studies import reproduce

    seen = []

    def fake(systems, model, workload, batches, **kwargs):
        seen.append(kwargs)
        return _oom_rows(systems, model, workload, batches)

    monkeypatch.setattr(reproduce, "run_sweep", fake)
    hardware = ROOT / "examples" / "hardware" / "pam-80-dimms.toml"
    rc, stdout, _ = run_cli(["reproduce", "offline", "--quick", "--quiet", "--hardware",
                             hardware, "--knob", "target_rule=throughput", "--out",
                             tmp_path], capsys)
    assert rc == 0 and "offline.meta.json" in stdout
    assert seen and all(k["platform"].ddr.num_devices == 80 for k in seen)
    # The override sits on top of the offline study's own knobs (no prefill budget).
    assert all(k["knobs"].target_rule == "throughput" for k in seen)
    assert all(k["knobs"].prefill_token_budget == reproduce.OFFLINE_KNOBS.prefill_token_budget
               for k in seen)
    prov = json.loads((tmp_path / "offline.meta.json").read_text())["provenance"]
    assert prov["platform"]["source"] == str(hardware)
    assert prov["knob_overrides"] == {"target_rule": "throughput"}
    for option, path in (("--model-file", MODEL_FILE), ("--system-file", SYSTEM_FILE)):
        rc, stdout, stderr = run_cli(["reproduce", "online", option, path, "--out",
                                      tmp_path / "x"], capsys)
        assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
        assert "reproduce runs the study's own" in stderr
