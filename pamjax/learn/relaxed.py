"""A differentiable relaxation of PAM's decode step, for training placement policies.

The exact engine (engine.py) places every KV unit on one tier with hard top-k decisions, so
``jax.grad`` of its step time with respect to the policy knobs is zero almost everywhere. This
module re-states the *decode* part of a step with soft decisions and the same cost model:

* **Admission (soft x:y:1 rule).** At the start of the episode each unit u of request r is
  given tier probabilities from the rule (placement.initial_tiers): with B_u the share of
  the request's importance (or a learned policy's key, policy.py) at or below u,
  ``P(HBM) = sigmoid((log B_u - log(s_D + s_S)) / tau)`` and ``P(SSD) = (1 - P(HBM))
  sigmoid((log s_S - log B_u) / tau)``, s = softmax(log x, log y, 0) the target shares
  (:func:`soft_target`; the hard rule is tau -> 0). The summed probabilities are each
  request's demand per tier, granted in FCFS order against the tiers' capacity by the exact
  engine's own placement.prompt_tier_counts.
* **Per-step placement (soft top-k).** The exact scheduler swaps one-for-one and a new unit
  displaces an HBM unit when HBM is full, so a request keeps the HBM and SSD unit counts it
  was granted (DDR takes its new units). Each step the policy's key (importance EMA, or
  importance x exp(learned correction)) ranks the units; ``P(HBM) = sigmoid((log key -
  c_H) / tau)`` and ``P(SSD) = (1 - P(HBM)) sigmoid((c_S - log key) / tau)``, with
  thresholds c_H, c_S chosen so the expected counts equal the grants
  (:func:`soft_counts_placement`).
* **Swap budget.** The placement moves from q_prev towards the capacity-feasible target by a
  fraction ``beta = min(1, m / d)`` (smoothed as ``(1 + (d / m)^p)^(-1/p)``, p =
  ``budget_sharpness``), where d is the expected number of units whose tier must change and
  m = 4 x budget the unit moves the two swap phases may make per request and step.
* **Migration** is the expected moved tokens between consecutive soft placements under the
  cheapest coupling of each unit's two tier distributions: mass leaving tier i,
  relu(q_prev - q_new), goes to the tiers gaining mass in proportion to their gain.
* **Critical path.** The attention time of a step is the maximum over tiers in the exact cost
  model; here it is the log-sum-exp ``s tau log sum exp(t_i / (s tau))`` with s =
  max_i t_i, an upper bound that is at most
  ``s tau log 3`` above the max. A tier's fixed cost (Q and partial round trips) is gated by
  the soft probability that it holds any KV.

Everything else is exact and shared: the access model (locality.py: latent drift, logits,
attention mass, the hard retrieval selector, which does not depend on the policy), the
importance EMA, and the time/energy coefficients (``costs.step_cost``, called with the
``smooth_max`` and ``tier_in_use`` hooks).

What it leaves out, by design (the exact engine remains the judge of every reported number):
prefill and admission during the episode (a fixed batch of R requests, decode only, grants
fixed at step 0), request completion, bank groups (the busiest bank group is the tier's
selected tokens / bank groups x ``bank_group_imbalance``, i.e. the greedy mapping assumed
balanced), the ratio condition that can stop the exact scheduler's swaps before the counts
are filled by rank (the relaxation always moves towards "top units on HBM"), and which unit
a new one displaces. ``relaxation_gap`` measures what these cost.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from pamjax import locality
from pamjax.costs import StepCounts, step_cost
from pamjax.errors import ConfigError
from pamjax.learn.policy import SoftKnobs
from pamjax.placement import corrected_key, lifetime_view, prompt_tier_counts
from pamjax.types import NUM_TIERS

_EPS = 1e-12
_TINY = 1e-30  # floor of a share before its logarithm (a normal float32)


@dataclasses.dataclass(frozen=True)
class RelaxConfig:
    """Static sizes and modelling constants of the relaxation.

    Fields:
      batch: R, requests decoding together.
      units_per_request: U, KV units per request (covers context + steps).
      page_size: tokens per unit.
      steps: decode steps per episode.
      bisection_iters: iterations of the (hard) selector's threshold search.
      bank_group_imbalance: busiest bank group / mean bank group of a tier (1 = the greedy
        mapping balances perfectly).
      budget_sharpness: p of the smooth min(1, m / d) that converts the swap budget into a
        tracking rate.
    """

    batch: int
    units_per_request: int
    page_size: int
    steps: int
    bisection_iters: int = 20
    bank_group_imbalance: float = 1.0
    budget_sharpness: float = 4.0

    def __post_init__(self):
        for field in ("batch", "units_per_request", "page_size", "steps",
                      "bisection_iters"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"relax.{field}", value, "must be an integer >= 1")
        if not self.bank_group_imbalance >= 1.0:
            raise ConfigError("relax.bank_group_imbalance", self.bank_group_imbalance,
                              "must be >= 1")
        if not self.budget_sharpness > 0:
            raise ConfigError("relax.budget_sharpness", self.budget_sharpness, "must be > 0")


@struct.dataclass
class Episode:
    """One decode episode: context i32 [R] tokens at its start, seed u32 [] of the access
    model (the same counter-based stream as the exact engine: request ids are 0..R-1).

    prompt, generated i32 [R] (optional): each request's prompt tokens and the output tokens
    it has produced at the start (a steady-state episode, relaxed_loop.py; what a network
    policy's LifetimeView reports). None: requests admitted fresh at the episode's start
    (prompt = context, nothing generated; learn/train.py's fixed-batch episodes).
    """

    context: jnp.ndarray
    seed: jnp.ndarray
    prompt: object = None
    generated: object = None


def _admission_view(params, episode: Episode):
    """(prompt i32 [R], output tokens generated at admission i32 [R]) of an episode, and
    the LifetimeView of its admission: nothing placed yet, no step taken (as engine.resume
    and a fresh admission see it)."""
    prompt = episode.context if episode.prompt is None else episode.prompt
    generated = jnp.zeros_like(episode.context) if episode.generated is None \
        else episode.generated
    view = lifetime_view(params, jnp.zeros(NUM_TIERS, jnp.float32), prompt, generated,
                         jnp.zeros((NUM_TIERS, NUM_TIERS), jnp.float32))
    return prompt, generated, view


def smooth_max(values, temperature):
    """Log-sum-exp maximum with a temperature relative to the largest value (see module)."""
    # The scale is differentiated too, so the gradient is that of the function evaluated.
    scale = jnp.max(jnp.abs(values)) * temperature + _EPS
    return scale * jax.nn.logsumexp(values / scale)


def _soft_any(prob, axis):
    """P(at least one) of independent events with probabilities ``prob`` along ``axis``."""
    return 1.0 - jnp.exp(jnp.sum(jnp.log1p(-jnp.clip(prob, 0.0, 1.0 - 1e-6)), axis=axis))


def soft_target(key, present, log_x, log_y, temperature):
    """Soft x:y:1 placement of each request's units ranked by ``key``.

    With B_u the share of the request's key mass at or below unit u (u included), the hard
    rule puts u on HBM iff B_u > s_D + s_S (HBM takes the fewest top units covering s_H) and
    on SSD iff B_u <= s_S. Importance is heavy-tailed (most units hold shares many orders of
    magnitude below the top ones), so the comparisons are made between logarithms:
    ``P(HBM) = sigmoid((log B_u - log(s_D + s_S)) / tau)``, ``P(SSD) = (1 - P(HBM))
    sigmoid((log s_S - log B_u) / tau)``; tau is in natural-log units of share.

    Args:
      key: f32 [R, U] ranking key (>= 0; importance or a learned score).
      present: bool [R, U]; log_x, log_y: f32 []; temperature: f32 [].

    Returns:
      f32 [R, U, T] tier probabilities, zero where absent.
    """
    logits = jnp.stack([log_x, log_y, jnp.zeros_like(log_x)])
    log_share = jax.nn.log_softmax(logits)
    log_not_hbm = jax.nn.logsumexp(logits[1:]) - jax.nn.logsumexp(logits)
    key = jnp.where(present, key, 0.0)
    order = jnp.argsort(-lax.stop_gradient(jnp.where(present, key, -1.0)), axis=-1)
    k = jnp.take_along_axis(key, order, axis=-1)
    share = k / jnp.maximum(k.sum(-1, keepdims=True), _EPS)
    # Summed from the bottom so that tail shares keep their float32 precision.
    at_or_below = jnp.flip(jnp.cumsum(jnp.flip(share, -1), axis=-1), -1)
    log_b = jnp.log(jnp.maximum(at_or_below, _TINY))
    hbm = jax.nn.sigmoid((log_b - log_not_hbm) / temperature)
    ssd = (1.0 - hbm) * jax.nn.sigmoid((log_share[2] - log_b) / temperature)
    sorted_target = jnp.stack([hbm, 1.0 - hbm - ssd, ssd], axis=-1)
    inverse = jnp.argsort(order, axis=-1)
    target = jnp.take_along_axis(sorted_target, inverse[..., None], axis=1)
    return target * present[..., None]


def _count_threshold(log_key, present, count, temperature, iters: int, upper: bool):
    """Threshold c with sum_u sigmoid(+-(log_key - c) / tau) = count per request, f32 [R].

    The bisection runs on values held constant; one Newton step from its result restores
    the first-order dependence of c on ``log_key`` and ``count`` (implicit function theorem),
    so gradients reach both.
    """
    sign = 1.0 if upper else -1.0
    lk = lax.stop_gradient(log_key)
    lo = jnp.min(jnp.where(present, lk, jnp.inf), -1) - 30.0 * temperature - 1.0
    hi = jnp.max(jnp.where(present, lk, -jnp.inf), -1) + 30.0 * temperature + 1.0
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    hi = jnp.where(jnp.isfinite(hi), hi, 1.0)
    target = lax.stop_gradient(count)

    def filled(c, values):
        return jnp.sum(jnp.where(present, jax.nn.sigmoid(sign * (values - c[:, None])
                                                         / temperature), 0.0), -1)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        # Upper (HBM): fewer units above a higher threshold; lower (SSD): the reverse.
        raise_c = (filled(mid, lk) > target) if upper else (filled(mid, lk) < target)
        return jnp.where(raise_c, mid, lo), jnp.where(raise_c, hi, mid)

    lo, hi = lax.fori_loop(0, iters, body, (lo, hi))
    c0 = lax.stop_gradient(0.5 * (lo + hi))
    s = jax.nn.sigmoid(sign * (log_key - c0[:, None]) / temperature)
    slope = jnp.sum(jnp.where(present, s * (1.0 - s), 0.0), -1) / temperature  # |d filled/dc|
    return c0 + sign * (filled(c0, log_key) - count) / jnp.maximum(slope, _EPS)


def soft_counts_placement(key, present, count_hbm, count_ssd, temperature, iters: int):
    """Soft placement holding per-request tier counts: top ``count_hbm`` units by key on HBM,
    bottom ``count_ssd`` on SSD, the rest on DDR (the exact scheduler's swaps are one-for-one,
    so a request keeps the tier counts it was granted at admission).

    Args:
      key: f32 [R, U] (>= 0); present: bool [R, U]; count_hbm, count_ssd: f32 [R] units;
      temperature: f32 [] in natural-log units of the key; iters: bisection iterations.

    Returns:
      f32 [R, U, T] tier probabilities (zero where absent).
    """
    log_key = jnp.log(jnp.maximum(key, _TINY))
    n = present.sum(-1).astype(jnp.float32)
    count_hbm = jnp.clip(count_hbm, 0.0, n)
    count_ssd = jnp.clip(count_ssd, 0.0, n - count_hbm)
    c_hbm = _count_threshold(log_key, present, count_hbm, temperature, iters, upper=True)
    hbm = jax.nn.sigmoid((log_key - c_hbm[:, None]) / temperature)
    c_ssd = _count_threshold(log_key, present, count_ssd, temperature, iters, upper=False)
    ssd = (1.0 - hbm) * jax.nn.sigmoid((c_ssd[:, None] - log_key) / temperature)
    return jnp.stack([hbm, 1.0 - hbm - ssd, ssd], axis=-1) * present[..., None]


def expected_migration(q_prev, q_new, tokens):
    """Expected tokens moved tier i -> j, f32 [T, T], under the cheapest coupling per unit."""
    out = jax.nn.relu(q_prev - q_new)
    gain = jax.nn.relu(q_new - q_prev)
    share = gain / jnp.maximum(gain.sum(-1, keepdims=True), _EPS)
    return jnp.einsum("rui,ruj,ru->ij", out, share, tokens)


def episode_state(config: RelaxConfig, params, knobs: SoftKnobs, episode: Episode,
                  temperature, score_fn=None, net_params=None, weight=None):
    """State at the start of decoding: prefill placement and the FCFS tier grants.

    ``weight`` f32 [R] in [0, 1] (default all 1) is each request's soft membership of the
    batch (learn/relaxed_loop.py): its tier demand and unit count are scaled by it, so a
    request outside the batch takes no capacity.

    Returns a dict carry for :func:`rollout` (latent, importance, q, context, count_hbm,
    count_ssd; for a network policy's LifetimeView: prompt, generated (output tokens
    before step 1's decode: the engine's slot_generated, 1 after a fresh prefill) and
    migrated f32 [T, T], the previous step's expected moves).
    """
    r, u, page = config.batch, config.units_per_request, config.page_size
    rows = jnp.arange(r, dtype=jnp.int32)
    units = jnp.arange(u, dtype=jnp.int32)
    context = episode.context.astype(jnp.int32)
    latent = locality.initial_latent(params, episode.seed, rows[:, None], units[None, :])
    tokens = locality.unit_tokens(context, page, u)
    present = tokens > 0
    logits = locality.logits(params, latent, context, page)
    mass = jnp.where(present, locality.attention_mass(logits, tokens), 0.0)
    # Admission features, as the exact engine builds them: nothing selected, no tier yet.
    prompt, generated, view = _admission_view(params, episode)
    if score_fn is None:
        key = mass
    else:
        key = corrected_key(mass, score_fn(net_params, mass, jnp.zeros_like(mass), context,
                                           jnp.zeros(mass.shape + (NUM_TIERS,)), present,
                                           view), present)
    target = soft_target(key, present, knobs.log_x, knobs.log_y, temperature)
    weight = jnp.ones(r, jnp.float32) if weight is None else weight
    demand = jnp.sum(target, axis=1) * weight[:, None]  # [R, T] units asked of each tier
    n_units = present.sum(-1).astype(jnp.float32) * weight
    free = params.capacity_units.astype(jnp.float32)
    count_hbm, _, count_ssd = prompt_tier_counts(demand[:, 0], demand[:, 2], n_units, free)
    q = soft_counts_placement(key, present, count_hbm, count_ssd, temperature,
                              config.bisection_iters)
    return dict(latent=latent, importance=mass, q=q, context=context, count_hbm=count_hbm,
                count_ssd=count_ssd, prompt=prompt, generated=jnp.maximum(generated, 1),
                migrated=jnp.zeros((NUM_TIERS, NUM_TIERS), jnp.float32))


def _decode_step(config, params, knobs, seed, temperature, score_fn, net_params, carry, xs):
    """One relaxed decode step; ``xs`` = (step number k, weight f32 [R]: how much of each
    request decodes in this step, 1 in a fixed batch; relaxed_loop's soft batch and
    lifetime). Returns (carry, StepCost)."""
    k, w = xs
    r, u, page = config.batch, config.units_per_request, config.page_size
    rows = jnp.arange(r, dtype=jnp.int32)
    units = jnp.arange(u, dtype=jnp.int32)
    context = carry["context"] + 1
    opens = (context - 1) % page == 0
    new_col = jnp.where(opens, (context - 1) // page, u)
    fresh = units[None, :] == new_col[:, None]
    tokens = locality.unit_tokens(context, page, u)
    present = tokens > 0
    # A new unit is written to HBM (PAM's new-token policy) and, HBM being full, displaces
    # one: the request's HBM and SSD counts are unchanged, DDR gains the unit.
    q_prev = jnp.where(fresh[..., None], jnp.array([1.0, 0.0, 0.0]), carry["q"])

    evolved = locality.evolve_latent(params, carry["latent"], seed, rows[:, None],
                                     units[None, :], k)
    latent = jnp.where(present & ~fresh, evolved, carry["latent"])
    logits = locality.logits(params, latent, context, page)
    mass = locality.attention_mass(logits, tokens)
    selected = locality.select(params, logits, tokens, config.bisection_iters) & present
    lam = knobs.ema_lambda
    importance = jnp.where(present, lam * mass + (1.0 - lam) * carry["importance"], 0.0)

    # --- cost of the step: placement before scheduling (as the exact engine counts it) ----
    # Every per-request count is weighted by the request's share of the step (w).
    tok = tokens.astype(jnp.float32) * w[:, None]
    sel = jnp.where(selected, tok, 0.0)
    tier_tokens = jnp.einsum("rut,ru->t", q_prev, tok)
    tier_selected = jnp.einsum("rut,ru->t", q_prev, sel)
    holds = q_prev * present[..., None]
    attends = q_prev * selected[..., None]
    sel_units = attends.sum(1)  # [R, T]
    w_col = w[:, None]

    # --- scheduling ---------------------------------------------------------------------
    if score_fn is None:
        key = importance
    else:
        # What the engine's scheduler sees: the units held now (the expected counts of the
        # requests still in the batch) and the moves of the previous step.
        view = lifetime_view(params, jnp.einsum("rut,r->t", holds, w), carry["prompt"],
                             carry["generated"], carry["migrated"])
        key = corrected_key(importance, score_fn(net_params, importance, selected, context,
                                                 q_prev, present, view), present)
    target = soft_counts_placement(key, present, carry["count_hbm"], carry["count_ssd"],
                                   temperature, config.bisection_iters)
    needed = 0.5 * jnp.sum(jnp.abs(target - q_prev), axis=(1, 2))  # [R] units to move
    # Two phases a step, each swapping budget / page pages (two units move per swap).
    moves = 4.0 * knobs.swap_budget / page
    p = config.budget_sharpness
    beta = (1.0 + (needed / jnp.maximum(moves, _EPS)) ** p) ** (-1.0 / p)
    q_new = q_prev + beta[:, None, None] * (target - q_prev)
    migrated = expected_migration(q_prev, q_new, tok)

    counts = StepCounts(
        decode_requests=jnp.sum(w),
        decode_context=jnp.sum(w * context.astype(jnp.float32)),
        tier_tokens=tier_tokens,
        tier_selected=tier_selected,
        tier_busiest_bank_group=tier_selected / params.bank_groups_per_device
        * config.bank_group_imbalance,
        tier_requests=jnp.sum(w_col * _soft_any(attends, 1), 0),
        tier_holders=jnp.sum(w_col * _soft_any(holds, 1), 0),
        tier_active_bank_groups=jnp.sum(w_col * jnp.minimum(
            sel_units, params.bank_groups_per_device), 0),
        # PAMattention sends one partial per request and tier: the chunk count is unused.
        tier_active_chunks=jnp.sum(w_col * _soft_any(attends, 1), 0),
        tier_topk_candidates=jnp.sum(w_col * jnp.minimum(
            jnp.einsum("rut,ru->rt", q_prev, tokens.astype(jnp.float32)),
            jnp.maximum(jnp.ceil(params.select_fraction * jnp.sum(tokens, -1)), 1.0)[:, None]),
            0),
        # New tokens go to HBM.
        tier_decode_writes=jnp.stack([jnp.sum(w), jnp.float32(0.0), jnp.float32(0.0)]),
        prefill_tokens=jnp.float32(0.0),
        prefill_pairs=jnp.float32(0.0),
        prefill_tier_tokens=jnp.zeros(NUM_TIERS, jnp.float32),
        migrated_tokens=migrated,
        sparse=(params.select_fraction < 1.0).astype(jnp.float32),
    )
    in_use = _soft_any((holds * w[:, None, None]).reshape(-1, NUM_TIERS), 0)
    cost = step_cost(params, counts, smooth_max=functools.partial(smooth_max,
                                                                   temperature=temperature),
                     tier_in_use=in_use)
    carry = dict(carry, latent=latent, importance=importance, q=q_new, context=context,
                 generated=carry["generated"] + 1, migrated=migrated)
    return carry, cost


def rollout(config: RelaxConfig, params, knobs: SoftKnobs, episode: Episode, temperature,
            score_fn=None, net_params=None) -> jnp.ndarray:
    """Run ``config.steps`` relaxed decode steps; returns each step's time, s, f32 [S].

    Args:
      config: static sizes.
      params: SimParams of the system (PAM); its policy knobs are ignored in favour of
        ``knobs``.
      knobs: SoftKnobs (x, y, lambda, swap budget) of the rule.
      episode: Episode.
      temperature: f32 [] relaxation temperature: of the placement sigmoids in natural-log
        units of the share (admission, :func:`soft_target`) and of the key (per-step
        placement, :func:`soft_counts_placement`); of the smooth max relative to the
        slowest tier (:func:`smooth_max`).
      score_fn: None (rank by importance) or ``f(net_params, importance, selected,
        context, tier_probs, present, view) -> [R, U]`` (policy.make_scorer), a log-scale
        correction: units are ranked by importance x exp(correction)
        (placement.corrected_key), at admission and at every step.
      net_params: parameters of ``score_fn``.
    """
    carry = episode_state(config, params, knobs, episode, temperature, score_fn, net_params)
    body = functools.partial(_decode_step, config, params, knobs, episode.seed, temperature,
                             score_fn, net_params)
    # Step numbers as the exact engine sees them when all requests are admitted at step 0.
    xs = (jnp.arange(1, config.steps + 1), jnp.ones((config.steps, config.batch), jnp.float32))
    _, cost = lax.scan(jax.checkpoint(body), carry, xs)
    return cost.time_s


def objective_ms(config, params, knobs, episode, temperature, score_fn=None,
                 net_params=None):
    """Mean relaxed decode-step time of an episode, ms (f32 [])."""
    return 1e3 * jnp.mean(rollout(config, params, knobs, episode, temperature, score_fn,
                                  net_params))
