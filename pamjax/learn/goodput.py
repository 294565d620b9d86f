"""SLO goodput of a scheduling policy at steady state, judged by the exact engine.

The objective of the learned-scheduling study (issue 16): **goodput** = output tokens per
second of the serving system while it meets the TPOT p99 SLO, on a continuous-batching
workload at steady state, exactly as the sweep measures a point (studies/study.py): a closed
loop of ``batch`` in-flight requests drawn from the stationary distribution
(workload.steady_state), placed at t = 0 by engine.resume, ``warmup`` steps, then a window
of ``window`` steps with admission, prefill, decode, completion and refill as the engine
does them. Goodput = the window's throughput when the batch fits and the window's TPOT p99
(study.window_tpot_s) is at most ``slo_ms``, else 0. The closed loop queues every refill at
t = 0, so there is no arrival process and no TTFT to constrain; the SLO is TPOT alone.

A policy is a point of :data:`KNOB_NAMES` (a vector the black-box searches and the
gradient share): PAM's x:y:1 targets, the importance-EMA weight, the swap budget in tokens
and the batch limit. :func:`knob_params` turns vectors into SimParams, :func:`evaluate`
runs a population of them in one vmapped call per chunk of steps (one compile per setup).

Shapes: a population is f32 [P, K] (K = len(KNOB_NAMES)); goodput f64 [P] tokens/s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.simulation import index_config
from pamjax.studies import study
from pamjax.systems import make_params
from pamjax.types import STATUS_REJECTED, EngineConfig
from pamjax.workload import DATASETS, Workload, steady_state, synthetic

KNOB_NAMES = ("log_x", "log_y", "logit_lambda", "log_budget", "batch_logit")
"""Unconstrained policy coordinates: x = exp(log_x), y = exp(log_y), lambda =
sigmoid(logit_lambda), swap budget (tokens) = exp(log_budget), batch = 1 + (max_batch - 1)
sigmoid(batch_logit)."""

POOL_SIZE = 2048  # requests of a dataset pool the steady state draws from


@dataclasses.dataclass(frozen=True)
class GoodputSetup:
    """What one goodput measurement depends on ([D]: documented defaults).

    Fields:
      model: model preset.
      dataset: training dataset (synthetic).
      max_batch: R, slots of the exact engine and the largest batch a policy may ask for.
      page_size: tokens per KV unit.
      max_context: prompts are clipped to 3/4 and outputs to 1/4 of it (U = max_context /
        page_size units per slot).
      warmup, window: exact-engine steps before and inside the measuring window.
      slo_ms: TPOT p99 SLO (PAM_SPEC §8's tightest, 100 ms).
      queue: fresh requests queued behind the in-flight ones, as a multiple of max_batch.
      width: policies per vmapped exact call (fixed, so every evaluation shares one compile).
    """

    model: str = "opt-175b"
    dataset: str = "arxiv-sum"
    max_batch: int = 64
    page_size: int = 32
    max_context: int = 4096
    warmup: int = 16
    window: int = 32
    slo_ms: float = 100.0
    queue: int = 2
    width: int = 8

    def __post_init__(self):
        for field in ("max_batch", "page_size", "max_context", "warmup", "window", "queue",
                      "width"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"goodput.{field}", value, "must be an integer >= 1")
        if self.max_batch < 2:
            raise ConfigError("goodput.max_batch", self.max_batch, "must be >= 2")
        if not (np.isfinite(self.slo_ms) and self.slo_ms > 0):
            raise ConfigError("goodput.slo_ms", self.slo_ms, "must be a finite number > 0")
        if self.dataset not in DATASETS:
            raise UnknownNameError("workload", self.dataset, DATASETS)

    @property
    def units(self) -> int:
        return -(-self.max_context // self.page_size)

    @property
    def num_requests(self) -> int:
        return self.max_batch * (1 + self.queue)

    @property
    def chunk(self) -> int:
        """Steps per compiled call, shared by warm-up and window."""
        return int(np.gcd(self.warmup, self.window))


def clipped_pool(setup: GoodputSetup, pool: Workload) -> Workload:
    """``pool`` with prompts clipped to 3/4 and outputs to 1/4 of max_context (>= 2 tokens
    of output, so every request can be in flight)."""
    return Workload(np.zeros(pool.num_requests),
                    np.clip(pool.prompt_tokens, 1, setup.max_context * 3 // 4),
                    np.clip(pool.output_tokens, 2, setup.max_context // 4), name=pool.name)


def dataset_pool(setup: GoodputSetup, dataset: str, seed: int) -> Workload:
    """A clipped pool of POOL_SIZE requests of a synthetic dataset."""
    return clipped_pool(setup, synthetic(dataset, POOL_SIZE, seed=seed))


def steady_workload(setup: GoodputSetup, pool: Workload, seed: int) -> Workload:
    """max_batch in-flight requests (stationary draw) + the queue of refills.

    A policy with batch B < max_batch keeps the first B in-flight requests (engine.resume
    admits slots below max_batch): an i.i.d. draw's first B are a draw of B.
    """
    return steady_state(pool, setup.max_batch, setup.num_requests, seed=seed)


def rule_params(setup: GoodputSetup):
    """PAM's own SimParams (targets of systems.pam_targets, default lambda and budget) at
    max_batch."""
    return make_params("pam", setup.model, max_batch=setup.max_batch,
                       page_size=setup.page_size)


def batch_of(setup: GoodputSetup, batch_logit):
    """Continuous batch in [1, max_batch] of the unconstrained coordinate."""
    return 1.0 + (setup.max_batch - 1) * jax.nn.sigmoid(batch_logit)


def batch_logit_of(setup: GoodputSetup, batch: float) -> float:
    """Inverse of :func:`batch_of` (batch strictly inside (1, max_batch))."""
    frac = np.clip((batch - 1.0) / (setup.max_batch - 1), 1e-4, 1 - 1e-4)
    return float(np.log(frac) - np.log1p(-frac))


def rule_vector(setup: GoodputSetup, batch: float) -> np.ndarray:
    """PAM's knobs at ``batch`` as a policy vector f32 [K]."""
    p = rule_params(setup)
    lam = float(np.clip(p.ema_lambda, 1e-4, 1 - 1e-4))
    return np.array([np.log(float(p.target_x)), np.log(float(p.target_y)),
                     np.log(lam) - np.log1p(-lam), np.log(max(int(p.swap_budget), 1)),
                     batch_logit_of(setup, batch)], np.float32)


def knob_params(setup: GoodputSetup, vectors, max_budget_tokens: int) -> list:
    """SimParams of each policy vector f32 [P, K]: the hard knobs the exact engine runs.

    The swap budget is rounded to whole tokens in [0, max_budget_tokens], the batch to an
    integer in [1, max_batch]; x, y are clipped to [1e-6, 1e30] (the f32 range).
    """
    base = rule_params(setup)
    vectors = np.asarray(vectors, np.float64).reshape(-1, len(KNOB_NAMES))
    out = []
    for v in vectors:
        batch = int(np.clip(np.round(1.0 + (setup.max_batch - 1)
                                     / (1.0 + np.exp(-np.clip(v[4], -50, 50)))),
                            1, setup.max_batch))
        out.append(base.replace(
            target_x=jnp.float32(np.exp(np.clip(v[0], -13.8, 69.0))),
            target_y=jnp.float32(np.exp(np.clip(v[1], -13.8, 69.0))),
            ema_lambda=jnp.float32(1.0 / (1.0 + np.exp(-np.clip(v[2], -50, 50)))),
            swap_budget=jnp.int32(np.clip(np.round(np.exp(np.clip(v[3], -50, 30))), 0,
                                          max_budget_tokens)),
            max_batch=jnp.int32(batch)))
    return out


def engine_config(setup: GoodputSetup, params, hook=None) -> EngineConfig:
    """The one static EngineConfig of a setup (per scoring hook)."""
    return EngineConfig(num_slots=setup.max_batch, units_per_slot=setup.units,
                        page_size=setup.page_size, num_requests=setup.num_requests,
                        padded_bank_groups=int(np.max(np.asarray(params.bank_groups_per_device))),
                        placement_score=hook)


def max_budget_tokens(setup: GoodputSetup) -> int:
    """The most tokens one swap phase can move (EngineConfig.max_swaps pages)."""
    return engine_config(setup, rule_params(setup)).max_swaps * setup.page_size


def evaluate(setup: GoodputSetup, params_list, workload: Workload, seed: int, *,
             hook=None) -> list[dict]:
    """Exact-engine steady-state window of each SimParams on one workload.

    Args:
      setup: GoodputSetup; params_list: P SimParams (max_batch <= setup.max_batch);
      workload: :func:`steady_workload`; seed: access-model seed (policies run in vmapped
        groups of setup.width, one call per chunk of steps);
      hook: EngineConfig.placement_score for network policies (parameters in
        SimParams.policy).

    Returns:
      one row per policy: goodput_tokens_per_s (throughput if it fits and meets the SLO,
      else 0), throughput_tokens_per_s, tpot_p99_ms, batch, oom, meets_slo.
    """
    config = engine_config(setup, params_list[0], hook)
    opened, final, metrics = study.run_steady(
        config, params_list, workload, setup.window, setup.warmup, seed,
        chunk_steps=setup.chunk, width=setup.width)
    rows = []
    for i, p in enumerate(params_list):
        m, o, f = index_config(metrics, i), index_config(opened, i), index_config(final, i)
        tokens = float(np.sum(m.output_tokens))
        elapsed = float(np.sum(m.step_time_s, dtype=np.float64) + np.sum(m.idle_s))
        tpot = study.window_tpot_s(o, f, workload)
        p99 = float(np.percentile(tpot, 99) * 1e3) if tpot.size else float("inf")
        batch = int(p.max_batch)
        # resume refuses in-flight requests at or past max_batch by design; a refusal below
        # it means the KV did not fit.
        oom = bool(np.any(np.asarray(f.req_status)[:batch] == STATUS_REJECTED))
        throughput = tokens / elapsed if elapsed > 0 else 0.0
        meets = (not oom) and p99 <= setup.slo_ms
        rows.append({"goodput_tokens_per_s": throughput if meets else 0.0,
                     "throughput_tokens_per_s": throughput, "tpot_p99_ms": p99,
                     "batch": batch, "oom": oom, "meets_slo": meets})
    return rows


def net_goodput(setup: GoodputSetup, vector, nets, workloads, hook) -> np.ndarray:
    """Mean exact goodput (tokens/s) of network policies, f64 [P]: every NetPolicy of
    ``nets`` (learn/policy.py) on the knobs of ``vector`` f32 [K], its scorer ``hook``
    (policy.net_engine_hook) ranking units at admission and in the swaps; over
    ``workloads`` [(Workload, access seed)], like :func:`goodput`."""
    base = knob_params(setup, np.asarray(vector)[None], max_budget_tokens(setup))[0]
    params = [base.replace(policy=net) for net in nets]
    return np.mean([[r["goodput_tokens_per_s"] for r in
                     evaluate(setup, params, w, s, hook=hook)] for w, s in workloads], axis=0)


def goodput(setup: GoodputSetup, vectors, workloads) -> np.ndarray:
    """Mean exact goodput (tokens/s) of each knob vector over ``workloads``, f64 [P].

    ``workloads``: [(Workload, access seed)]; every vector runs on every one.
    """
    params = knob_params(setup, vectors, max_budget_tokens(setup))
    return np.mean([[r["goodput_tokens_per_s"] for r in
                     evaluate(setup, params, w, s)] for w, s in workloads], axis=0)
