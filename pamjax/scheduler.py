"""PAM's online KV scheduling (PAM_SPEC §5), vectorised over requests, no loop over tokens.

Per request and per decode step, with IS_t the sum of the importance factors on tier t:

1. while (x* + y*) < (x + y): swap the least important DDR unit with the most important SSD
   unit (x* = IS_HBM / IS_SSD, y* = IS_DDR / IS_SSD);
2. while x* / y* < x / y: swap the least important HBM unit with the most important DDR unit.

A swap is only made while the slower tier's candidate is more important than the faster
tier's (the termination guard). The swap budget (PAM_SPEC §5 [D], revised) is in tokens: a
request may move ``swap_budget`` tokens per phase per step, so at pages of P tokens it
swaps ``floor((k + 1) B / P) - floor(k B / P)`` pages per phase at its k-th decode step
(:func:`pages_allowed`): B / P pages per step on average, the same moved volume at any page
size.

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
from flax import struct
from jax import lax

from pamjax.active_rows import narrow_columns, on_active_rows
from pamjax.placement import corrected_key
from pamjax.types import DDR, HBM, NUM_TIERS, SSD

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
                      for t in range(NUM_TIERS)], axis=-1)


def pages_allowed(swap_budget, decode_index, page_size: int):
    """Pages a request may swap per phase at its ``decode_index``-th decode step (i32, any
    shape): its budget of ``swap_budget`` tokens per step, counted in whole pages."""
    return ((decode_index + 1) * swap_budget) // page_size \
        - (decode_index * swap_budget) // page_size


def schedule(params, importance, tier, bank_group, present, max_swaps: int, budget):
    """Apply PAM's two swap phases to every request.

    Args:
      importance: f32 [R, U] importance factors; tier: i8 [R, U]; bank_group: i16 [R, U];
      present: bool [R, U] units that exist (of running requests).
      max_swaps: static bound on swaps per phase.
      budget: i32 [R] units each request may swap per phase (pages_allowed; min'd with
        ``max_swaps``).

    Returns:
      (tier, bank_group, ddr_ssd_swaps [R], hbm_ddr_swaps [R]).
    """
    x, y = params.target_x, params.target_y
    budget = budget[:, None]

    share = tier_importance(importance, tier, present)
    hbm, ddr, ssd = share[:, 0:1], share[:, 1:2], share[:, 2:3]
    # Phase 1, (IS_H + IS_D') < (x + y) IS_S' written without division (IS_S may be 0).
    tier, bank_group, ds = _swap_phase(
        importance, tier, bank_group, present, DDR, SSD, budget, max_swaps,
        lambda g: (hbm + ddr + g) < (x + y) * (ssd - g))

    share = tier_importance(importance, tier, present)
    hbm, ddr = share[:, 0:1], share[:, 1:2]
    # Phase 2, IS_H' / IS_D' < x / y.
    tier, bank_group, hd = _swap_phase(
        importance, tier, bank_group, present, HBM, DDR, budget, max_swaps,
        lambda g: y * (hbm + g) < x * (ddr - g))
    return tier, bank_group, ds, hd


def schedule_step(config, params, state, attended, context, view=None):
    """The engine's scheduling phase: PAM's swaps on every decoding request.

    Units are ranked by the importance factor, or by ``importance x exp(c)`` with a learned
    placement score c (``config.placement_score``, placement.corrected_key). Each request's
    budget follows its own decode count (``slot_generated``, pages_allowed). Systems without
    online scheduling (swap budget 0) skip the phase: no swap could happen.

    Args:
      config: EngineConfig; params: SimParams; state: EngineState after the access model;
      attended: locality.Attention; context: i32 [R] tokens per slot after the decode;
      view: LifetimeView of the slots (only with a learned ``config.placement_score``).

    Returns:
      EngineState with ``unit_tier`` and ``unit_bank_group`` after the swaps.
    """
    def run_scheduler(rows):
        # Only row-wise work, on unit tables of any width (no swap past a row's units):
        # on_active_rows may run it on the decoding rows alone, on narrow columns.
        importance, tier, bank_group, present, selected, context, generated, lifetimes = rows
        # A learned score's view: its per-request fields follow the rows, the system-wide
        # ones (occupancy, link load) are the same for every row.
        row_view = None if lifetimes is None else view.replace(prompt=lifetimes[0],
                                                                generated=lifetimes[1])
        rank_key = importance if config.placement_score is None else corrected_key(
            importance, config.placement_score(params.policy, importance, selected,
                                               context, tier, present, row_view), present)
        budget = pages_allowed(params.swap_budget, generated, config.page_size)
        return schedule(params, rank_key, tier, bank_group, present, config.max_swaps,
                        budget)[:2]

    def scheduled(tier, bank_group):
        rows = (state.unit_importance, tier, bank_group, attended.present, attended.selected,
                context, state.slot_generated,
                None if view is None else (view.prompt, view.generated))
        if not config.skip_idle:
            return run_scheduler(rows)
        # A request that does not decode has no present unit, so it makes no swap; one that
        # decodes has its first unit present.
        columns = narrow_columns(config, context, (True,) * 5 + (False,) * 3, True)
        return on_active_rows(attended.present[:, 0], run_scheduler, rows, (tier, bank_group),
                              columns)

    tier, bank_group = lax.cond(params.swap_budget > 0, scheduled,
                                lambda tier, bank_group: (tier, bank_group),
                                state.unit_tier, state.unit_bank_group)
    return state.replace(unit_tier=tier, unit_bank_group=bank_group)


@struct.dataclass
class Migration:
    """What changed tier in a step (PAM's swaps and HBM displacements), all i32.

    units []: units moved; units_from_ssd []: of them, units that left the SSD;
    tokens [T, T]: tokens moved from tier i to tier j.
    """

    units: jnp.ndarray
    units_from_ssd: jnp.ndarray
    tokens: jnp.ndarray


def migration(tier_before, tier_after, tokens, active=None, columns=None) -> Migration:
    """Units and tokens that changed tier in a step; a unit opened in the step (no tier
    before) is not a migration.

    Args:
      tier_before, tier_after: i8 [R, U] tier tables at the start of the step's decode and
        after scheduling; tokens: i32 [R, U] tokens per unit; active: None, or bool [R] the
        only rows where a unit may have moved (the decoding requests), counted alone
        (active_rows.on_active_rows; the counts are integers, so the totals are the same);
        columns: None, or the active rows' narrow columns (active_rows.narrow_columns).

    Returns:
      Migration.
    """
    def per_request(rows):
        before, after, held = rows
        moved = (before >= 0) & (after != before)
        from_i = jnp.clip(before.astype(jnp.int32), 0, NUM_TIERS - 1)
        to_i = jnp.clip(after.astype(jnp.int32), 0, NUM_TIERS - 1)
        moved_tokens = jnp.where(moved, held, 0)
        # Tokens per (from, to) pair as masked row sums: on CPU nine fused passes cost less
        # than one scatter-add over every unit.
        pair_tokens = jnp.stack(
            [jnp.sum(jnp.where((from_i == i) & (to_i == j), moved_tokens, 0), -1)
             for i in range(NUM_TIERS) for j in range(NUM_TIERS)], -1)
        return (jnp.sum(moved, -1, dtype=jnp.int32),
                jnp.sum(moved & (before == SSD), -1, dtype=jnp.int32), pair_tokens)

    rows = (tier_before, tier_after, tokens)
    if active is None:
        counts = per_request(rows)
    else:
        r_slots = tier_before.shape[0]
        none = jnp.zeros(r_slots, jnp.int32)
        counts = on_active_rows(active, per_request, rows,
                                (none, none, jnp.zeros((r_slots, NUM_TIERS ** 2), jnp.int32)),
                                columns)
    units, from_ssd, pair_tokens = counts
    return Migration(units=jnp.sum(units), units_from_ssd=jnp.sum(from_ssd),
                     tokens=jnp.sum(pair_tokens, 0).reshape(NUM_TIERS, NUM_TIERS))
