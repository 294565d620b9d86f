"""PAM's online KV scheduling (PAM_SPEC §5), vectorised over requests, no loop over tokens.

Per request and per decode step, with IS_t the sum of the importance factors on tier t:

1. while (x* + y*) < (x + y): swap the least important DDR unit with the most important SSD
   unit (x* = IS_HBM / IS_SSD, y* = IS_DDR / IS_SSD);
2. while x* / y* < x / y: swap the least important HBM unit with the most important DDR unit.

A swap is only made while the slower tier's candidate is more important than the faster
tier's (the termination guard), and at most ``swap_budget`` swaps per phase (PAM_SPEC [D]).

Vectorisation: the k-th swap of a phase pairs the k-th most important slow-tier unit with the
k-th least important fast-tier unit, so ``lax.top_k`` of each side gives every candidate pair
at once. The importance gained by the fast tier from swap k is ``a_k - b_k``, which decreases
with k; the loop condition before swap k depends only on the gain accumulated by swaps < k,
and is monotone in it, so the number of swaps the sequential loop makes is the length of the
leading run of pairs whose condition and guard hold. The normalisation of IS by the request's
token count (PAM_SPEC [D]) cancels in both ratios and is omitted.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

_ABSENT = -3.0e38  # top_k key for units that are not candidates


def _swap_phase(importance, tier, bank_group, present, fast, slow, budget, max_swaps,
                keeps_going):
    """One phase: returns updated (tier, bank_group) and the swaps made per request [R].

    ``lax.top_k`` dominates the cost of a step, so the phase is skipped (``lax.cond``) when
    no request would make its first swap; under ``vmap`` the cond becomes a select and the
    phase always runs.
    """
    on_fast = present & (tier == fast)
    on_slow = present & (tier == slow)
    least_fast = jnp.min(jnp.where(on_fast, importance, jnp.inf), axis=-1, keepdims=True)
    most_slow = jnp.max(jnp.where(on_slow, importance, -jnp.inf), axis=-1, keepdims=True)
    first_swap = (most_slow > least_fast) & keeps_going(jnp.zeros_like(least_fast)) \
        & (budget > 0)
    swap = functools.partial(_swap_candidates, fast=fast, slow=slow, max_swaps=max_swaps,
                             keeps_going=keeps_going)
    return lax.cond(jnp.any(first_swap), swap, _no_swap, importance, tier, bank_group,
                    on_fast, on_slow, budget)


def _no_swap(importance, tier, bank_group, on_fast, on_slow, budget):
    return tier, bank_group, jnp.zeros(tier.shape[0], jnp.int32)


def _swap_candidates(importance, tier, bank_group, on_fast, on_slow, budget, *, fast, slow,
                     max_swaps, keeps_going):
    rows = jnp.arange(tier.shape[0])[:, None]
    max_swaps = min(max_swaps, tier.shape[1])
    fast_key = jnp.where(on_fast, -importance, _ABSENT)
    slow_key = jnp.where(on_slow, importance, _ABSENT)
    fast_val, fast_idx = lax.top_k(fast_key, max_swaps)  # least important fast units
    slow_val, slow_idx = lax.top_k(slow_key, max_swaps)  # most important slow units
    pair_exists = (fast_val > _ABSENT / 2) & (slow_val > _ABSENT / 2)
    gain = jnp.where(pair_exists, slow_val + fast_val, 0.0)  # a_k - b_k
    gain_before = jnp.cumsum(gain, axis=-1) - gain
    k = jnp.arange(max_swaps)[None, :]
    ok = pair_exists & (gain > 0) & (k < budget) & keeps_going(gain_before)
    do = jnp.cumprod(ok.astype(jnp.int32), axis=-1).astype(bool)

    outside = tier.shape[1]  # out-of-range column: the scatter drops it
    fast_col = jnp.where(do, fast_idx, outside)
    slow_col = jnp.where(do, slow_idx, outside)
    fast_bg = jnp.take_along_axis(bank_group, fast_idx, axis=-1)
    slow_bg = jnp.take_along_axis(bank_group, slow_idx, axis=-1)
    tier = tier.at[rows, fast_col].set(jnp.asarray(slow, tier.dtype), mode="drop")
    tier = tier.at[rows, slow_col].set(jnp.asarray(fast, tier.dtype), mode="drop")
    # A moved unit takes its partner's bank-group slot, so bank-group occupancy is unchanged.
    bank_group = bank_group.at[rows, fast_col].set(slow_bg, mode="drop")
    bank_group = bank_group.at[rows, slow_col].set(fast_bg, mode="drop")
    return tier, bank_group, do.sum(-1).astype(jnp.int32)


def tier_importance(importance, tier, present):
    """PAM's device importance IS: the importance factors summed per request and tier.

    Args:
      importance: f32 [R, U] importance factors I; tier: i8 [R, U] tier of each unit;
      present: bool [R, U] units that exist.

    Returns:
      f32 [R, T] IS per request and tier (tiers in TIER_NAMES order).
    """
    return jnp.stack([jnp.sum(jnp.where(present & (tier == t), importance, 0.0), axis=-1)
                      for t in range(3)], axis=-1)


def schedule(params, importance, tier, bank_group, present, max_swaps: int):
    """Apply PAM's two swap phases to every request.

    Args:
      importance: f32 [R, U] importance factors; tier: i8 [R, U]; bank_group: i16 [R, U];
      present: bool [R, U] units that exist (of running requests).
      max_swaps: static bound on swaps per phase (``params.swap_budget`` <= it).

    Returns:
      (tier, bank_group, ddr_ssd_swaps [R], hbm_ddr_swaps [R]).
    """
    x, y = params.target_x, params.target_y
    budget = params.swap_budget

    share = tier_importance(importance, tier, present)
    hbm, ddr, ssd = share[:, 0:1], share[:, 1:2], share[:, 2:3]
    # Phase 1, (IS_H + IS_D') < (x + y) IS_S' written without division (IS_S may be 0).
    tier, bank_group, ds = _swap_phase(
        importance, tier, bank_group, present, 1, 2, budget, max_swaps,
        lambda g: (hbm + ddr + g) < (x + y) * (ssd - g))

    share = tier_importance(importance, tier, present)
    hbm, ddr = share[:, 0:1], share[:, 1:2]
    # Phase 2, IS_H' / IS_D' < x / y.
    tier, bank_group, hd = _swap_phase(
        importance, tier, bank_group, present, 0, 1, budget, max_swaps,
        lambda g: y * (hbm + g) < x * (ddr - g))
    return tier, bank_group, ds, hd


def calibrate_targets(tier_rates, access, *, context: int = 1024, label_fraction: float,
                      kv_bytes_per_token: float = 1.0, batch: int = 1,
                      tier_fixed_s=(0.0, 0.0, 0.0), seed: int = 0, grid: int = 256,
                      max_ratio: float = 1e12):
    """PAM's offline x:y:1 target chosen so that expected attention time per tier is equal.

    PAM_SPEC §5 [D] asks for x, y that equalise the expected attention time of the tiers.
    A tier's time per step is a fixed cost when it holds any KV (``tier_fixed_s``: the Q and
    partial-result round trips of every layer) plus ``batch`` x (selected KV bytes +
    selection-label bytes of every token it holds) / its effective PIM rate, so
    throughput-proportional importance shares alone do not equalise it: label reads scale
    with the token *count* a tier holds. This draws one request of ``context`` tokens from
    the access model (importance = attention mass), ranks its tokens by importance, assumes
    the selector attends the top ``select_fraction``, and searches the split (HBM gets the
    top ``a`` tokens, DDR the next ``b``, SSD the rest) that minimises the largest tier time
    (which equalises the times of the tiers it uses); x and y are the importance ratios of
    that split. A tier the best split leaves empty gets no importance share: x (and y when
    DDR is empty too) is then ``max_ratio``. Capacity is ignored here: when a tier is full,
    placement spills downwards at run time.

    Args:
      tier_rates: effective PIM bytes/s per tier [T].
      access: AccessModel.
      context: tokens of the calibration request.
      label_fraction: label bytes per KV byte read for every held token (costs.py).
      kv_bytes_per_token: KV bytes of one token (all layers).
      batch: requests per step the split is optimised for.
      tier_fixed_s: seconds per step a tier costs as soon as it holds KV [T].
      grid: candidate split points per tier (resolution of the search).
      max_ratio: x (and y) when the best split leaves the SSD (and DDR) no token.

    Returns:
      (x, y) floats.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    pos = np.arange(context)
    age = context - 1 - pos
    logit = access.sigma * rng.standard_normal(context) \
        + access.sink_bonus * (pos < access.sink_tokens) \
        + access.recency_bonus * np.exp(-age / access.recency_tokens)
    mass = np.exp(logit - logit.max())
    mass = np.sort(mass / mass.sum())[::-1]
    cum = np.concatenate([[0.0], np.cumsum(mass)])
    selected = max(1, int(np.ceil(access.select_fraction * context)))
    cuts = np.unique(np.linspace(0, context, grid + 1).round().astype(int))
    a, b = np.meshgrid(cuts, cuts, indexing="ij")
    valid = a + b <= context
    c = np.clip(context - a - b, 0, None)
    sel_h = np.minimum(a, selected)
    sel_d = np.clip(selected - a, 0, b)
    sel_s = selected - sel_h - sel_d
    rates = np.asarray(tier_rates, np.float64)
    scale = batch * kv_bytes_per_token
    fixed = np.asarray(tier_fixed_s, np.float64)
    times = np.stack([fixed[t] * (n > 0) + scale * (sel + label_fraction * n) / rates[t]
                      for t, (sel, n) in enumerate(((sel_h, a), (sel_d, b), (sel_s, c)))])
    worst = np.where(valid, times.max(0), np.inf)
    i, j = np.unravel_index(np.argmin(worst), worst.shape)
    best_a, best_b = int(a[i, j]), int(b[i, j])
    is_h = cum[best_a]
    is_d = cum[best_a + best_b] - is_h
    if best_a + best_b >= context:  # the SSD holds nothing
        return max_ratio, max_ratio * is_d / max(is_h, 1e-30)
    is_s = 1.0 - is_h - is_d
    return float(is_h / is_s), float(is_d / is_s)
