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

import jax.numpy as jnp
from jax import lax

_ABSENT = -3.0e38  # top_k key for units that are not candidates


def _swap_phase(importance, tier, bank_group, present, fast, slow, budget, max_swaps,
                keeps_going):
    """One phase: returns updated (tier, bank_group) and the swaps made per request [R]."""
    rows = jnp.arange(tier.shape[0])[:, None]
    fast_key = jnp.where(present & (tier == fast), -importance, _ABSENT)
    slow_key = jnp.where(present & (tier == slow), importance, _ABSENT)
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
    return tier, bank_group, do.sum(-1)


def tier_importance(importance, tier, present):
    """IS per request and tier, f32 [R, T]."""
    tiers = jnp.arange(3, dtype=tier.dtype)
    on = present[..., None] & (tier[..., None] == tiers)
    return jnp.sum(jnp.where(on, importance[..., None], 0.0), axis=1)


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
