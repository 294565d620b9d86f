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
"""

from __future__ import annotations

import numpy as np

from pamjax.hardware import TIER_NAMES
from pamjax.types import (
    ENERGY_COMPONENTS,
    STATUS_FINISHED,
    STATUS_REJECTED,
    STATUS_RUNNING,
    STATUS_WAITING,
)


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
    """Summary dictionary of one run.

    Args:
      workload: the host workload (pamjax.workload.Workload).
      state: final EngineState (numpy or jax arrays).
      metrics: StepMetrics stacked over steps (numpy arrays).
      wall_seconds: host wall time of the run.

    Returns:
      dict with the keys documented in the CLI (`pamjax simulate --json`).
    """
    status = np.asarray(state.req_status)
    ttft, tpot = request_latencies(
        np.asarray(workload.arrival_s, np.float64), np.asarray(workload.output_tokens),
        status, np.asarray(state.req_first_token_s, np.float64),
        np.asarray(state.req_finish_s, np.float64))
    step_time = np.asarray(metrics.step_time_s, np.float64)
    busy = step_time > 0
    tokens = int(np.sum(metrics.output_tokens))
    simulated = float(np.asarray(state.clock_whole, np.float64)
                      + np.asarray(state.clock_frac, np.float64))
    energy = np.asarray(metrics.energy_pj, np.float64).sum(0) * 1e-12
    tier_units = np.asarray(metrics.tier_units, np.float64)
    held = (tier_units * step_time[:, None]).sum(0)
    attention = np.asarray(metrics.tier_attention_s, np.float64).sum(0)
    decode = np.asarray(metrics.decode_requests) > 0
    units_held = np.maximum(tier_units.sum(-1), 1)
    migrated = np.asarray(metrics.migrated_units, np.float64) / units_held
    per_token = energy / max(tokens, 1)
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
        "energy_j_per_token": float(per_token.sum()),
        "energy_j_per_token_by_component": dict(zip(ENERGY_COMPONENTS, map(float, per_token))),
        "tier_token_share": _shares(held),
        "tier_attention_time_share": _shares(attention),
        "migrated_token_fraction_per_step": float(migrated[decode].mean()) if decode.any()
        else 0.0,
        "ssd_migrated_token_fraction_per_step": float(
            (np.asarray(metrics.migrated_from_ssd) / units_held)[decode].mean())
        if decode.any() else 0.0,
        "selection_persistence": float(
            np.asarray(metrics.persisted_units, np.float64).sum()
            / max(np.asarray(metrics.previously_selected_units, np.float64).sum(), 1.0)),
        "selected_mass_share": float(np.asarray(metrics.selected_mass, np.float64).sum()
                                     / max(np.asarray(metrics.decode_requests).sum(), 1)),
        "simulated_seconds": simulated,
        "wall_seconds": float(wall_seconds),
        "decode_steps": int(np.sum(decode & busy)),
        "steps": int(np.sum(busy)),
        "overflow": bool(np.asarray(state.overflow)),
    }


def _shares(values: np.ndarray) -> dict:
    total = float(np.sum(values))
    return {name: (float(v) / total if total > 0 else 0.0) for name, v in zip(TIER_NAMES, values)}
