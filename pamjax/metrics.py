"""Summary metrics of a simulation (PAM_SPEC §8), computed on the host from engine outputs.

Definitions:

* TTFT of a request = time its first token is produced (end of its prefill step) - arrival.
* TPOT of a request = (finish - first token) / (output tokens - 1), for requests with more
  than one output token; the per-output-token latency SLO is met when the p99 TPOT over
  finished requests is within it.
* Throughput = output tokens produced / simulated seconds (t = 0 to the last step's end).
* Energy per token = all energy / output tokens, split by component (types.ENERGY_COMPONENTS).
* Tier token share = step-time-weighted mean of the KV held per tier; tier attention-time
  share = each tier's summed attention time over the sum for all tiers.
* Migrated token fraction per step = mean over decode steps of units moved / units held.
* Locality statistics (emergent, reported): P(selected at j+1 | selected at j) and the mean
  attention-mass share of the selected set.
* Step time (``step_time_ms``) = simulated duration of the busy steps (idle clock jumps
  excluded): exact mean and max, p50/p99 from a fixed-bin log histogram (below).

Per request and over time (`pamjax simulate --out`): :func:`request_rows` (one row per
request: arrival, lengths, status, TTFT, TPOT, finish) and :func:`timeline_rows` (running
and queued requests, KV per tier, step time, migrated and output tokens, per step or per
fixed time bin). :func:`summarize_batch` summarises each configuration of a batched run.

Long runs: the step metrics are folded chunk by chunk into :class:`RunningStats` (float64
sums and integer counts, exact up to float64 summation order, plus the histogram), so a run
of any length keeps O(1) host memory; :func:`summarize` of a full timeline goes through the
same fold and gives the same summary.

Step-time quantile sketch: a fixed log-spaced histogram with ``HIST_BINS_PER_DECADE`` = 200
bins per decade from ``HIST_MIN_S`` = 1 ns to ``HIST_MAX_S`` = 100,000 s (2,800 int64
counters, 22 KB). The q-quantile is reported as the geometric centre of the bin holding the
order statistic of rank ceil(q n) (numpy's ``inverted_cdf`` percentile), so its relative error
is at most ``HIST_RELATIVE_ERROR`` = 10**(1/400) - 1 = 0.58% for step times inside the range
(values outside are clamped to the end bins).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import numpy as np

from pamjax.errors import ConfigError
from pamjax.hardware import TIER_NAMES
from pamjax.types import (
    ENERGY_COMPONENTS,
    STATUS_FINISHED,
    STATUS_REJECTED,
    STATUS_RUNNING,
    STATUS_WAITING,
)

HIST_BINS_PER_DECADE = 200
HIST_MIN_S = 1e-9
HIST_MAX_S = 1e5
_HIST_LO = round(np.log10(HIST_MIN_S) * HIST_BINS_PER_DECADE)
_HIST_BINS = round(np.log10(HIST_MAX_S) * HIST_BINS_PER_DECADE) - _HIST_LO
HIST_RELATIVE_ERROR = 10.0 ** (0.5 / HIST_BINS_PER_DECADE) - 1.0
"""Largest relative error of a step-time quantile from the histogram (inside its range)."""


@dataclasses.dataclass
class RunningStats:
    """Everything :func:`summarize_stats` needs from the step metrics, folded chunk by chunk.

    Fields (sums over steps; float64 unless marked int):
      steps: int, steps folded (idle ones included).
      busy_steps: int, steps with work (step_time_s > 0).
      decode_steps: int, busy steps that decoded at least one request.
      decoding_steps: int, steps that decoded at least one request (busy or not).
      output_tokens: int, tokens produced.
      decode_requests: int, sum of decoding requests per step.
      step_time_s: busy simulated seconds; step_time_max_s: the longest step (s).
      energy_pj: [C] energy per component (pJ).
      held_unit_s: [T] KV units held per tier x step time (unit-seconds).
      tier_attention_s: [T] attention time per tier (s).
      migrated_fraction: sum over decode steps of units migrated / units held.
      ssd_migrated_fraction: the same for units leaving the SSD.
      persisted_units, previously_selected_units, selected_mass: locality sums.
      step_time_hist: int64 [HIST_BINS] counts of busy step times per log bin.
    """

    steps: int = 0
    busy_steps: int = 0
    decode_steps: int = 0
    decoding_steps: int = 0
    output_tokens: int = 0
    decode_requests: int = 0
    step_time_s: float = 0.0
    step_time_max_s: float = 0.0
    energy_pj: np.ndarray = dataclasses.field(default_factory=partial(np.zeros, len(
        ENERGY_COMPONENTS)))
    held_unit_s: np.ndarray = dataclasses.field(default_factory=partial(np.zeros, len(TIER_NAMES)))
    tier_attention_s: np.ndarray = dataclasses.field(default_factory=partial(np.zeros, len(
        TIER_NAMES)))
    migrated_fraction: float = 0.0
    ssd_migrated_fraction: float = 0.0
    persisted_units: float = 0.0
    previously_selected_units: float = 0.0
    selected_mass: float = 0.0
    step_time_hist: np.ndarray = dataclasses.field(default_factory=partial(
        np.zeros, _HIST_BINS, np.int64))

    def fold(self, metrics) -> RunningStats:
        """Add a chunk of StepMetrics stacked over steps [S] (numpy); returns self."""
        step_time = np.asarray(metrics.step_time_s, np.float64)
        busy = step_time > 0
        decode = np.asarray(metrics.decode_requests) > 0
        tier_units = np.asarray(metrics.tier_units, np.float64)
        units_held = np.maximum(tier_units.sum(-1), 1)
        self.steps += int(step_time.size)
        self.busy_steps += int(np.sum(busy))
        self.decode_steps += int(np.sum(decode & busy))
        self.decoding_steps += int(np.sum(decode))
        self.output_tokens += int(np.sum(metrics.output_tokens, dtype=np.int64))
        self.decode_requests += int(np.sum(metrics.decode_requests, dtype=np.int64))
        self.step_time_s += float(np.sum(step_time[busy]))
        if busy.any():
            self.step_time_max_s = max(self.step_time_max_s, float(step_time[busy].max()))
        self.energy_pj = self.energy_pj + np.asarray(metrics.energy_pj, np.float64).sum(0)
        self.held_unit_s = self.held_unit_s + (tier_units * step_time[:, None]).sum(0)
        self.tier_attention_s = self.tier_attention_s + np.asarray(
            metrics.tier_attention_s, np.float64).sum(0)
        self.migrated_fraction += float(np.sum(
            (np.asarray(metrics.migrated_units, np.float64) / units_held)[decode]))
        self.ssd_migrated_fraction += float(np.sum(
            (np.asarray(metrics.migrated_from_ssd, np.float64) / units_held)[decode]))
        self.persisted_units += float(np.sum(metrics.persisted_units, dtype=np.float64))
        self.previously_selected_units += float(
            np.sum(metrics.previously_selected_units, dtype=np.float64))
        self.selected_mass += float(np.sum(metrics.selected_mass, dtype=np.float64))
        self.step_time_hist += np.bincount(_hist_bins(step_time[busy]), minlength=_HIST_BINS)
        return self

    def step_time_quantile(self, q: float) -> float:
        """q-quantile (0 < q <= 1) of the busy step times in seconds from the histogram
        (NaN with no busy step); relative error <= HIST_RELATIVE_ERROR."""
        n = int(self.step_time_hist.sum())
        if n == 0:
            return float("nan")
        rank = max(int(np.ceil(q * n)), 1)
        b = int(np.searchsorted(np.cumsum(self.step_time_hist), rank))
        return float(10.0 ** ((_HIST_LO + b + 0.5) / HIST_BINS_PER_DECADE))


def _hist_bins(seconds: np.ndarray) -> np.ndarray:
    """Histogram bin of each step time (s), clamped to the histogram's range."""
    log = np.log10(np.maximum(seconds, HIST_MIN_S)) * HIST_BINS_PER_DECADE
    return np.clip(np.floor(log).astype(np.int64) - _HIST_LO, 0, _HIST_BINS - 1)


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    return {"mean": float(np.mean(values)), "p50": float(np.percentile(values, 50)),
            "p99": float(np.percentile(values, 99))}


def request_latencies(arrival_s, output_tokens, status, first_token_s, finish_s):
    """Per-request TTFT and TPOT in seconds for finished requests (numpy arrays)."""
    finished = status == STATUS_FINISHED
    ttft = (first_token_s - arrival_s)[finished]
    multi = finished & (output_tokens > 1)
    tpot = ((finish_s - first_token_s) / np.maximum(output_tokens - 1, 1))[multi]
    return ttft, tpot


def summarize(workload, state, metrics, wall_seconds: float) -> dict:
    """Summary dictionary of one run from its full timeline.

    Args:
      workload: the host workload (pamjax.workload.Workload).
      state: final EngineState (numpy or jax arrays).
      metrics: StepMetrics stacked over steps (numpy arrays).
      wall_seconds: host wall time of the run.

    Returns:
      dict with the keys documented in the CLI (`pamjax simulate --json`); the same as
      :func:`summarize_stats` of the timeline folded chunk by chunk.
    """
    return summarize_stats(workload, state, RunningStats().fold(metrics), wall_seconds)


def summarize_stats(workload, state, stats: RunningStats, wall_seconds: float) -> dict:
    """Summary dictionary of one run from its running statistics (see :func:`summarize`)."""
    status = np.asarray(state.req_status)
    ttft, tpot = request_latencies(
        np.asarray(workload.arrival_s, np.float64), np.asarray(workload.output_tokens),
        status, np.asarray(state.req_first_token_s, np.float64),
        np.asarray(state.req_finish_s, np.float64))
    tokens = stats.output_tokens
    simulated = float(np.asarray(state.clock_whole, np.float64)
                      + np.asarray(state.clock_frac, np.float64))
    per_token = stats.energy_pj * 1e-12 / max(tokens, 1)
    decoding = stats.decoding_steps
    return {
        "requests_total": int(status.size),
        "requests_finished": int(np.sum(status == STATUS_FINISHED)),
        "requests_rejected": int(np.sum(status == STATUS_REJECTED)),
        "requests_unfinished": int(np.sum((status == STATUS_RUNNING)
                                          | (status == STATUS_WAITING))),
        "output_tokens": tokens,
        "throughput_tokens_per_s": tokens / simulated if simulated > 0 else 0.0,
        "ttft_ms": {k: v * 1e3 for k, v in _stats(ttft).items()},
        "tpot_ms": {k: v * 1e3 for k, v in _stats(tpot).items()},
        "step_time_ms": {
            "mean": stats.step_time_s / stats.busy_steps * 1e3 if stats.busy_steps
            else float("nan"),
            "p50": stats.step_time_quantile(0.5) * 1e3,
            "p99": stats.step_time_quantile(0.99) * 1e3,
            "max": stats.step_time_max_s * 1e3 if stats.busy_steps else float("nan"),
        },
        "energy_j_per_token": float(per_token.sum()),
        "energy_j_per_token_by_component": dict(zip(ENERGY_COMPONENTS, map(float, per_token))),
        "tier_token_share": _shares(stats.held_unit_s),
        "tier_attention_time_share": _shares(stats.tier_attention_s),
        "migrated_token_fraction_per_step": stats.migrated_fraction / decoding
        if decoding else 0.0,
        "ssd_migrated_token_fraction_per_step": stats.ssd_migrated_fraction / decoding
        if decoding else 0.0,
        "selection_persistence": stats.persisted_units
        / max(stats.previously_selected_units, 1.0),
        "selected_mass_share": stats.selected_mass / max(stats.decode_requests, 1),
        "simulated_seconds": simulated,
        "wall_seconds": float(wall_seconds),
        "decode_steps": stats.decode_steps,
        "steps": stats.busy_steps,
        "overflow": bool(np.asarray(state.overflow)),
    }


def _shares(values: np.ndarray) -> dict:
    total = float(np.sum(values))
    return {name: (float(v) / total if total > 0 else 0.0) for name, v in zip(TIER_NAMES, values)}


def summarize_batch(workload, states, metrics, *, wall_seconds: float = float("nan"),
                    labels=None) -> list[dict]:
    """Per-configuration summaries of a batched run (simulation.run_batch's outputs).

    Args:
      workload: the host workload every configuration ran, or a list of one per
        configuration.
      states: final EngineState stacked over configurations [C, ...] (numpy).
      metrics: StepMetrics stacked [C, S, ...] (numpy).
      wall_seconds: host wall time to record in each summary (default NaN: a batched call's
        time belongs to no single configuration).
      labels: optional C labels, stored under ``"label"`` in each summary.

    Returns:
      C summary dicts (:func:`summarize`), in configuration order. A run of fixed length
      may end with requests waiting or running (``requests_unfinished``); latencies cover
      the finished ones.
    """
    count = int(np.shape(np.asarray(states.req_status))[0])
    workloads = list(workload) if isinstance(workload, (list, tuple)) else [workload] * count
    for name, given in (("labels", labels), ("workload", workloads)):
        if given is not None and len(given) != count:
            raise ConfigError(name, f"{len(given)} given", f"need one per configuration "
                              f"({count})")
    out = []
    for i in range(count):
        def take(x, i=i):
            return np.asarray(x)[i]

        summary = summarize(workloads[i], jax.tree.map(take, states),
                            jax.tree.map(take, metrics), wall_seconds)
        if labels is not None:
            summary["label"] = labels[i]
        out.append(summary)
    return out


STATUS_NAMES = {STATUS_WAITING: "waiting", STATUS_RUNNING: "running",
                STATUS_FINISHED: "finished", STATUS_REJECTED: "rejected"}

REQUEST_COLUMNS = ["id", "arrival_s", "prompt_tokens", "output_tokens", "status",
                   "generated_tokens", "ttft_ms", "tpot_ms", "finish_s"]
"""Columns of :func:`request_rows` (REQUEST_COLUMNS_NOTE: why no tier shares)."""

REQUEST_COLUMNS_NOTE = (
    "per-request KV tier shares: the engine keeps a request's tier table only while it runs "
    "(the slot is reused by the next request) and no step metric is per request, so they "
    "cannot be reconstructed after the run")


def request_rows(workload, state) -> list[dict]:
    """One row per request of a finished run (REQUEST_COLUMNS).

    Args:
      workload: the host workload; state: the final EngineState or leap.LeapState.

    Returns:
      dicts with: id (position in the workload), arrival_s (s), prompt_tokens,
      output_tokens, status (waiting, running, finished or rejected), generated_tokens
      (output tokens produced so far), ttft_ms (first token - arrival, ms; None before
      the first token), tpot_ms ((finish - first token) / (output - 1), ms; finished
      requests with two or more output tokens), finish_s (s; None unless finished).
    """
    status = np.asarray(state.req_status)
    arrival = np.asarray(workload.arrival_s, np.float64)
    output = np.asarray(workload.output_tokens)
    first = np.asarray(state.req_first_token_s, np.float64)
    finish = np.asarray(state.req_finish_s, np.float64)
    generated = np.where(status == STATUS_FINISHED, output, 0)
    slots = np.asarray(state.slot_request)
    live = slots >= 0
    generated[slots[live]] = np.asarray(state.slot_generated)[live]
    finished = status == STATUS_FINISHED
    ttft = (first - arrival) * 1e3
    tpot = (finish - first) / np.maximum(output - 1, 1) * 1e3
    rows = []
    for i in range(status.size):
        rows.append({
            "id": i, "arrival_s": float(arrival[i]), "prompt_tokens": int(
                workload.prompt_tokens[i]), "output_tokens": int(output[i]),
            "status": STATUS_NAMES[int(status[i])], "generated_tokens": int(generated[i]),
            "ttft_ms": float(ttft[i]) if np.isfinite(first[i]) else None,
            "tpot_ms": float(tpot[i]) if finished[i] and output[i] > 1 else None,
            "finish_s": float(finish[i]) if finished[i] else None})
    return rows


TIMELINE_MAX_ROWS = 2000
"""A timeline keeps one row per step up to this many steps, else fixed time bins."""


def timeline_columns() -> list[str]:
    """Columns of :func:`timeline_rows` (one KV-tokens column per tier)."""
    return ["time_s", "duration_s", "steps", "running", "queued",
            *(f"{t}_kv_tokens" for t in TIER_NAMES), "step_time_ms", "migrated_tokens",
            "output_tokens"]


def timeline_rows(metrics, workload, *, page_size: int,
                  max_rows: int = TIMELINE_MAX_ROWS) -> tuple[list[dict], dict]:
    """A run's time series, per step or per fixed time bin.

    Args:
      metrics: StepMetrics stacked over the run's steps [S] (numpy; SimResult.metrics).
      workload: the host workload (arrival times, for the queue).
      page_size: tokens per KV unit (units x page_size = tokens; a page may be partly
        filled, so with pages > 1 token counts are an upper bound).
      max_rows: at most this many steps get a row each; beyond, steps are grouped into
        bins of a fixed width (1, 2 or 5 x 10^k s, the smallest giving <= max_rows bins).

    Returns:
      (rows, resolution): rows with timeline_columns(): time_s (start of the step or bin,
      simulated s), duration_s, steps (busy steps ending in it), running (requests
      decoding or prefilling; in a bin, the mean over its busy time, exact for steps that
      straddle its edges), queued (arrived but neither admitted nor rejected, at its
      end), <tier>_kv_tokens (KV held per tier at its end), step_time_ms (mean of the busy
      steps ending in it; None for an idle clock jump or a bin where none ends),
      migrated_tokens and output_tokens (sums over the steps ending in it);
      resolution {"resolution": "step"} or {"resolution": "bin", "bin_s": width}.
      Steps in which nothing happened and no time passed (after the last request) are
      left out.
    """
    busy_s = np.asarray(metrics.step_time_s, np.float64)
    span = busy_s + np.asarray(metrics.idle_s, np.float64)
    admitted = np.asarray(metrics.prefill_requests, np.int64)
    rejected = np.asarray(metrics.rejected, np.int64)
    running = np.asarray(metrics.decode_requests, np.int64) + admitted
    keep = (span > 0) | (admitted > 0) | (rejected > 0) | (np.asarray(metrics.output_tokens) > 0)
    end = np.cumsum(span)
    arrived = np.searchsorted(np.asarray(workload.arrival_s, np.float64), end, side="right")
    queued = np.maximum(arrived - np.cumsum(admitted) - np.cumsum(rejected), 0)
    per_step = {
        "end": end, "span": span, "busy": busy_s, "running": running, "queued": queued,
        "tiers": np.asarray(metrics.tier_units, np.int64) * page_size,
        "migrated": np.asarray(metrics.migrated_units, np.int64) * page_size,
        "output": np.asarray(metrics.output_tokens, np.int64)}
    per_step = {k: v[keep] for k, v in per_step.items()}
    if per_step["end"].size <= max_rows:
        return [_step_row(per_step, k) for k in range(per_step["end"].size)], \
            {"resolution": "step"}
    width = _bin_width(float(per_step["end"][-1]), max_rows)
    return _bin_rows(per_step, width), {"resolution": "bin", "bin_s": width}


def _step_row(s: dict, k: int) -> dict:
    row = {"time_s": float(s["end"][k] - s["span"][k]), "duration_s": float(s["span"][k]),
           "steps": int(s["busy"][k] > 0), "running": int(s["running"][k]),
           "queued": int(s["queued"][k])}
    row.update({f"{t}_kv_tokens": int(v) for t, v in zip(TIER_NAMES, s["tiers"][k])})
    row.update(step_time_ms=float(s["busy"][k] * 1e3) if s["busy"][k] > 0 else None,
               migrated_tokens=int(s["migrated"][k]),
               output_tokens=int(s["output"][k]))
    return row


def _bin_width(total_s: float, max_rows: int) -> float:
    """The smallest 1, 2 or 5 x 10^k seconds that cuts ``total_s`` into <= max_rows bins."""
    exponent = np.floor(np.log10(max(total_s / max_rows, 1e-9)))
    for exp in (exponent, exponent + 1):
        for mantissa in (1.0, 2.0, 5.0):
            width = float(mantissa * 10.0 ** exp)
            if total_s / width <= max_rows:
                return width
    return float(10.0 ** (exponent + 2))


def _bin_rows(s: dict, width: float) -> list[dict]:
    """Fixed-width bins of the per-step arrays of :func:`timeline_rows`.

    ``running`` is exact over the bin however steps straddle its edges: the cumulative busy
    time and running-requests x busy time are piecewise linear in time (flat across idle
    jumps), so their values at the bin edges (np.interp) give each bin's share. Counts
    (steps, migrated and output tokens) go to the bin where their step ends, as does the
    step-time mean; queue and KV are read at the end of the last step ending in the bin.
    """
    end = s["end"]
    bins = int(np.ceil(end[-1] / width - 1e-9)) or 1
    edges = np.arange(bins + 1) * width
    times = np.concatenate([[0.0], end])
    busy_at = np.interp(edges, times, np.concatenate([[0.0], np.cumsum(s["busy"])]))
    load_at = np.interp(edges, times,
                        np.concatenate([[0.0], np.cumsum(s["running"] * s["busy"])]))
    busy_time, load = np.diff(busy_at), np.diff(load_at)
    running = np.divide(load, busy_time, out=np.zeros(bins), where=busy_time > 0)
    index = np.minimum(np.ceil(end / width - 1e-9).astype(np.int64) - 1, bins - 1)
    index = np.maximum(index, 0)

    def total(values):
        return np.bincount(index, weights=values, minlength=bins)

    busy = s["busy"] > 0
    steps, step_s = total(busy.astype(np.float64)), total(s["busy"])
    migrated, output = total(s["migrated"]), total(s["output"])
    # The last step ending in each bin (steps are in time order), or in an earlier bin
    # when none ends in it; -1 before the first step.
    last = np.searchsorted(index, np.arange(bins), side="right") - 1
    rows = []
    for b in range(bins):
        k = last[b]
        row = {"time_s": float(edges[b]), "duration_s": width, "steps": int(steps[b]),
               "running": float(running[b]), "queued": int(s["queued"][k]) if k >= 0 else 0}
        row.update({f"{t}_kv_tokens": int(s["tiers"][k][i]) if k >= 0 else 0
                    for i, t in enumerate(TIER_NAMES)})
        row.update(step_time_ms=float(step_s[b] / steps[b] * 1e3) if steps[b] else None,
                   migrated_tokens=int(migrated[b]), output_tokens=int(output[b]))
        rows.append(row)
    return rows
