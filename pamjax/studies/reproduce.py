"""The PAM study reproduced: online, offline, energy, ablation and scaling (PAM_SPEC §7-8).

Each study writes ``DIR/<study>.csv`` (columns exactly as listed in STUDY_COLUMNS) and
``DIR/<study>.png``. ``quick`` shortens the measuring window and the warm-up, never the grid.
Every point is a closed loop at steady state (study.py): requests in flight at their
stationary contexts from the first step, refilled as they finish, measured over a window
after a warm-up; throughput counts every output token of the window (prefill amortised).

Study setups ([D] where the publication gives no number):

* online: 3 models x ShareGPT/WildChat/HumanEval x SLO 100/150/200 ms x 5 systems; the batch
  grid BATCH_GRID is searched by one vmapped sweep per dataset (all models and systems
  together) and extended by doubling while a system still meets the loosest SLO
  (study.slo_sweep, up to study.MAX_SEARCH_BATCH).
* offline: LLaMA3-70B at batch 256/512/1024 and OPT-175B at 16/32/64 on arxiv-sum and
  write-doc; refills are prefilled at once (no prefill token budget: a batch job).
* energy: LLaMA3-70B and OPT-175B; online = WildChat at each system's best batch under
  150 ms; offline = arxiv-sum at the middle offline batch. Joules per output token by
  component, static power included.
* ablation: LLaMA3-70B on arxiv-sum at batch 32 and 512 (512 overflows HBM, so placement
  and scheduling matter); attention time over the window (migration sharing its links
  included) and throughput, each relative to LS-PIM.
* scaling: LLaMA3-70B on write-doc, a batch of 1024 requests, (TP, PP) over 4-32 GPUs, with
  every tier's device count scaled by GPUs / 8 (the PAM node has 8 GPUs); past 8 GPUs a
  tensor-parallel group spans nodes and all-reduces over RDMA.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import jax

from pamjax.errors import UnknownNameError
from pamjax.hardware import Platform, get_platform
from pamjax.studies import plots
from pamjax.studies.report import write_csv
from pamjax.studies.study import (
    BOUND_COLUMNS,
    MAX_SEARCH_BATCH,
    peak_under_slo,
    run_sweep,
    slo_sweep,
)
from pamjax.systems import MAIN_SYSTEMS, Knobs
from pamjax.types import ENERGY_COMPONENTS

STUDIES = ("online", "offline", "energy", "ablation", "scaling")
MODELS3 = ("qwen2.5-32b", "llama3-70b", "opt-175b")
ONLINE_DATASETS = ("sharegpt", "wildchat", "humaneval")
OFFLINE = {"llama3-70b": (256, 512, 1024), "opt-175b": (16, 32, 64)}
OFFLINE_DATASETS = ("arxiv-sum", "write-doc")
SLOS_MS = (100.0, 150.0, 200.0)
BATCH_GRID = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
ABLATION_VARIANTS = ("ls-pim", "pam-no-pamattention", "pam-no-mapping", "pam-no-scheduling",
                     "pam")
ABLATION_BATCHES = (32, 512)
SCALING_SYSTEMS = ("l-pim", "pam")
SCALING_CONFIGS = ((4, 1), (8, 1), (4, 2), (2, 4), (16, 1), (8, 2), (4, 4), (32, 1), (8, 4))
ENERGY_MODELS = ("llama3-70b", "opt-175b")

BOUND = list(BOUND_COLUMNS)
STUDY_COLUMNS = {
    "online": ["model", "dataset", "slo_ms", "system", "max_batch", "search_limited", "batch",
               "throughput_tokens_per_s", "tpot_p99_ms", "mean_context_tokens", "oom",
               *BOUND],
    "offline": ["model", "dataset", "batch", "system", "throughput_tokens_per_s",
                "mean_batch", "mean_context_tokens", "tpot_p99_ms", "oom", *BOUND],
    "energy": ["model", "dataset", "mode", "system", "energy_j_per_token",
               *ENERGY_COMPONENTS, "throughput_tokens_per_s", *BOUND],
    "ablation": ["model", "dataset", "batch", "variant", "attention_time_s",
                 "speedup_vs_ls_pim", "throughput_tokens_per_s", "throughput_vs_ls_pim",
                 "migrated_token_fraction_per_step", *BOUND],
    "scaling": ["model", "dataset", "tp", "pp", "system", "throughput_tokens_per_s", *BOUND],
}
"""Every study's throughput sits beside its physical bound (pamjax.studies.bounds.run_bound,
via study.run_sweep), whole-window throughput (prefill amortised) throughout."""

OFFLINE_KNOBS = Knobs(prefill_token_budget=10**9)


def _knobs(base: Knobs | None, overrides: dict | None) -> Knobs | None:
    """A study's knobs (None = the defaults) with the caller's overrides on top (`pamjax
    reproduce --knob`): an override replaces the study's own value."""
    return dataclasses.replace(base or Knobs(), **overrides) if overrides else base


def _window(quick: bool) -> dict:
    """Measuring window and warm-up of every point (study.run_sweep), in engine steps."""
    return {"steps": 64, "warmup": 16} if quick else {"steps": 256, "warmup": 32}


def _with_bound(row: dict, sweep_row: dict) -> dict:
    """``row`` plus the throughput and bound columns of ``sweep_row``; a point that did not
    fit gets throughput 0 and no bound."""
    fits = not sweep_row["oom"]
    row["throughput_tokens_per_s"] = sweep_row["throughput_tokens_per_s"] if fits else 0.0
    row.update({c: sweep_row[c] if fits else None for c in BOUND})
    return row


def online(quick: bool, progress: bool, *, platform: Platform | None = None,
           knob_overrides: dict | None = None) -> list[dict]:
    """Online study rows: peak throughput and max batch under each SLO (module docstring).

    Args:
      quick: shorter windows (same grid); progress: progress lines on stderr.
      platform: the hardware (None = the preset); knob_overrides: Knobs fields set on top
        of the study's knobs.
    """
    rows = []
    for dataset in ONLINE_DATASETS:
        sweep = slo_sweep(MAIN_SYSTEMS, list(MODELS3), dataset, BATCH_GRID, SLOS_MS,
                          platform=platform, knobs=_knobs(None, knob_overrides),
                          progress=progress, **_window(quick))
        for model in MODELS3:
            mine = [r for r in sweep if r["model"] == model]
            for slo in SLOS_MS:
                for system, best in peak_under_slo(mine, slo).items():
                    met = best["max_batch"] > 0
                    rows.append({
                        "model": model, "dataset": dataset, "slo_ms": slo, "system": system,
                        "max_batch": best["max_batch"],
                        "search_limited": best["max_batch"] == MAX_SEARCH_BATCH,
                        "batch": best["batch"] if met else None,
                        "throughput_tokens_per_s": best["throughput_tokens_per_s"],
                        "tpot_p99_ms": best["tpot_p99_ms"] if met else None,
                        "mean_context_tokens": best["mean_context_tokens"] if met else None,
                        "oom": not met and best["oom"],
                        **{c: best[c] if met else None for c in BOUND}})
    return rows


def offline(quick: bool, progress: bool, *, platform: Platform | None = None,
            knob_overrides: dict | None = None) -> list[dict]:
    """Offline study rows: steady-state throughput at fixed batches.

    Args:
      quick: shorter windows (same grid); progress: progress lines on stderr.
      platform: the hardware (None = the preset); knob_overrides: Knobs fields set on top
        of the study's knobs.
    """
    rows = []
    for model, batches in OFFLINE.items():
        for dataset in OFFLINE_DATASETS:
            sweep = run_sweep(MAIN_SYSTEMS, model, dataset, batches, platform=platform,
                              knobs=_knobs(OFFLINE_KNOBS, knob_overrides), progress=progress,
                              **_window(quick))
            rows += [_with_bound({"model": model, "dataset": dataset, "batch": r["batch"],
                                  "system": r["system"], "oom": r["oom"],
                                  "mean_batch": r["mean_batch"],
                                  "mean_context_tokens": r["mean_context_tokens"],
                                  "tpot_p99_ms": r["tpot_p99_ms"]}, r)
                     for r in sweep]
    return rows


def energy(quick: bool, progress: bool, *, platform: Platform | None = None,
           knob_overrides: dict | None = None) -> list[dict]:
    """Energy study rows: joules per output token by component, online and offline.

    Args:
      quick: shorter windows (same grid); progress: progress lines on stderr.
      platform: the hardware (None = the preset); knob_overrides: Knobs fields set on top
        of the study's knobs.
    """
    rows = []
    for model in ENERGY_MODELS:
        sweep = slo_sweep(MAIN_SYSTEMS, [model], "wildchat", BATCH_GRID, [150.0],
                          platform=platform, knobs=_knobs(None, knob_overrides),
                          progress=progress, **_window(quick))
        picked = list(peak_under_slo(sweep, 150.0).values())
        picked += run_sweep(MAIN_SYSTEMS, model, "arxiv-sum", [OFFLINE[model][1]],
                            platform=platform, knobs=_knobs(OFFLINE_KNOBS, knob_overrides),
                            progress=progress, **_window(quick))
        for r in picked:
            online_row = "max_batch" in r
            fits = not r["oom"] and (not online_row or r["max_batch"] > 0)
            row = {"model": model, "dataset": "wildchat" if online_row else "arxiv-sum",
                   "mode": "online" if online_row else "offline", "system": r["system"],
                   "energy_j_per_token": r["energy_j_per_token"] if fits else None}
            row.update({c: r[f"energy_{c}"] if fits else None for c in ENERGY_COMPONENTS})
            rows.append(_with_bound(row, dict(r, oom=not fits)))
    return rows


def ablation(quick: bool, progress: bool, *, platform: Platform | None = None,
             knob_overrides: dict | None = None) -> list[dict]:
    """Ablation rows: attention time and throughput of PAM without each component, relative
    to LS-PIM.

    Args:
      quick: shorter windows (same grid); progress: progress lines on stderr.
      platform: the hardware (None = the preset); knob_overrides: Knobs fields set on top
        of the study's knobs.
    """
    sweep = run_sweep(ABLATION_VARIANTS, "llama3-70b", "arxiv-sum", ABLATION_BATCHES,
                      platform=platform, knobs=_knobs(OFFLINE_KNOBS, knob_overrides),
                      progress=progress, **_window(quick))
    base = {r["batch"]: r for r in sweep if r["system"] == "ls-pim"}

    def ratio(a, b):
        return a / b if b and a is not None else None

    return [_with_bound({
        "model": "llama3-70b", "dataset": "arxiv-sum", "batch": r["batch"],
        "variant": r["system"], "attention_time_s": r["attention_time_s"],
        "speedup_vs_ls_pim": ratio(base[r["batch"]]["attention_time_s"],
                                   r["attention_time_s"]),
        "throughput_vs_ls_pim": ratio(r["throughput_tokens_per_s"],
                                      base[r["batch"]]["throughput_tokens_per_s"]),
        "migrated_token_fraction_per_step": r["migrated_token_fraction_per_step"]}, r)
        for r in sweep]


def scaled_platform(tp: int, pp: int, base: Platform | None = None):
    """A node's hardware in proportion to ``tp x pp`` GPUs: every tier's device count of
    ``base`` (default the PAM node, 8 GPUs) scaled by GPUs / base GPUs (at least 1), GPUs
    split TP x PP."""
    base = base or get_platform()
    gpus = tp * pp
    overrides = {f"{t.name}.num_devices": max(1, round(t.num_devices * gpus
                                                       / base.gpu.num_gpus))
                 for t in base.tiers}
    return base.with_parallelism(tp, pp).with_overrides(overrides)


def scaling(quick: bool, progress: bool, *, platform: Platform | None = None,
            knob_overrides: dict | None = None) -> list[dict]:
    """Scaling rows: throughput over (TP, PP) with hardware scaled to the GPUs.

    Args:
      quick: shorter windows (same grid); progress: progress lines on stderr.
      platform: the hardware (None = the preset); knob_overrides: Knobs fields set on top
        of the study's knobs.
    """
    platforms = {f"{tp}x{pp}": scaled_platform(tp, pp, platform)
                 for tp, pp in SCALING_CONFIGS}
    sweep = run_sweep(SCALING_SYSTEMS, "llama3-70b", "write-doc", [1024], platforms=platforms,
                      knobs=_knobs(OFFLINE_KNOBS, knob_overrides), progress=progress,
                      **_window(quick))
    rows = []
    for r in sweep:
        tp, pp = (int(v) for v in r["platform"].split("x"))
        rows.append(_with_bound({"model": "llama3-70b", "dataset": "write-doc", "tp": tp,
                                 "pp": pp, "system": r["system"]}, r))
    return rows


def _plot(study: str, rows: list[dict], path: pathlib.Path) -> None:
    def bars(panel_key, group_key, series_key, value_key, ylabel, title, log=False):
        panels = {}
        for panel in dict.fromkeys(panel_key(r) for r in rows):
            mine = [r for r in rows if panel_key(r) == panel]
            groups = list(dict.fromkeys(group_key(r) for r in mine))
            names = list(dict.fromkeys(r[series_key] for r in mine))
            table = {(group_key(r), r[series_key]): r.get(value_key) for r in mine}
            panels[panel] = (groups, {n: [table.get((g, n)) or None for g in groups]
                                      for n in names})
        plots.grouped_bars(path, panels, ylabel=ylabel, title=title, log=log)

    if study == "online":
        bars(lambda r: r["dataset"], lambda r: f"{r['model']}\n{r['slo_ms']:g} ms", "system",
             "throughput_tokens_per_s", "tokens/s (log)",
             "Peak throughput under the TPOT p99 SLO (OOM: no batch fits)", log=True)
    elif study == "offline":
        bars(lambda r: r["dataset"], lambda r: f"{r['model']}\nbatch {r['batch']}", "system",
             "throughput_tokens_per_s", "tokens/s (log)",
             "Offline steady-state throughput at fixed batch (OOM: out of memory)", log=True)
    elif study == "energy":
        bars(lambda r: r["mode"], lambda r: f"{r['model']}\n{r['dataset']}", "system",
             "energy_j_per_token", "J / output token", "Energy per output token")
    elif study == "ablation":
        bars(lambda r: f"{r['model']}, {r['dataset']}", lambda r: f"batch {r['batch']}",
             "variant", "speedup_vs_ls_pim", "attention speedup vs LS-PIM",
             "Ablation: attention-time speedup over LS-PIM")
    else:
        bars(lambda r: f"{r['model']}, {r['dataset']}, 1024 requests",
             lambda r: f"TP{r['tp']} PP{r['pp']}\n{r['tp'] * r['pp']} GPUs", "system",
             "throughput_tokens_per_s", "tokens/s",
             "Scaling with hardware in proportion to the GPUs")


def reproduce(study: str, out_dir, *, quick: bool = False, progress: bool = True,
              platform: Platform | None = None, knob_overrides: dict | None = None
              ) -> dict[str, pathlib.Path]:
    """Run one study (or ``all``) and write its CSV and PNG.

    Args:
      study: a name of STUDIES or "all"; out_dir: output folder.
      quick: shorter simulated horizons (same grid); progress: progress on stderr.
      platform: the hardware every study runs on (None = the PAM DGX-H100 preset; the
        scaling study scales it); knob_overrides: Knobs fields set on top of each study's
        own knobs (e.g. {"target_rule": "throughput"}).

    Returns:
      {study: path of its CSV} (the PNG sits beside it).

    Raises:
      UnknownNameError: unknown study.
    """
    names = STUDIES if study == "all" else (study,)
    for name in names:
        if name not in STUDIES:
            raise UnknownNameError("study", name, (*STUDIES, "all"))
    out = pathlib.Path(out_dir)
    written = {}
    for name in names:
        start = time.perf_counter()
        if progress:
            print(f"[{name}] running{' (quick)' if quick else ''}...", file=sys.stderr)
        rows = globals()[name](quick, progress, platform=platform,
                               knob_overrides=knob_overrides)
        written[name] = write_csv(out / f"{name}.csv", rows, STUDY_COLUMNS[name])
        _plot(name, rows, out / f"{name}.png")
        if progress:
            print(f"[{name}] wrote {written[name]} and {name}.png in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        # Each compiled CPU program keeps hundreds of memory mappings; dropping them between
        # studies (at worst a recompile of a program a later study shares) keeps `all` far
        # from the kernel's vm.max_map_count, past which XLA aborts the process mid-compile.
        jax.clear_caches()
    return written
