"""A differentiable relaxation of the serving loop's SLO goodput (learn/goodput.py).

learn/relaxed.py relaxes PAM's placement decisions within a fixed batch of decoding
requests. Goodput also depends on the loop around them: which requests are in the batch,
when they finish, what refilling their slots costs, and whether the TPOT SLO holds. This
module adds those, on top of relaxed.py's soft placement and cost model:

* **Soft batch (admission).** An episode is a steady-state draw of R = max_batch in-flight
  requests (workload.steady_state: length-biased, uniform progress), as the exact judge
  uses. A policy's batch B (continuous) admits request r with weight
  ``m_r = sigmoid((B - r - 1/2) / tau_B)`` (FCFS order; the exact engine keeps the first
  round(B)): its KV, its tier demand at admission and its share of every step's counts are
  scaled by m_r (relaxed.episode_state / relaxed._decode_step ``weight``). tau_B =
  ``batch_temperature`` x tau / tau_end slots, so it sharpens with the placement's tau.
* **Lifetime.** Request r has ``remaining_r`` decode steps left; it takes part in steps
  1..remaining_r only (weight m_r x [k <= remaining_r]). A unit moved for a request that
  finishes soon costs its migration in the step it moves and saves attention time only in
  the steps that request still runs, so the relaxation sees the wasted move.
* **Refills (smoothed admission of fresh requests).** A closed loop of B requests finishes,
  and refills, ``lambda = B / E[output]`` requests per step on average; each refill is
  prefilled (vLLM's prefill priority: the step that admits it is longer) and produces its
  first token then. The expected prefill time ``lambda x t_p`` (t_p: costs.
  prefill_time_and_flops of one prompt of the pool's mean length, its KV written by the
  soft x:y:1 shares) is added to every step, and lambda tokens to its output. The refills'
  own decoding within the episode is not modelled (their slots' weight drops to 0 when the
  in-flight request finishes: over an episode of S steps a fraction ~S / E[output] of the
  batch, so the batch decodes slightly fewer tokens in later steps).
* **SLO as a smooth penalty.** A request's TPOT over a window of L steps is the mean step
  time it sees; steps carry Poisson(lambda) prefills, so its TPOT has mean t_bar = mean
  step time and standard deviation ``t_p sqrt(lambda / L)``; the p99 estimate is
  ``t_bar + 2.326 t_p sqrt(lambda / L)``, and goodput is multiplied by
  ``sigmoid((SLO - p99) / (slo_softness x SLO x tau / tau_end))``.

Relaxed goodput = (sum over steps of decoded tokens + refill tokens) / (sum of step times)
x the SLO factor, tokens/s. The exact engine (learn/goodput.py) remains the only judge of
reported numbers; learn/train_goodput.py measures how well this objective ranks policies.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from pamjax.costs import StepCounts, prefill_time_and_flops
from pamjax.errors import ConfigError
from pamjax.learn import relaxed
from pamjax.learn.policy import KnobParams, soft_knobs

Z_P99 = 2.326  # standard normal 99th percentile


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Static sizes and constants of the loop relaxation.

    Fields:
      relax: relaxed.RelaxConfig (batch = max_batch slots, units, page size, steps S).
      window: L, steps of the exact judge's measuring window (the TPOT average's length).
      slo_ms: TPOT p99 SLO.
      batch_temperature: tau_B at tau = tau_end, in slots.
      tau_end: the temperature at which tau_B = batch_temperature.
      slo_softness: width of the SLO sigmoid at tau_end, as a fraction of the SLO.
    """

    relax: relaxed.RelaxConfig
    window: int
    slo_ms: float
    batch_temperature: float = 1.0
    tau_end: float = 0.05
    slo_softness: float = 0.01

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError("loop.window", self.window, "must be an integer >= 1")
        for field in ("slo_ms", "batch_temperature", "tau_end", "slo_softness"):
            value = getattr(self, field)
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"loop.{field}", value, "must be a finite number > 0")


@struct.dataclass
class LoopKnobs:
    """A policy of the loop: PAM's knobs (policy.KnobParams) and batch_logit f32 []
    (batch = 1 + (R - 1) sigmoid(batch_logit), learn/goodput.batch_of)."""

    knobs: KnobParams
    batch_logit: jnp.ndarray


@struct.dataclass
class LoopEpisode:
    """One steady-state episode.

    context i32 [R]: KV tokens each in-flight request holds at the start (prompt +
      generated - 1, as engine.resume places it).
    remaining i32 [R]: decode steps it has left (output - generated).
    seed u32 []: access-model seed.
    refill_prompt, refill_pairs, mean_output f32 []: the pool's mean prompt length, mean
      n (n + 1) / 2 of its prompts and mean output length.
    prompt, generated i32 [R]: each request's prompt tokens and the output tokens it had
      produced at the start (what a network policy sees, types.LifetimeView; ``remaining``
      is the simulation's truth, never shown to a policy).
    """

    context: jnp.ndarray
    remaining: jnp.ndarray
    seed: jnp.ndarray
    refill_prompt: jnp.ndarray
    refill_pairs: jnp.ndarray
    mean_output: jnp.ndarray
    prompt: jnp.ndarray
    generated: jnp.ndarray


def vector_to_knobs(vector) -> LoopKnobs:
    """A goodput.KNOB_NAMES vector f32 [5] as LoopKnobs."""
    v = jnp.asarray(vector, jnp.float32)
    return LoopKnobs(KnobParams(v[0], v[1], v[2], v[3]), v[4])


def knobs_to_vector(knobs: LoopKnobs) -> np.ndarray:
    """Inverse of :func:`vector_to_knobs`, f32 [5] (host)."""
    k = knobs.knobs
    return np.array([float(k.log_x), float(k.log_y), float(k.logit_lambda),
                     float(k.log_budget), float(knobs.batch_logit)], np.float32)


def refill_prefill_s(params, episode: LoopEpisode, shares):
    """t_p: prefill time (s) of one refill of the pool's mean prompt, its KV written to the
    tiers in the soft shares f32 [T]."""
    n = episode.refill_prompt
    zero = jnp.zeros(relaxed.NUM_TIERS, jnp.float32)
    counts = StepCounts(
        decode_requests=jnp.float32(0.0), decode_context=jnp.float32(0.0), tier_tokens=zero,
        tier_selected=zero, tier_busiest_bank_group=zero, tier_requests=zero,
        tier_holders=zero, tier_active_bank_groups=zero, tier_active_chunks=zero,
        tier_topk_candidates=zero, tier_decode_writes=zero, prefill_tokens=n,
        prefill_pairs=episode.refill_pairs, prefill_tier_tokens=n * shares,
        migrated_tokens=jnp.zeros((relaxed.NUM_TIERS,) * 2, jnp.float32),
        sparse=(params.select_fraction < 1.0).astype(jnp.float32))
    return prefill_time_and_flops(params, counts)[0]


def loop_terms(config: LoopConfig, params, policy: LoopKnobs, episode: LoopEpisode,
               temperature, score_fn=None, net_params=None, tpot_scale=1.0) -> dict:
    """The relaxed loop's quantities (all f32 []): goodput_tokens_per_s, throughput
    (before the SLO factor), tpot_p99_ms (estimate), batch (continuous), slo_factor, tokens
    (decoded and refill tokens of the episode), refills_per_step (lambda).

    ``tpot_scale`` (f32 [], may be traced) multiplies the TPOT p99 estimate before the SLO
    penalty: a calibration against exact measurements the caller already has
    (learn/goodput_study.py fits it on the rule's batch search); 1 = uncalibrated.
    """
    cfg = config.relax
    r = cfg.batch
    soft = soft_knobs(policy.knobs)
    batch = 1.0 + (r - 1) * jax.nn.sigmoid(policy.batch_logit)
    tau_b = config.batch_temperature * temperature / config.tau_end
    member = jax.nn.sigmoid((batch - jnp.arange(r, dtype=jnp.float32) - 0.5) / tau_b)
    steps = jnp.arange(1, cfg.steps + 1)
    alive = (steps[:, None] <= episode.remaining[None, :]).astype(jnp.float32)  # [S, R]
    weights = member[None, :] * alive
    fixed = relaxed.Episode(context=episode.context, seed=episode.seed,
                            prompt=episode.prompt, generated=episode.generated)
    carry = relaxed.episode_state(cfg, params, soft, fixed, temperature, score_fn, net_params,
                                  weight=member)
    body = functools.partial(relaxed._decode_step, cfg, params, soft, episode.seed,
                             temperature, score_fn, net_params)
    _, cost = lax.scan(jax.checkpoint(body), carry, (steps, weights))
    shares = jax.nn.softmax(jnp.stack([soft.log_x, soft.log_y, jnp.zeros_like(soft.log_x)]))
    t_p = refill_prefill_s(params, episode, shares)
    refills = jnp.sum(member) / episode.mean_output  # lambda, requests per step
    step_s = cost.time_s + refills * t_p
    tokens = jnp.sum(weights) + refills * cfg.steps
    throughput = tokens / jnp.sum(step_s)
    p99_ms = 1e3 * tpot_scale * (jnp.mean(step_s)
                                 + Z_P99 * t_p * jnp.sqrt(refills / config.window))
    width = config.slo_softness * config.slo_ms * temperature / config.tau_end
    factor = jax.nn.sigmoid((config.slo_ms - p99_ms) / width)
    return {"goodput_tokens_per_s": throughput * factor, "throughput_tokens_per_s": throughput,
            "tpot_p99_ms": p99_ms, "batch": batch, "slo_factor": factor, "tokens": tokens,
            "refills_per_step": refills}


def relaxed_goodput(config: LoopConfig, params, policy: LoopKnobs, episode: LoopEpisode,
                    temperature, score_fn=None, net_params=None, tpot_scale=1.0):
    """Relaxed SLO goodput of one episode, tokens/s (f32 [])."""
    return loop_terms(config, params, policy, episode, temperature, score_fn,
                      net_params, tpot_scale)["goodput_tokens_per_s"]
