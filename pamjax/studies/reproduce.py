"""The PAM study reproduced: online, offline, energy, ablation and scaling (PAM_SPEC §7-8).

Each study writes ``DIR/<study>.csv`` (columns exactly as listed in STUDY_COLUMNS) and
``DIR/<study>.png``. ``quick`` shortens the simulated horizon (steps), never the grid.

Study setups ([D] where the publication gives no number):

* online: 3 models x ShareGPT/WildChat/HumanEval x SLO 100/150/200 ms x 5 systems; batch
  grid BATCH_GRID searched by one vmapped sweep per dataset (all models and systems
  together); an offline queue keeps the batch full (study.py documents the SLO metric).
* offline: LLaMA3-70B at batch 256/512/1024 and OPT-175B at 16/32/64 on arxiv-sum and
  write-doc; the whole batch may be prefilled at once (no prefill token budget); the
  throughput is the decode throughput at that batch (decode tokens over the time of the
  steps that only decode), since with 4K-token prompts a short horizon is otherwise mostly
  prefill. Scaling reports the same quantity.
* energy: LLaMA3-70B and OPT-175B; online = WildChat at each system's largest batch under
  150 ms; offline = arxiv-sum at the middle offline batch. Joules per output token by
  component.
* ablation: LLaMA3-70B on arxiv-sum at batch 32 and 512 (512 overflows HBM, so placement
  and scheduling matter); attention time summed over the horizon, speedup = LS-PIM's
  attention time / the variant's.
* scaling: LLaMA3-70B on write-doc, a batch of 1024 requests, (TP, PP) over 4-32 GPUs, with
  every tier's device count scaled by GPUs / 8 (the PAM node has 8 GPUs).
"""

from __future__ import annotations

import pathlib
import sys
import time

from pamjax.errors import UnknownNameError
from pamjax.hardware import get_platform
from pamjax.studies import plots
from pamjax.studies.report import write_csv
from pamjax.studies.study import BOUND_COLUMNS, peak_under_slo, run_sweep
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
    "online": ["model", "dataset", "slo_ms", "system", "max_batch",
               "throughput_tokens_per_s", "oom", *BOUND],
    "offline": ["model", "dataset", "batch", "system", "throughput_tokens_per_s", "oom",
                *BOUND],
    "energy": ["model", "dataset", "mode", "system", "energy_j_per_token", "gpu_compute",
               "gpu_memory", "pim_attention", "reduction", "transfer", "migration",
               "throughput_tokens_per_s", *BOUND],
    "ablation": ["model", "dataset", "batch", "variant", "attention_time_s",
                 "speedup_vs_ls_pim", "throughput_tokens_per_s", *BOUND],
    "scaling": ["model", "dataset", "tp", "pp", "system", "throughput_tokens_per_s", *BOUND],
}
"""Every study's throughput sits beside its physical bound (pamjax.studies.bounds.run_bound, via
study.run_sweep): whole-run for online rows, decode-only where the study reports decode
throughput (offline, offline energy, ablation, scaling)."""

OFFLINE_KNOBS = Knobs(prefill_token_budget=10**9)


def _steps(quick: bool, full: int, short: int) -> int:
    return short if quick else full


def _with_bound(row: dict, sweep_row: dict, decode: bool) -> dict:
    """``row`` plus the throughput and bound columns of ``sweep_row`` (decode-only or whole
    run); a point that did not fit gets throughput 0 and no bound."""
    prefix = "decode_" if decode else ""
    fits = not sweep_row["oom"]
    row["throughput_tokens_per_s"] = sweep_row[f"{prefix}throughput_tokens_per_s"] \
        if fits else 0.0
    row.update({c: sweep_row[f"{prefix}{c}"] if fits else None for c in BOUND})
    return row


def online(quick: bool, progress: bool) -> list[dict]:
    """Online study rows: peak throughput and max batch under each SLO (module docstring).

    Args:
      quick: shorter horizons (same grid); progress: progress lines on stderr.
    """
    rows = []
    for dataset in ONLINE_DATASETS:
        sweep = run_sweep(MAIN_SYSTEMS, list(MODELS3), dataset, BATCH_GRID,
                          steps=_steps(quick, 256, 64), progress=progress)
        for model in MODELS3:
            mine = [r for r in sweep if r["model"] == model]
            for slo in SLOS_MS:
                for system, best in peak_under_slo(mine, slo).items():
                    rows.append({"model": model, "dataset": dataset, "slo_ms": slo,
                                 "system": system, "max_batch": best["max_batch"],
                                 "throughput_tokens_per_s": best["throughput_tokens_per_s"],
                                 "oom": best["max_batch"] == 0 and best["oom"],
                                 **{c: best[c] if best["max_batch"] else None
                                    for c in BOUND}})
    return rows


def offline(quick: bool, progress: bool) -> list[dict]:
    """Offline study rows: decode throughput at fixed batches, 4K-token prompts.

    Args:
      quick: shorter horizons (same grid); progress: progress lines on stderr.
    """
    rows = []
    for model, batches in OFFLINE.items():
        for dataset in OFFLINE_DATASETS:
            sweep = run_sweep(MAIN_SYSTEMS, model, dataset, batches,
                              steps=_steps(quick, 192, 48), knobs=OFFLINE_KNOBS,
                              progress=progress)
            rows += [_with_bound({"model": model, "dataset": dataset, "batch": r["batch"],
                                  "system": r["system"], "oom": r["oom"]}, r, decode=True)
                     for r in sweep]
    return rows


def energy(quick: bool, progress: bool) -> list[dict]:
    """Energy study rows: joules per output token by component, online and offline.

    Args:
      quick: shorter horizons (same grid); progress: progress lines on stderr.
    """
    rows = []
    components = ENERGY_COMPONENTS
    for model in ENERGY_MODELS:
        sweep = run_sweep(MAIN_SYSTEMS, model, "wildchat", BATCH_GRID,
                          steps=_steps(quick, 256, 64), progress=progress)
        picked = peak_under_slo(sweep, 150.0).values()
        batch = OFFLINE[model][1]
        picked = list(picked) + run_sweep(MAIN_SYSTEMS, model, "arxiv-sum", [batch],
                                          steps=_steps(quick, 192, 48), knobs=OFFLINE_KNOBS,
                                          progress=progress)
        for r in picked:
            online_row = "max_batch" in r
            fits = not r["oom"] and (not online_row or r["max_batch"] > 0)
            row = {"model": model, "dataset": "wildchat" if online_row else "arxiv-sum",
                   "mode": "online" if online_row else "offline", "system": r["system"],
                   "energy_j_per_token": r["energy_j_per_token"] if fits else None}
            row.update({c: r[f"energy_{c}"] if fits else None for c in components})
            if online_row:
                row.update(throughput_tokens_per_s=r["throughput_tokens_per_s"],
                           **{c: r[c] if fits else None for c in BOUND})
                rows.append(row)
            else:
                rows.append(_with_bound(row, r, decode=True))
    return rows


def ablation(quick: bool, progress: bool) -> list[dict]:
    """Ablation rows: attention time of PAM without each component vs LS-PIM.

    Args:
      quick: shorter horizons (same grid); progress: progress lines on stderr.
    """
    sweep = run_sweep(ABLATION_VARIANTS, "llama3-70b", "arxiv-sum", ABLATION_BATCHES,
                      steps=_steps(quick, 192, 48), knobs=OFFLINE_KNOBS, progress=progress)
    base = {r["batch"]: r["attention_time_s"] for r in sweep if r["system"] == "ls-pim"}
    return [_with_bound({"model": "llama3-70b", "dataset": "arxiv-sum", "batch": r["batch"],
                         "variant": r["system"], "attention_time_s": r["attention_time_s"],
                         "speedup_vs_ls_pim": base[r["batch"]] / r["attention_time_s"]
                         if r["attention_time_s"] > 0 else None}, r, decode=True)
            for r in sweep]


def scaled_platform(tp: int, pp: int):
    """The PAM node's hardware in proportion to ``tp x pp`` GPUs (8 GPUs = one node): every
    tier's device count scaled by GPUs / 8 (at least 1), GPUs split TP x PP."""
    base = get_platform()
    gpus = tp * pp
    overrides = {f"{t.name}.num_devices": max(1, round(t.num_devices * gpus / 8))
                 for t in base.tiers}
    return base.with_parallelism(tp, pp).with_overrides(overrides)


def scaling(quick: bool, progress: bool) -> list[dict]:
    """Scaling rows: decode throughput over (TP, PP) with hardware scaled to the GPUs.

    Args:
      quick: shorter horizons (same grid); progress: progress lines on stderr.
    """
    platforms = {f"{tp}x{pp}": scaled_platform(tp, pp) for tp, pp in SCALING_CONFIGS}
    sweep = run_sweep(SCALING_SYSTEMS, "llama3-70b", "write-doc", [1024], platforms=platforms,
                      requests_per_slot=1, steps=_steps(quick, 192, 48), knobs=OFFLINE_KNOBS,
                      progress=progress)
    rows = []
    for r in sweep:
        tp, pp = (int(v) for v in r["platform"].split("x"))
        rows.append(_with_bound({"model": "llama3-70b", "dataset": "write-doc", "tp": tp,
                                 "pp": pp, "system": r["system"]}, r, decode=True))
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
             "throughput_tokens_per_s", "decode tokens/s (log)",
             "Offline decode throughput at fixed batch (OOM: out of memory)", log=True)
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
             "throughput_tokens_per_s", "decode tokens/s",
             "Scaling with hardware in proportion to the GPUs")


def reproduce(study: str, out_dir, *, quick: bool = False, progress: bool = True
              ) -> dict[str, pathlib.Path]:
    """Run one study (or ``all``) and write its CSV and PNG.

    Args:
      study: a name of STUDIES or "all"; out_dir: output folder.
      quick: shorter simulated horizons (same grid); progress: progress on stderr.

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
        rows = globals()[name](quick, progress)
        written[name] = write_csv(out / f"{name}.csv", rows, STUDY_COLUMNS[name])
        _plot(name, rows, out / f"{name}.png")
        if progress:
            print(f"[{name}] wrote {written[name]} and {name}.png in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return written
