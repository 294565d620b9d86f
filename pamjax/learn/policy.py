"""Placement policies that can be trained through the relaxation (relaxed.py).

Two families, both acting through PAM's own x:y:1 rule (PAM_SPEC §5), so that the exact
engine can run either with hard decisions:

* ``knobs``: the rule's continuous knobs, kept unconstrained for the optimiser
  (:class:`KnobParams`): x = exp(log_x), y = exp(log_y), the importance-EMA weight
  lambda = sigmoid(logit_lambda) and the swap budget = exp(log_budget). In the exact engine
  they become ``SimParams.target_x/target_y/ema_lambda`` and ``swap_budget`` rounded to an
  integer in [0, EngineConfig.max_swaps] (:func:`knobs_to_params`).
* ``net``: a small flax MLP (:class:`UnitScorer`) that scores every KV unit from per-unit
  features (:class:`UnitFeatures`). Its output is a log-scale correction c per unit; the
  key ``importance x exp(c)`` (placement.corrected_key, scaled per request) replaces the
  importance factor as the ranking key *and* as the quantity whose per-tier sums the x:y:1
  rule balances. The MLP's last layer is initialised to zero, so an untrained network *is*
  the PAM rule, bit for bit in the exact engine. The same key is used at both decisions the
  relaxation trains, in both models: at admission (features: prefill attention mass as the
  importance, nothing selected, no tier yet; it sets each request's tier demand and which
  prompt units go where: relaxed.episode_state, placement.initial_tiers via
  ``EngineConfig.placement_score``) and in the online swaps (relaxed._decode_step,
  scheduler.schedule). :func:`net_engine_hook` is the engine side, reading the network
  parameters from ``SimParams.policy``. Still not learned: which HBM unit a new token
  displaces (the least important by the EMA, in both models).

Feature set (each an f32 [R, U] map unless noted): log importance (EMA), selected at this
step (0/1), log(1 + age in tokens since the unit's last token was written), position of the
unit in the request (unit start / context, in [0, 1]) and the current tier (one-hot in the
exact engine, the soft placement in the relaxation, [R, U, T]). The bank-group activation the
issue lists is left out on purpose: the relaxation does not model bank groups (it assumes the
greedy mapping balances them), so the network could never learn a use for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from pamjax.errors import UnknownNameError
from pamjax.types import NUM_TIERS

FAMILIES = ("knobs", "net", "both")
"""Policy families ``train_policy_command`` accepts (``both`` trains each separately)."""

IMPORTANCE_FLOOR = 1e-8  # log(importance) of a unit never attended yet stays finite


@struct.dataclass
class UnitFeatures:
    """What a scorer sees about every KV unit of every request.

    importance f32 [R, U]: PAM importance EMA (shares of attention mass, <= 1).
    selected f32 [R, U]: 1 where the selector attended the unit at this step.
    age f32 [R, U]: tokens since the unit's last token was written.
    position f32 [R, U]: the unit's first token / context length, in [0, 1].
    tier f32 [R, U, T]: tier probabilities (one-hot for hard placements).
    present bool [R, U]: the unit exists.
    """

    importance: jnp.ndarray
    selected: jnp.ndarray
    age: jnp.ndarray
    position: jnp.ndarray
    tier: jnp.ndarray
    present: jnp.ndarray


def unit_features(importance, selected, context, tier_probs, present, page_size: int):
    """Build :class:`UnitFeatures` from engine-side arrays.

    Args:
      importance: f32 [R, U]; selected: bool or f32 [R, U]; context: i32 [R] tokens;
      tier_probs: f32 [R, U, T]; present: bool [R, U]; page_size: tokens per unit (static).
    """
    num_units = importance.shape[-1]
    start = jnp.arange(num_units, dtype=jnp.float32) * page_size
    ctx = context.astype(jnp.float32)[:, None]
    last = jnp.minimum(start[None, :] + page_size, ctx) - 1.0
    return UnitFeatures(
        importance=importance,
        selected=selected.astype(jnp.float32),
        age=jnp.maximum(ctx - 1.0 - last, 0.0),
        position=start[None, :] / jnp.maximum(ctx, 1.0),
        tier=tier_probs,
        present=present,
    )


def one_hot_tiers(unit_tier):
    """i8 [R, U] tier table (-1 = no unit) -> f32 [R, U, T] one-hot (zeros where absent)."""
    return (unit_tier[..., None] == jnp.arange(NUM_TIERS, dtype=unit_tier.dtype)).astype(
        jnp.float32)


class UnitScorer(nn.Module):
    """MLP over per-unit features -> f32 [R, U] log-scale correction of the importance key.

    Zero where a unit is absent; zero everywhere while the head is untrained.

    Attributes:
      hidden: width of each hidden layer.
      depth: hidden layers.
    """

    hidden: int = 32
    depth: int = 2

    @nn.compact
    def __call__(self, features: UnitFeatures):
        log_imp = jnp.log(jnp.maximum(features.importance, IMPORTANCE_FLOOR))
        x = jnp.concatenate([
            jnp.stack([log_imp / 10.0, features.selected, jnp.log1p(features.age) / 10.0,
                       features.position], axis=-1),
            features.tier], axis=-1)  # [R, U, F]; scaled to O(1) for the first layer
        for _ in range(self.depth):
            x = nn.tanh(nn.Dense(self.hidden)(x))
        # Zero-initialised head: the untrained network reproduces the PAM rule exactly.
        delta = nn.Dense(1, kernel_init=nn.initializers.zeros,
                         bias_init=nn.initializers.zeros)(x)[..., 0]
        return jnp.where(features.present, delta, 0.0)


def init_net(key, num_units: int = 4, hidden: int = 32, depth: int = 2):
    """Parameters of a :class:`UnitScorer` (shapes do not depend on R or U)."""
    r = 1
    dummy = UnitFeatures(jnp.full((r, num_units), 1.0 / num_units), jnp.zeros((r, num_units)),
                         jnp.zeros((r, num_units)), jnp.zeros((r, num_units)),
                         jnp.zeros((r, num_units, NUM_TIERS)), jnp.ones((r, num_units), bool))
    return UnitScorer(hidden, depth).init(key, dummy)


@struct.dataclass
class KnobParams:
    """Unconstrained knobs of the PAM rule (all f32 []); see the module docstring."""

    log_x: jnp.ndarray
    log_y: jnp.ndarray
    logit_lambda: jnp.ndarray
    log_budget: jnp.ndarray


@struct.dataclass
class SoftKnobs:
    """Constrained knob values the relaxation uses: target_x, target_y > 0, ema_lambda in
    (0, 1), swap_budget > 0 (continuous), all f32 []; log_x, log_y kept for the shares."""

    log_x: jnp.ndarray
    log_y: jnp.ndarray
    ema_lambda: jnp.ndarray
    swap_budget: jnp.ndarray


def knobs_from_params(params) -> KnobParams:
    """The rule's current knobs (SimParams) as unconstrained KnobParams."""
    lam = jnp.clip(params.ema_lambda, 1e-4, 1.0 - 1e-4)
    return KnobParams(log_x=jnp.log(params.target_x).astype(jnp.float32),
                      log_y=jnp.log(params.target_y).astype(jnp.float32),
                      logit_lambda=(jnp.log(lam) - jnp.log1p(-lam)).astype(jnp.float32),
                      log_budget=jnp.log(jnp.maximum(params.swap_budget, 1)).astype(
                          jnp.float32))


def soft_knobs(knobs: KnobParams) -> SoftKnobs:
    return SoftKnobs(log_x=knobs.log_x, log_y=knobs.log_y,
                     ema_lambda=jax.nn.sigmoid(knobs.logit_lambda),
                     swap_budget=jnp.exp(knobs.log_budget))


def knobs_to_params(params, knobs: KnobParams, max_swaps: int, page_size: int = 1):
    """Hard knobs for the exact engine: SimParams with x, y, lambda and an integer budget
    in tokens (at most the ``max_swaps`` pages of ``page_size`` tokens the engine can swap
    per phase)."""
    soft = soft_knobs(knobs)
    budget = jnp.clip(jnp.round(soft.swap_budget), 0, max_swaps * page_size).astype(jnp.int32)
    return params.replace(target_x=jnp.exp(soft.log_x).astype(jnp.float32),
                          target_y=jnp.exp(soft.log_y).astype(jnp.float32),
                          ema_lambda=soft.ema_lambda.astype(jnp.float32), swap_budget=budget)


def make_scorer(hidden: int = 32, depth: int = 2):
    """``score(net_params, UnitFeatures) -> f32 [R, U]`` log-scale correction (UnitScorer)
    for the relaxation and the engine."""
    module = UnitScorer(hidden, depth)

    def score(net_params, features):
        return module.apply(net_params, features)

    return score


_SCORERS: dict = {}


def net_engine_hook(hidden: int = 32, depth: int = 2, page_size: int = 1):
    """The ``EngineConfig.placement_score`` callable for a UnitScorer of this shape.

    Cached per shape so equal configs hash equal (one compile per config, not per call).
    The engine calls it as ``hook(params.policy, importance, selected, context, unit_tier,
    present) -> f32 [R, U]`` correction, at admission and before the online swaps (see
    types.EngineConfig).
    """
    key = (hidden, depth, page_size)
    if key not in _SCORERS:
        score = make_scorer(hidden, depth)

        def hook(net_params, importance, selected, context, unit_tier, present):
            features = unit_features(importance, selected, context, one_hot_tiers(unit_tier),
                                     present, page_size)
            return score(net_params, features)

        _SCORERS[key] = hook
    return _SCORERS[key]


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise UnknownNameError("policy family", family, FAMILIES)
    return family
