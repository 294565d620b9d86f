"""Batch sweeps and peak throughput under a latency SLO (PAM_SPEC §8).

Every (system, batch) point of a sweep is one SimParams; points are stacked and run by
``vmap``-ed, jitted rollouts (simulation.run_batch): batch sizes within a factor of 8 share
one compiled program (slot_classes), so an SLO search over 1..2048 compiles 3-4 times, not
once per point.

Serving setup of a sweep point: ``requests_per_slot x batch`` requests of the dataset, all
waiting at t = 0 (an offline queue, so continuous batching keeps ``batch`` requests running),
simulated for a fixed horizon of steps.

Definitions used for the SLO (documented here because results depend on them):

* TPOT of a request = its mean time per output token after the first: (finish - first
  token) / (output - 1) for requests that finished in the horizon, (end of horizon - first
  token) / (generated - 1) for those still running with at least two tokens. Decode steps
  that also prefill newly admitted prompts are longer (vLLM's prefill priority stalls
  decoding) and count in it. ``tpot_p99_ms`` is the 99th percentile over those requests.
* A batch *meets* an SLO of S ms when ``tpot_p99_ms <= S`` and it *fits* when the engine ran
  ``batch`` requests concurrently at some step (admission reserves every request's whole KV;
  a batch that the enabled tiers cannot hold never reaches ``batch``): otherwise ``oom``.
* Max batch under the SLO = the largest batch of the grid that meets and fits (flagged
  ``at_grid_edge`` when it is the grid's largest); peak throughput under the SLO = the
  highest output tokens per simulated second (decode and first tokens over the horizon)
  among the batches that meet and fit.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pamjax.errors import ConfigError
from pamjax.hardware import TIER_NAMES, Platform, get_platform
from pamjax.locality import AccessModel
from pamjax.models import Model
from pamjax.simulation import choose_page_size, index_config, make_config, run_batch
from pamjax.studies.bounds import bound_columns
from pamjax.systems import Knobs, System, make_params, max_bank_groups
from pamjax.types import ENERGY_COMPONENTS, STATUS_FINISHED, STATUS_RUNNING
from pamjax.workload import Workload, synthetic

BOUND_COLUMNS = ("bound_tokens_per_s", "binding_resource", "efficiency")
"""Columns every sweep row gets from pamjax.studies.bounds, also with a ``decode_`` prefix."""

UNIT_BUDGET = 9 << 19
"""Tracked KV units across all vmapped points before the page size grows (memory/speed)."""


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One configuration of a sweep (platform None = the default preset)."""

    system: System | str
    batch: int
    model: Model | str
    platform: Platform | None = None
    label: str = ""
    access: AccessModel | None = None


def slot_classes(batches, ratio: int = 8) -> list[list[int]]:
    """Group sorted batch sizes so each group spans less than a factor ``ratio``.

    Each group runs as one vmapped rollout with as many slots as its largest batch, so a
    small batch does not pay for the largest batch's slots; a sweep compiles once per group.

    Args:
      batches: batch sizes (any order, duplicates allowed); ratio: span limit per group.

    Returns:
      ascending groups of distinct batch sizes, e.g. [16, 32, 64, 128] -> [[16, 32, 64],
      [128]] for ratio 8.
    """
    groups: list[list[int]] = []
    for b in sorted(set(batches)):
        if groups and b < ratio * groups[-1][0]:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def run_sweep(systems, model, workload: Workload | str, batches, *, steps: int = 256,
              requests_per_slot: int = 2, seed: int = 0, platform: Platform | None = None,
              platforms: dict | None = None, access: AccessModel | None = None,
              knobs: Knobs | None = None, page_size: int | None = None,
              chunk_steps: int = 64, class_ratio: int = 8, progress: bool = False
              ) -> list[dict]:
    """Simulate every (model, system, batch) point with vmapped rollouts; one row each.

    Args:
      systems: system names (or System objects).
      model: a model (name or Model, e.g. from config_files.load_model_file), or a list of
        them (all vmapped together); rows carry the model's name.
      workload: a host Workload (used as given, arrivals included) or a dataset name
        (``requests_per_slot x max(batches)`` requests, all at t = 0).
      batches: batch sizes (max concurrent requests).
      steps: simulated steps (horizon) per point.
      page_size: tokens per KV unit (default: the smallest keeping all tracked units
        within UNIT_BUDGET); one page size for the whole sweep.
      class_ratio: batch sizes within this factor share one compiled, vmapped rollout.
      platforms: {label: Platform} to sweep hardware design points too (rows get
        ``platform`` = label); default: ``platform`` (or the preset) alone, rows labelled
        with its name.

    Returns:
      one dict per (system, batch), in that order: system, batch, throughput_tokens_per_s,
      decode_throughput_tokens_per_s (decode tokens over the time of decode-only steps),
      tpot_p99_ms, tpot_p50_ms, peak_concurrency, oom, energy_j_per_token (+ per component),
      attention_time_s, tier token and attention shares, migrated fraction, page_size,
      and BOUND_COLUMNS (whole-run, then ``decode_``-prefixed): pamjax.studies.bounds.run_bound of
      the requests the point admitted, at its peak concurrency.
    """
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ConfigError("batches", batches, "need at least one batch size >= 1")
    if steps < 1:
        raise ConfigError("steps", steps, "must be >= 1")
    systems = list(systems)  # names or System objects; rows and keys use the names
    models = [model] if isinstance(model, (str, Model)) else list(model)
    # Rows name their platform: the label of a design point, else the platform's name.
    hardware = platforms or {(platform or get_platform()).name: platform}
    if isinstance(workload, str):
        workload = synthetic(workload, requests_per_slot * batches[-1], seed=seed)
    groups = slot_classes(batches, class_ratio)
    variants = len(systems) * len(models) * len(hardware)
    rows_tracked = sum(variants * len(g) * g[-1] for g in groups)
    page = page_size or choose_page_size(rows_tracked, workload.max_context, UNIT_BUDGET)
    by_point = {}
    for index, group in enumerate(groups):
        points = [SweepPoint(s, b, m, hw, label, access) for label, hw in hardware.items()
                  for m in models for s in systems for b in group]
        label = f"batch {group[0]}-{group[-1]} ({index + 1}/{len(groups)})"
        rows = _run_group(points, workload, steps, seed, access, knobs, page, chunk_steps,
                          label if progress else None)
        by_point.update({_key(r): r for r in rows})
    return [by_point[(hw, _model_name(m), _system_name(s), b)] for hw in hardware
            for m in models for s in systems for b in batches]


def _model_name(model: Model | str) -> str:
    return model if isinstance(model, str) else model.name


def _system_name(system: System | str) -> str:
    return system if isinstance(system, str) else system.name


def _key(row):
    return row["platform"], row["model"], row["system"], row["batch"]


def _run_group(points, workload, steps, seed, access, knobs, page, chunk_steps, label):
    config = make_config(workload, max(p.batch for p in points), page_size=page,
                         padded_bank_groups=max(max_bank_groups(p.platform) for p in points))
    params = [make_params(p.system, p.model, p.platform, access, max_batch=p.batch,
                          page_size=page, knobs=knobs) for p in points]
    state, metrics = run_batch(config, params, workload, steps, seeds=seed,
                               chunk_steps=chunk_steps, progress=label)
    return [point_row(p, index_config(metrics, i), index_config(state, i), workload, page)
            for i, p in enumerate(points)]


def request_tpot_s(state, workload: Workload) -> np.ndarray:
    """TPOT (s) of every request with at least two output tokens so far (see module doc).

    Args:
      state: final EngineState of one configuration (host arrays).
      workload: the workload it ran.

    Returns:
      f64 [n] seconds per output token after the first: finished requests, then running
      ones (their clock so far).
    """
    now = float(state.clock_whole) + float(state.clock_frac)
    first = np.asarray(state.req_first_token_s, np.float64)
    finish = np.asarray(state.req_finish_s, np.float64)
    out = np.asarray(workload.output_tokens)
    done = np.isfinite(finish) & (out > 1)
    tpot = [(finish[done] - first[done]) / (out[done] - 1)]
    slots = np.asarray(state.slot_request)
    generated = np.asarray(state.slot_generated)
    live = (slots >= 0) & (generated >= 2)
    tpot.append((now - first[slots[live]]) / (generated[live] - 1))
    return np.concatenate(tpot)


def _percentile(values, q):
    return float(np.percentile(values, q)) if values.size else float("nan")


def point_row(point: SweepPoint, m, state, workload: Workload, page: int) -> dict:
    """The result row of one configuration (columns: see :func:`run_sweep`).

    Args:
      point: the configuration; m: its StepMetrics stacked over steps [S] (host arrays);
      state: its final EngineState; workload: the workload it ran; page: tokens per unit.
    """
    step_time = np.asarray(m.step_time_s, np.float64)
    tpot = request_tpot_s(state, workload)
    decode = np.asarray(m.decode_requests, np.float64)
    pure = (decode > 0) & (np.asarray(m.prefill_requests) == 0)  # decode-only steps
    tokens = float(np.sum(m.output_tokens))
    elapsed = float(np.sum(step_time) + np.sum(m.idle_s))
    concurrency = np.asarray(m.decode_requests) + np.asarray(m.prefill_requests)
    peak = int(concurrency.max()) if concurrency.size else 0
    energy = np.asarray(m.energy_pj, np.float64).sum(0) * 1e-12 / max(tokens, 1.0)
    held = (np.asarray(m.tier_units, np.float64) * step_time[:, None]).sum(0)
    attention = np.asarray(m.tier_attention_s, np.float64).sum(0)
    units = np.maximum(np.asarray(m.tier_units, np.float64).sum(-1), 1.0)
    migrated = np.asarray(m.migrated_units, np.float64) / units
    row = {
        "platform": point.label,
        "model": _model_name(point.model),
        "system": _system_name(point.system),
        "batch": point.batch,
        "throughput_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "decode_throughput_tokens_per_s": float(decode[pure].sum() / step_time[pure].sum())
        if pure.any() else 0.0,
        "tpot_p99_ms": _percentile(tpot, 99) * 1e3,
        "tpot_p50_ms": _percentile(tpot, 50) * 1e3,
        "peak_concurrency": peak,
        "oom": peak < point.batch,
        "energy_j_per_token": float(energy.sum()),
        "attention_time_s": float(np.sum(m.attention_s, dtype=np.float64)),
        "migrated_token_fraction_per_step": float(migrated[decode > 0].mean())
        if np.any(decode > 0) else 0.0,
        "page_size": page,
    }
    row.update({f"energy_{c}": float(e) for c, e in zip(ENERGY_COMPONENTS, energy)})
    row.update(_bound_columns(point, row, state, workload))
    total_held, total_attention = held.sum(), attention.sum()
    for i, tier in enumerate(TIER_NAMES):
        row[f"{tier}_token_share"] = float(held[i] / total_held) if total_held else 0.0
        row[f"{tier}_attention_share"] = float(attention[i] / total_attention) \
            if total_attention else 0.0
    return row


def _bound_columns(point: SweepPoint, row: dict, state, workload: Workload) -> dict:
    """The row's whole-run and decode-only throughput beside pamjax.studies.bounds.run_bound of the
    requests it admitted (columns bound_tokens_per_s, binding_resource, efficiency and the
    same with a ``decode_`` prefix; None when no request was admitted)."""
    status = np.asarray(state.req_status)
    admitted = (status == STATUS_RUNNING) | (status == STATUS_FINISHED)
    columns = {}
    for prefix, key, prefill in (("", "throughput_tokens_per_s", True),
                                 ("decode_", "decode_throughput_tokens_per_s", False)):
        if not admitted.any() or row["peak_concurrency"] < 1:
            columns.update({f"{prefix}{c}": None for c in BOUND_COLUMNS})
            continue
        columns.update(bound_columns(
            point.system, point.model, row[key], prompts=workload.prompt_tokens[admitted],
            outputs=workload.output_tokens[admitted], concurrency=row["peak_concurrency"],
            prefill=prefill, platform=point.platform, access=point.access, prefix=prefix))
    return columns


def peak_under_slo(rows: list[dict], slo_ms: float) -> dict[str, dict]:
    """Per system (rows of one model and platform): the SLO search's answer, every metric
    of it from one batch.

    Two batches answer the search: the *max batch* (the largest batch of the grid that
    fits and meets the SLO) and the *peak batch* (the one with the highest throughput
    among those; a short horizon can leave the largest batch still ramping up, so they may
    differ). The row returned is the peak batch's own row (its ``batch``, throughput,
    TPOT, energy, shares, bound and efficiency), plus ``peak_batch`` (= ``batch``),
    ``max_batch`` and ``at_grid_edge`` (max_batch is the grid's largest).

    Returns:
      {system: row}. A system with no such batch gets only ``system``, ``model``,
      ``platform``, ``max_batch = peak_batch = 0``, ``throughput_tokens_per_s = 0``,
      ``at_grid_edge`` False, ``oom`` (its smallest batch did not fit), BOUND_COLUMNS None,
      and ``smallest_batch``: the smallest batch's row, to see how far it was.
    """
    result = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["batch"])
        ok = [r for r in mine if not r["oom"] and r["tpot_p99_ms"] <= slo_ms]
        if ok:
            peak = max(ok, key=lambda r: r["throughput_tokens_per_s"])
            best = dict(peak, peak_batch=peak["batch"], max_batch=ok[-1]["batch"],
                        at_grid_edge=ok[-1]["batch"] == mine[-1]["batch"])
        else:
            first = mine[0]
            best = {"system": system, "model": first["model"], "platform": first["platform"],
                    "max_batch": 0, "peak_batch": 0, "throughput_tokens_per_s": 0.0,
                    "at_grid_edge": False, "oom": first["oom"],
                    **dict.fromkeys(BOUND_COLUMNS), "smallest_batch": first}
        result[system] = best
    return result
