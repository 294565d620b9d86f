"""Placement policies that can be trained through the relaxation (relaxed.py, relaxed_loop.py).

Two families, both acting through PAM's own x:y:1 rule (PAM_SPEC §5), so that the exact
engine can run either with hard decisions:

* ``knobs``: the rule's continuous knobs, kept unconstrained for the optimiser
  (:class:`KnobParams`): x = exp(log_x), y = exp(log_y), the importance-EMA weight
  lambda = sigmoid(logit_lambda) and the swap budget = exp(log_budget). In the exact engine
  they become ``SimParams.target_x/target_y/ema_lambda`` and ``swap_budget`` rounded to an
  integer in [0, EngineConfig.max_swaps] (:func:`knobs_to_params`); the goodput study adds
  the batch limit (learn/goodput.py KNOB_NAMES).
* ``net``: a small flax MLP (:class:`UnitScorer`) that scores every KV unit from
  :class:`UnitFeatures`. Its output is a log-scale correction c per unit; the key
  ``importance x exp(c)`` (placement.corrected_key, scaled per request) replaces the
  importance factor as the ranking key *and* as the quantity whose per-tier sums the x:y:1
  rule balances. The MLP's last layer is initialised to zero, so an untrained network *is*
  the PAM rule, bit for bit in the exact engine (tests/test_net_goodput.py). The same key is
  used at both decisions the relaxation trains, in both models: at admission (features:
  prefill attention mass as the importance, nothing selected, no tier yet; it sets each
  request's tier demand and which prompt units go where: relaxed.episode_state,
  placement.place_prompts via ``EngineConfig.placement_score``, also when engine.resume
  places a steady state's in-flight requests) and in the online swaps
  (relaxed._decode_step, scheduler.schedule_step). Its parameters are a :class:`NetPolicy`
  (the network's weights and a :class:`LengthPredictor`) in ``SimParams.policy``;
  :func:`net_engine_hook` is the engine side, :func:`make_scorer` the relaxation's, both
  building the features with :func:`unit_features`. Still not learned: which HBM unit a new
  token displaces (the least important by the EMA, in both models). It is trained on the
  fixed-batch decode time by learn/train.py and on SLO goodput, on top of the learned
  knobs, by learn/goodput_study.py (``learned_net``).

Features (UnitFeatures). Per unit, f32 [R, U]: log importance (EMA), selected at this step
(0/1), log(1 + age in tokens since the unit's last token was written), position of the unit
in the request (unit start / context, in [0, 1]) and the current tier (one-hot in the exact
engine, the soft placement in the relaxation, [R, U, T]). Lifetime features, from a
types.LifetimeView the engine builds only when a score is set (placement.lifetime_view,
called by the engine and the relaxation alike):

* request age: output tokens generated so far (engine: slot_generated, the workload's
  generated count at a steady-state resume, 0 at a fresh admission; relaxation: the
  episode's, + 1 per step);
* predicted remaining length: :class:`LengthPredictor`, from the PROMPT length only: the
  mean output of the training pool's prompts in the same length bucket, minus the age,
  floored (``fit_length_predictor``; buckets and floor are its parameters). It never reads
  a request's true output length (tests/test_net_goodput.py changes the true outputs and
  checks that nothing a policy sees changes);
* tier occupancy, [T]: units held / the tier's capacity (engine: the hard counts at the
  decision; relaxation: the expected counts of the requests in the soft batch, so the
  refills the exact engine admits during an episode are not in it);
* link load, []: the previous step's moves on their busiest link, s
  (costs.migration_link_s; engine: EngineState.migrated_tokens, kept only when a score is
  set; relaxation: the previous step's expected migration; 0 before the first step).

Request and system features are broadcast to every unit. A per-request constant correction
changes no decision (the rule works on per-request ratios), so they act through their
interactions with the per-unit features: e.g. how flat a request's key is, hence how many
of its units HBM takes. Left out on purpose: the bank-group activation (the relaxation
does not model bank groups, so the network could never learn a use for it) and the GPU
traffic on the links (the relaxation's per-step link time exists only inside the cost
model's smooth maximum, not as a quantity the exact engine keeps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from jax import lax

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.types import NUM_TIERS, LifetimeView

FAMILIES = ("knobs", "net", "both")
"""Policy families ``train_policy_command`` accepts (``both`` trains each separately)."""

IMPORTANCE_FLOOR = 1e-8  # log(importance) of a unit never attended yet stays finite


@struct.dataclass
class LengthPredictor:
    """Predicted remaining output of a request from its PROMPT length alone.

    The prediction is ``max(mean_output[bucket(prompt)] - generated, floor)``: the mean
    output length of the training pool's requests whose prompt falls in the same bucket,
    minus what the request has generated so far. It never reads a request's true output
    length (that would be an oracle); fit it with :func:`fit_length_predictor` on training
    requests only. A parameter of the policy (NetPolicy.predictor), not trained: its values
    are behind ``stop_gradient``.

    edges f32 [K - 1]: prompt-length bucket edges, tokens (ascending; bucket k holds
      prompts in [edges[k-1], edges[k])).
    mean_output f32 [K]: mean output tokens of each bucket.
    floor f32 []: the smallest prediction, tokens (a request still running has >= 1 left).
    """

    edges: jnp.ndarray
    mean_output: jnp.ndarray
    floor: jnp.ndarray

    def remaining(self, prompt, generated):
        """Predicted remaining output tokens, f32 [R], of prompt and generated [R]."""
        bucket = jnp.searchsorted(lax.stop_gradient(self.edges),
                                  jnp.asarray(prompt, jnp.float32), side="right")
        mean = lax.stop_gradient(self.mean_output)[bucket]
        return jnp.maximum(mean - jnp.asarray(generated, jnp.float32),
                           lax.stop_gradient(self.floor))


PREDICTOR_BUCKETS = 8  # [D] prompt-length quantile buckets of fit_length_predictor
PREDICTOR_FLOOR = 1.0  # [D] tokens


def fit_length_predictor(prompt_tokens, output_tokens, buckets: int = PREDICTOR_BUCKETS,
                         floor: float = PREDICTOR_FLOOR) -> LengthPredictor:
    """A :class:`LengthPredictor` fit on training requests (host arrays [N]): bucket edges
    at the prompt lengths' quantiles 1/K .. (K-1)/K (ties merged), each bucket's mean
    output (an empty bucket gets the pool's mean)."""
    prompt = np.asarray(prompt_tokens, np.float64)
    output = np.asarray(output_tokens, np.float64)
    if prompt.shape != output.shape or prompt.size == 0:
        raise ConfigError("predictor.requests", prompt.shape,
                          "needs prompts and outputs of one non-empty shape")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ConfigError("predictor.buckets", buckets, "must be an integer >= 1")
    if not (np.isfinite(floor) and floor >= 0):
        raise ConfigError("predictor.floor", floor, "must be a finite number >= 0")
    edges = np.unique(np.quantile(prompt, np.arange(1, buckets) / buckets))
    which = np.searchsorted(edges, prompt, side="right")
    means = np.array([output[which == k].mean() if np.any(which == k) else output.mean()
                      for k in range(edges.size + 1)])
    return LengthPredictor(jnp.asarray(edges, jnp.float32), jnp.asarray(means, jnp.float32),
                           jnp.float32(floor))


def uninformed_predictor() -> LengthPredictor:
    """One bucket of mean 0: every request is predicted to have ``floor`` tokens left (a
    constant feature; for policies trained without a pool, learn/train.py)."""
    return LengthPredictor(jnp.zeros(0, jnp.float32), jnp.zeros(1, jnp.float32),
                           jnp.float32(PREDICTOR_FLOOR))


@struct.dataclass
class NetPolicy:
    """A network policy's parameters (``SimParams.policy``): ``net`` the UnitScorer's flax
    parameters (trained), ``predictor`` its LengthPredictor (fit, not trained)."""

    net: object
    predictor: LengthPredictor


@struct.dataclass
class UnitFeatures:
    """What a scorer sees about every KV unit of every request, and about the system.

    importance f32 [R, U]: PAM importance EMA (shares of attention mass, <= 1).
    selected f32 [R, U]: 1 where the selector attended the unit at this step.
    age f32 [R, U]: tokens since the unit's last token was written.
    position f32 [R, U]: the unit's first token / context length, in [0, 1].
    tier f32 [R, U, T]: tier probabilities (one-hot for hard placements).
    present bool [R, U]: the unit exists.
    request_age f32 [R]: output tokens the request has generated so far.
    predicted_remaining f32 [R]: LengthPredictor.remaining (from the prompt, never the
      true output).
    occupancy f32 [T]: fraction of each tier's capacity in use.
    link_load_s f32 []: the previous step's migration on its busiest link, s.
    """

    importance: jnp.ndarray
    selected: jnp.ndarray
    age: jnp.ndarray
    position: jnp.ndarray
    tier: jnp.ndarray
    present: jnp.ndarray
    request_age: jnp.ndarray
    predicted_remaining: jnp.ndarray
    occupancy: jnp.ndarray
    link_load_s: jnp.ndarray


def unit_features(importance, selected, context, tier_probs, present, page_size: int,
                  view: LifetimeView, predictor: LengthPredictor) -> UnitFeatures:
    """Build :class:`UnitFeatures` from engine-side arrays (the exact engine's hook and the
    relaxation both call this, so the features are computed the same way).

    Args:
      importance: f32 [R, U]; selected: bool or f32 [R, U]; context: i32 [R] tokens;
      tier_probs: f32 [R, U, T]; present: bool [R, U]; page_size: tokens per unit (static);
      view: types.LifetimeView of the same R requests; predictor: LengthPredictor.
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
        request_age=jnp.asarray(view.generated, jnp.float32),
        predicted_remaining=predictor.remaining(view.prompt, view.generated),
        occupancy=jnp.asarray(view.occupancy, jnp.float32),
        link_load_s=jnp.asarray(view.link_load_s, jnp.float32),
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
        shape = features.importance.shape
        per_request = jnp.stack([jnp.log1p(features.request_age) / 10.0,
                                 jnp.log1p(features.predicted_remaining) / 10.0], axis=-1)
        system = jnp.concatenate([features.occupancy,
                                  jnp.log1p(1e3 * features.link_load_s)[None] / 5.0])
        # Scaled to O(1) for the first layer; request and system features broadcast to units.
        x = jnp.concatenate([
            jnp.stack([log_imp / 10.0, features.selected, jnp.log1p(features.age) / 10.0,
                       features.position], axis=-1),
            features.tier,
            jnp.broadcast_to(per_request[:, None, :], shape + (2,)),
            jnp.broadcast_to(system, shape + system.shape)], axis=-1)  # [R, U, F]
        for _ in range(self.depth):
            x = nn.tanh(nn.Dense(self.hidden)(x))
        # Zero-initialised head: the untrained network reproduces the PAM rule exactly.
        delta = nn.Dense(1, kernel_init=nn.initializers.zeros,
                         bias_init=nn.initializers.zeros)(x)[..., 0]
        return jnp.where(features.present, delta, 0.0)


def init_net(key, num_units: int = 4, hidden: int = 32, depth: int = 2,
             predictor: LengthPredictor | None = None) -> NetPolicy:
    """A zero-head :class:`NetPolicy` (= the PAM rule); parameter shapes do not depend on
    R or U. ``predictor`` defaults to :func:`uninformed_predictor`."""
    r = 1
    view = LifetimeView(jnp.ones(r, jnp.int32), jnp.zeros(r, jnp.int32),
                        jnp.zeros(NUM_TIERS, jnp.float32), jnp.float32(0.0))
    predictor = uninformed_predictor() if predictor is None else predictor
    dummy = unit_features(jnp.full((r, num_units), 1.0 / num_units), jnp.zeros((r, num_units)),
                          jnp.full(r, num_units, jnp.int32),
                          jnp.zeros((r, num_units, NUM_TIERS)), jnp.ones((r, num_units), bool),
                          1, view, predictor)
    return NetPolicy(net=UnitScorer(hidden, depth).init(key, dummy), predictor=predictor)


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


def make_scorer(hidden: int = 32, depth: int = 2, page_size: int = 1):
    """``score(policy, importance, selected, context, tier_probs, present, view) -> f32
    [R, U]`` log-scale correction of a UnitScorer (``policy`` a NetPolicy, ``view`` a
    types.LifetimeView): the relaxation calls it with soft tier probabilities
    (learn/relaxed.py), the engine hook with one-hot tiers (:func:`net_engine_hook`)."""
    module = UnitScorer(hidden, depth)

    def score(policy, importance, selected, context, tier_probs, present, view):
        features = unit_features(importance, selected, context, tier_probs, present,
                                 page_size, view, policy.predictor)
        return module.apply(policy.net, features)

    return score


_SCORERS: dict = {}


def net_engine_hook(hidden: int = 32, depth: int = 2, page_size: int = 1):
    """The ``EngineConfig.placement_score`` callable for a UnitScorer of this shape.

    Cached per shape so equal configs hash equal (one compile per config, not per call).
    The engine calls it as ``hook(params.policy, importance, selected, context, unit_tier,
    present, view) -> f32 [R, U]`` correction, at admission and before the online swaps
    (see types.EngineConfig); ``params.policy`` is a NetPolicy.
    """
    key = (hidden, depth, page_size)
    if key not in _SCORERS:
        score = make_scorer(hidden, depth, page_size)

        def hook(policy, importance, selected, context, unit_tier, present, view):
            return score(policy, importance, selected, context, one_hot_tiers(unit_tier),
                         present, view)

        _SCORERS[key] = hook
    return _SCORERS[key]


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise UnknownNameError("policy family", family, FAMILIES)
    return family
