"""Batch sweeps and peak throughput under a latency SLO, at steady state (PAM_SPEC §8).

Every (system, batch) point of a sweep is one SimParams; points are stacked and run by
``vmap``-ed, jitted rollouts (simulation.run_batch): batch sizes within a factor of 8 share
one compiled program (slot_classes), so an SLO search over 1..2048 compiles 3-4 times, not
once per point.

Serving setup of a point, a closed loop at steady state (PAM_SPEC §8, revised): ``batch``
requests are in flight from the first step, each at a point of its life drawn from the
closed loop's stationary distribution (workload.steady_state: length-biased requests,
uniform progress; engine.resume places their KV), and a finished request's slot is refilled
from a queue of fresh requests (prefilled as they are admitted). After ``warmup`` steps
(PAM's importance EMA and bank-group activation window settle) the point is measured over
a window of ``steps`` steps. Nothing ramps up from an empty system, so a 3,000-token-output
workload runs at its real contexts, and the prefills in the window are those of the
refills, which amortises prefill time and energy over whole outputs. Every system of a
point serves the same requests (same pool, batch and seed).

Definitions used for the SLO (documented here because results depend on them):

* Throughput = output tokens produced in the window / the window's simulated time.
* TPOT of a request = its time per output token in the window: for a request running when
  the window opens, (its finish, or the window's end) - the window's start, over the tokens
  it produced in the window; for one admitted in the window, from its first token on (its
  prefill step is its TTFT). Decode steps that also prefill newly admitted prompts are
  longer (vLLM's prefill priority stalls decoding) and count. ``tpot_p99_ms`` is the 99th
  percentile over the requests active in the window.
* A batch *fits* when all its in-flight requests got their slot and KV at the start
  (engine.resume: each request's whole prompt + output reserved); otherwise ``oom``.
  ``mean_batch`` is the window's mean number of running requests: below ``batch`` when
  refills cannot keep up (prefill budget, capacity or an exhausted queue).
* A batch *meets* an SLO of S ms when it fits and ``tpot_p99_ms <= S``. Max batch under the
  SLO = the largest batch of the grid that meets it (flagged ``at_grid_edge`` when it is
  the grid's largest); the reported row is the meeting batch with the highest throughput,
  every field from that one batch.
* Stationarity: ``mean_context_tokens`` is the mean context of the decoding requests over
  the window and ``context_drift`` the relative change of that mean from the window's
  first half to its second.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pamjax.errors import ConfigError
from pamjax.hardware import TIER_NAMES, Platform, get_platform
from pamjax.locality import AccessModel
from pamjax.models import Model
from pamjax.simulation import choose_page_size, index_config, make_config, run_batch
from pamjax.studies.bounds import run_bound, window_bound
from pamjax.systems import Knobs, System, kv_capacity_tokens, make_params, max_bank_groups
from pamjax.types import ENERGY_COMPONENTS, STATUS_FINISHED, STATUS_REJECTED
from pamjax.workload import Workload, steady_state, synthetic

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


WARMUP_STEPS = 32
"""Steps before a point's window opens (importance EMA, activation window, scheduler)."""

POOL_REQUESTS = 4096
"""Requests drawn from a dataset to make the population a steady state samples from."""


def run_sweep(systems, model, workload: Workload | str, batches, *, steps: int = 256,
              warmup: int = WARMUP_STEPS, seed: int = 0, platform: Platform | None = None,
              platforms: dict | None = None, access: AccessModel | None = None,
              knobs: Knobs | None = None, page_size: int | None = None,
              chunk_steps: int = 64, class_ratio: int = 8, progress: bool = False
              ) -> list[dict]:
    """Simulate every (model, system, batch) point at steady state; one row each.

    Args:
      systems: system names (or System objects).
      model: a model (name or Model, e.g. from config_files.load_model_file), or a list of
        them (all vmapped together); rows carry the model's name.
      workload: a dataset name (its population: POOL_REQUESTS requests drawn with ``seed``)
        or a host Workload whose request lengths are the population (e.g. a trace; its
        arrivals are not used: a point is a closed loop).
      batches: batch sizes (requests in flight).
      steps: steps of the measuring window per point; warmup: steps before it.
      seed: seeds the population, the steady-state draw and the access model.
      page_size: tokens per KV unit (default: the smallest keeping all tracked units
        within UNIT_BUDGET); one page size for the whole sweep.
      class_ratio: batch sizes within this factor share one compiled, vmapped rollout.
      platforms: {label: Platform} to sweep hardware design points too (rows get
        ``platform`` = label); default: ``platform`` (or the preset) alone, rows labelled
        with its name.

    Returns:
      one dict per (system, batch), in that order: system, batch, throughput_tokens_per_s,
      decode_throughput_tokens_per_s (decode tokens over the time of decode-only steps),
      tpot_p99_ms, tpot_p50_ms, mean_batch, oom, mean_context_tokens, context_drift,
      energy_j_per_token (+ per component), attention_time_s, tier token and attention
      shares, migrated fraction, page_size, window_s, and BOUND_COLUMNS (whole-run, then
      ``decode_``-prefixed): pamjax.studies.bounds.run_bound of the point's requests at
      its batch.
    """
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ConfigError("batches", batches, "need at least one batch size >= 1")
    for field, value in (("steps", steps), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(field, value, "must be an integer >= 1")
    systems = list(systems)  # names or System objects; rows and keys use the names
    models = [model] if isinstance(model, (str, Model)) else list(model)
    # Rows name their platform: the label of a design point, else the platform's name.
    hardware = platforms or {(platform or get_platform()).name: platform}
    pool = synthetic(workload, POOL_REQUESTS, seed=seed) if isinstance(workload, str) \
        else workload
    groups = slot_classes(batches, class_ratio)
    variants = len(systems) * len(models) * len(hardware)
    rows_tracked = sum(variants * len(g) * g[-1] for g in groups)
    page = page_size or choose_page_size(rows_tracked, pool.max_context, UNIT_BUDGET)
    by_point = {}
    for index, group in enumerate(groups):
        points = [SweepPoint(s, b, m, hw, label, access) for label, hw in hardware.items()
                  for m in models for s in systems for b in group]
        label = f"batch {group[0]}-{group[-1]} ({index + 1}/{len(groups)})"
        requests = steady_requests(pool, group[-1], warmup + steps)
        work = {b: steady_state(pool, b, requests, seed=seed) for b in group}
        rows = _run_group(points, work, steps, warmup, seed, access, knobs, page, chunk_steps,
                          label if progress else None)
        by_point.update({_key(r): r for r in rows})
    return [by_point[(hw, _model_name(m), _system_name(s), b)] for hw in hardware
            for m in models for s in systems for b in batches]


MAX_SEARCH_BATCH = 16384
"""Largest batch an SLO search tries (:func:`slo_sweep`); reaching it is reported."""


def slo_sweep(systems, models, workload, batches, slo_ms, *,
              max_batch: int = MAX_SEARCH_BATCH, **kwargs) -> list[dict]:
    """:func:`run_sweep` over ``batches``, extended until the SLO or the KV capacity binds.

    While a (model, system)'s largest batch so far fits and meets the loosest SLO, its
    batch is doubled (up to ``max_batch``) and simulated: the search never stops at the
    grid's edge while the system could take more (issue: a max batch reported as ">= 2048"
    under every SLO). Rows of a (model, system) whose search stopped at ``max_batch`` while
    still meeting it say so through ``peak_under_slo``'s ``at_grid_edge``.

    Args:
      systems, models, workload, batches: as for :func:`run_sweep` (models a list).
      slo_ms: the SLOs the search serves (ms); the loosest decides the extension.
      max_batch: the largest batch tried.
      **kwargs: further :func:`run_sweep` arguments.

    Returns:
      run_sweep rows, the extensions appended.
    """
    models = [models] if isinstance(models, (str, Model)) else list(models)
    loosest = max(slo_ms)
    rows = run_sweep(systems, models, workload, batches, **kwargs)
    top = max(batches)
    while top < max_batch:
        still = {(r["model"], r["system"]) for r in rows
                 if r["batch"] == top and not r["oom"] and r["tpot_p99_ms"] <= loosest}
        if not still:
            break
        top = min(2 * top, max_batch)
        more = run_sweep(sorted({s for _, s in still}),
                         [m for m in models if _model_name(m) in {m for m, _ in still}],
                         workload, [top], **kwargs)
        rows += [r for r in more if (r["model"], r["system"]) in still]
    return rows


def inflight_kv_tokens(pool: Workload) -> float:
    """Mean KV tokens an in-flight request of ``pool``'s steady state reserves.

    engine.resume reserves a request's whole KV (prompt + output - 1 tokens), and
    workload.steady_state draws in-flight requests with weight output - 1 (length-biased),
    so this is the weighted mean of prompt + output - 1 under those weights.
    """
    weight = pool.output_tokens.astype(np.float64) - 1.0
    need = pool.prompt_tokens.astype(np.float64) + pool.output_tokens - 1.0
    if not weight.sum() > 0:  # only 1-token outputs (steady_state refuses such a pool)
        return float(need.mean())
    return float(np.sum(weight * need) / np.sum(weight))


def kv_fit_batch(system, model, pool: Workload, platform: Platform | None = None) -> int:
    """Most in-flight requests of ``pool``'s steady state that ``system``'s KV tiers hold
    on average (capacity in tokens over :func:`inflight_kv_tokens`).

    A batch above it fits only if its draw is shorter than average; a batch far above it
    cannot fit (:func:`check_batches`). Raises CapacityError when the weights do not fit.
    """
    return int(kv_capacity_tokens(system, model, platform) // inflight_kv_tokens(pool))


FIT_MARGIN = 2.0
""":func:`check_batches` refuses a batch above this many times the largest
:func:`kv_fit_batch` of the systems: its in-flight KV exceeds every system's tiers unless
the draw averages under 1 / FIT_MARGIN of the mean need (batches between 1 and FIT_MARGIN
times it are simulated, and engine.resume decides)."""


def check_batches(systems, model, pool: Workload, batches, *, platform: Platform | None = None,
                  max_batch: int = MAX_SEARCH_BATCH, field: str = "--batches") -> dict:
    """Refuse, before anything is simulated, batches that cannot fit or are too large to run.

    Args:
      systems: names or System objects; model: name or Model; pool: the population the
        steady state draws from (run_sweep's pool: ``synthetic(name, POOL_REQUESTS,
        seed=seed)`` for a dataset name); batches: batch sizes; platform: hardware.
      max_batch: the largest batch simulated at all (a stated maximum).
      field: the option named in the error.

    Returns:
      {system name: :func:`kv_fit_batch`}.

    Raises:
      ConfigError: a batch above ``max_batch``, or above FIT_MARGIN x the largest
        kv_fit_batch (the message gives the KV need, the capacity and the largest batch
        worth simulating).
    """
    fits = {_system_name(s): kv_fit_batch(s, model, pool, platform) for s in systems}
    top = max(int(b) for b in batches)
    most = max(fits.values())
    if top > FIT_MARGIN * most:
        holder = max(fits, key=fits.get)
        need = inflight_kv_tokens(pool)
        raise ConfigError(field, top, (
            f"cannot fit: at steady state a request of {pool.name} holds ~{need:,.0f} KV "
            f"tokens, so {top:,} in flight need ~{top * need:.3g} tokens, while the "
            f"largest KV capacity among the systems ({holder}, "
            f"{_model_name(model)}) is {most * need:.3g} tokens, ~{most:,} requests; give "
            f"batches up to {int(FIT_MARGIN * most):,}"))
    if top > max_batch:
        raise ConfigError(field, top, f"above the largest batch simulated, {max_batch:,} "
                          f"(study.MAX_SEARCH_BATCH); the systems' KV holds ~{most:,} "
                          f"requests of {pool.name}")
    return fits


def steady_requests(pool: Workload, batch: int, steps: int) -> int:
    """Requests a steady-state point needs: ``batch`` in flight and the refills of
    ``steps`` steps (a slot frees every mean-output steps on average) twice over, so the
    queue does not run dry in a run of typical length."""
    refills = batch * steps / max(pool.mean_output, 1.0)
    return batch + int(np.ceil(2.0 * refills)) + 8
def _model_name(model: Model | str) -> str:
    return model if isinstance(model, str) else model.name


def _system_name(system: System | str) -> str:
    return system if isinstance(system, str) else system.name


def _key(row):
    return row["platform"], row["model"], row["system"], row["batch"]


def _run_group(points, work, steps, warmup, seed, access, knobs, page, chunk_steps, label):
    """One slot class: every point resumes its in-flight requests and runs the warm-up,
    then the window (two run_batch calls, the second from the first's states); a row per
    point."""
    widest = max(work.values(), key=lambda w: w.max_context)
    config = make_config(widest, max(p.batch for p in points), page_size=page,
                         padded_bank_groups=max(max_bank_groups(p.platform) for p in points))
    params = [make_params(p.system, p.model, p.platform, access, max_batch=p.batch,
                          page_size=page, knobs=knobs) for p in points]
    workloads = [work[p.batch] for p in points]
    opened, final, metrics = run_steady(config, params, workloads, steps, warmup, seed,
                                        chunk_steps=chunk_steps, progress=label)
    return [point_row(p, index_config(metrics, i), index_config(opened, i),
                      index_config(final, i), workloads[i], page)
            for i, p in enumerate(points)]


def run_steady(config, params, workloads, steps: int, warmup: int, seeds, *,
               chunk_steps: int | None = None, **kwargs):
    """Steady-state runs (simulation.run_batch): resume every configuration's in-flight
    requests, ``warmup`` steps, then the ``steps`` of the window.

    Both calls run in chunks of the same length (a common divisor of ``warmup``, ``steps``
    and ``chunk_steps``), so they share one compiled program.

    Returns:
      (states when the window opens, final states, StepMetrics of the window [C, steps]).
    """
    chunk = math.gcd(math.gcd(warmup, steps), chunk_steps or steps)
    opened, _ = run_batch(config, params, workloads, warmup, seeds=seeds, resume=True,
                          chunk_steps=chunk, **kwargs)
    final, metrics = run_batch(config, params, workloads, steps, chunk_steps=chunk,
                               states=jax.tree.map(jnp.asarray, opened), **kwargs)
    return opened, final, metrics


def window_tpot_s(start, end, workload: Workload) -> np.ndarray:
    """TPOT (s) of every request active in a measuring window (see the module docstring).

    Args:
      start, end: EngineStates (host arrays) when the window opens and closes.
      workload: the workload they ran.

    Returns:
      f64 [n] seconds per output token in the window, one per request that produced a
      token in it after its first.
    """
    t0 = float(start.clock_whole) + float(start.clock_frac)
    t1 = float(end.clock_whole) + float(end.clock_frac)
    n = workload.num_requests
    gen_start = np.zeros(n, np.int64)
    slots = np.asarray(start.slot_request)
    gen_start[slots[slots >= 0]] = np.asarray(start.slot_generated)[slots >= 0]
    running_at_start = np.zeros(n, bool)
    running_at_start[slots[slots >= 0]] = True
    gen_end = np.where(np.asarray(end.req_status) == STATUS_FINISHED,
                       np.asarray(workload.output_tokens, np.int64), 0)
    slots = np.asarray(end.slot_request)
    gen_end[slots[slots >= 0]] = np.asarray(end.slot_generated)[slots >= 0]
    finish = np.asarray(end.req_finish_s, np.float64)
    first = np.asarray(end.req_first_token_s, np.float64)
    stop = np.where(np.isfinite(finish), finish, t1)
    admitted_in = np.isfinite(first) & (first >= t0) & ~running_at_start
    tokens = np.where(running_at_start, gen_end - gen_start,
                      np.where(admitted_in, gen_end - 1, 0))
    begin = np.where(running_at_start, t0, first)
    active = (running_at_start | admitted_in) & (tokens >= 1) & (stop > begin)
    return (stop[active] - begin[active]) / tokens[active]


def _percentile(values, q):
    return float(np.percentile(values, q)) if values.size else float("nan")


def point_row(point: SweepPoint, m, opened, final, workload: Workload, page: int) -> dict:
    """The result row of one configuration (columns: see :func:`run_sweep`).

    Args:
      point: the configuration; m: its StepMetrics stacked over the window's steps [S]
        (host arrays); opened, final: its EngineStates when the window opens and when it
        closes; workload: the workload it ran (its in-flight requests first); page: tokens
        per unit.
    """
    step_time = np.asarray(m.step_time_s, np.float64)
    tpot = window_tpot_s(opened, final, workload)
    decode = np.asarray(m.decode_requests, np.float64)
    pure = (decode > 0) & (np.asarray(m.prefill_requests) == 0)  # decode-only steps
    tokens = float(np.sum(m.output_tokens))
    elapsed = float(np.sum(step_time) + np.sum(m.idle_s))
    running = decode + np.asarray(m.prefill_requests)
    energy = np.asarray(m.energy_pj, np.float64).sum(0) * 1e-12 / max(tokens, 1.0)
    held = (np.asarray(m.tier_units, np.float64) * step_time[:, None]).sum(0)
    attention = np.asarray(m.tier_attention_s, np.float64).sum(0)
    units = np.maximum(np.asarray(m.tier_units, np.float64).sum(-1), 1.0)
    migrated = np.asarray(m.migrated_units, np.float64) / units
    context = np.asarray(m.decode_context, np.float64)
    half = len(decode) // 2
    means = [context[s].sum() / max(decode[s].sum(), 1.0)
             for s in (slice(0, half), slice(half, None), slice(None))]
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
        "mean_batch": float(running.mean()) if running.size else 0.0,
        # engine.resume rejects the in-flight requests that do not fit.
        "oom": bool(np.any(np.asarray(final.req_status)[:workload.in_flight]
                           == STATUS_REJECTED)),
        "mean_context_tokens": float(means[2]),
        "context_drift": float((means[1] - means[0]) / means[2]) if means[2] > 0 else 0.0,
        "energy_j_per_token": float(energy.sum()),
        "attention_time_s": float(np.sum(m.attention_s, dtype=np.float64)),
        "migrated_token_fraction_per_step": float(migrated[decode > 0].mean())
        if np.any(decode > 0) else 0.0,
        "page_size": page,
        "window_s": elapsed,
    }
    row.update({f"energy_{c}": float(e) for c, e in zip(ENERGY_COMPONENTS, energy)})
    first = np.asarray(final.req_first_token_s, np.float64)
    t0 = float(opened.clock_whole) + float(opened.clock_frac)
    prefilled = np.asarray(workload.prompt_tokens)[np.isfinite(first) & (first > t0)]
    row.update(_bound_columns(point, row, workload, prefilled, int(decode.sum())))
    total_held, total_attention = held.sum(), attention.sum()
    for i, tier in enumerate(TIER_NAMES):
        row[f"{tier}_token_share"] = float(held[i] / total_held) if total_held else 0.0
        row[f"{tier}_attention_share"] = float(attention[i] / total_attention) \
            if total_attention else 0.0
    return row


def _bound_columns(point: SweepPoint, row: dict, workload: Workload, prefilled,
                   decode_tokens: int) -> dict:
    """The row's window and decode-only throughput beside their bounds (pamjax.studies.
    bounds.window_bound of the window's prefills and decode tokens, and run_bound without
    prefill; both at the row's batch and mean context): columns bound_tokens_per_s,
    binding_resource, efficiency and the same with a ``decode_`` prefix; None when the
    batch did not fit or nothing decoded."""
    if row["oom"] or decode_tokens < 1:
        return {f"{prefix}{c}": None for prefix in ("", "decode_") for c in BOUND_COLUMNS}
    common = dict(concurrency=point.batch, platform=point.platform, access=point.access,
                  mean_context=row["mean_context_tokens"])
    columns = {}
    for prefix, key, b in (
            ("", "throughput_tokens_per_s", window_bound(
                point.system, point.model, prefilled_prompts=prefilled,
                decode_tokens=decode_tokens, **common)),
            ("decode_", "decode_throughput_tokens_per_s", run_bound(
                point.system, point.model, prompts=workload.prompt_tokens,
                outputs=workload.output_tokens, prefill=False, **common))):
        columns[f"{prefix}bound_tokens_per_s"] = b.tokens_per_s
        columns[f"{prefix}binding_resource"] = b.binding_resource
        columns[f"{prefix}efficiency"] = row[key] / b.tokens_per_s if b.tokens_per_s > 0 \
            else float("nan")
    return columns


def peak_under_slo(rows: list[dict], slo_ms: float) -> dict[str, dict]:
    """Per system (rows of one model and platform): the SLO search's answer, every metric
    of it from one batch.

    Two batches answer the search: the *max batch* (the largest batch of the grid that
    fits and meets the SLO) and the *peak batch* (the one with the highest throughput
    among those; they may differ where a larger batch loses throughput, e.g. to KV spilled
    to a slower tier). The row returned is the peak batch's own row (its ``batch``, throughput,
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
