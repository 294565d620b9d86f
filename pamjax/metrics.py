"""Summary metrics of a simulation (PAM_SPEC §8), computed on the host from engine outputs.

Definitions:

* TTFT of a request = time its first token is produced (end of its prefill step) - arrival.
* TPOT of a request = (finish - first token) / (output tokens - 1), for requests with more
  than one output token; the per-output-token latency SLO is met when the p99 TPOT over
  finished requests is within it.
* Throughput = output tokens produced / simulated seconds (first arrival to last step end).
* Energy per token = all energy / output tokens, split by component (types.ENERGY_COMPONENTS).
* Tier token share = step-time-weighted mean of the KV held per tier; tier attention-time
  share = each tier's summed attention time over the sum for all tiers.
* Migrated token fraction per step = mean over decode steps of units moved / units held.
* Locality statistics (emergent, reported): P(selected at j+1 | selected at j) and the mean
  attention-mass share of the selected set.
* Step time (``step_time_ms``) = simulated duration of the busy steps (idle clock jumps
  excluded): exact mean and max, p50/p99 from a fixed-bin log histogram (below).

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

import numpy as np

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
