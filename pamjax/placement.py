"""Where KV units live: tier allocation, initial (prefill) placement and bank-group mapping.

The placement table is two [R, U] arrays in the engine state: ``unit_tier`` (int8, -1 = no
unit) and ``unit_bank_group`` (int16). Every function here is vectorised over requests and
units; capacity is shared by all requests, so allocations are made in slot (FCFS) order with
an exclusive cumulative sum instead of a loop.
"""

from __future__ import annotations

import jax.numpy as jnp

from pamjax.locality import threshold_bracket, top_count
from pamjax.types import PLACEMENT_IMPORTANCE_RATIO

NUM_TIERS = 3


def allocate_in_order(demand, free):
    """Grant a shared resource to rows in order: row r gets what is left after rows < r.

    Args:
      demand: i32 [M] units each row asks for (>= 0).
      free: i32 [] units available.

    Returns:
      i32 [M] granted units, each in [0, demand], summing to at most ``free``.
    """
    before = jnp.cumsum(demand) - demand
    return jnp.clip(free - before, 0, demand)


def prompt_tier_counts(demand_hbm, demand_ddr, units, free):
    """Units of each prompt per tier, honouring shared capacity, fastest tier first.

    Each request asks for ``demand_hbm`` HBM and ``demand_ddr`` DDR units of its ``units``;
    what the HBM cannot grant spills to DDR, what DDR cannot grant spills to SSD. SSD
    room is not checked here: admission reserved every admitted request's whole KV.

    Args:
      demand_hbm, demand_ddr, units: i32 [M]; free: i32 [T] free units per tier.

    Returns:
      (hbm, ddr, ssd) i32 [M] each.
    """
    hbm = allocate_in_order(demand_hbm, free[0])
    ddr = allocate_in_order(units - hbm - jnp.maximum(units - demand_hbm - demand_ddr, 0),
                            free[1])
    return hbm, ddr, units - hbm - ddr


def initial_tiers(params, importance, present, free, target_share, iters: int):
    """Tier of every prompt unit of the requests being admitted.

    Fastest-first (baselines): units in position order fill HBM, then DDR, then SSD.
    Importance ratio (PAM, PAM_SPEC §5): units in decreasing prefill importance go to HBM
    until HBM holds ``target_share[0]`` of the request's importance, then to DDR until it
    holds ``target_share[1]``, the rest to SSD; shortfalls of capacity spill downwards.
    Disabled tiers have no free units, so everything spills past them. Ranking by importance
    uses bisection (locality.top_count), not a sort.

    Args:
      importance: f32 [A, U] prefill attention mass of each unit (rows sum to 1).
      present: bool [A, U] units that exist (prompt units of admitted requests).
      free: i32 [T] free units per tier.
      target_share: f32 [T] desired importance share per tier (sums to 1).
      iters: bisection iterations.

    Returns:
      i8 [A, U] tiers (-1 where not present).
    """
    position = jnp.arange(importance.shape[-1], dtype=jnp.int32)[None, :]
    by_importance = params.placement_policy == PLACEMENT_IMPORTANCE_RATIO
    units = present.sum(-1).astype(jnp.int32)
    mass = jnp.where(present, importance, 0.0)

    # Units needed, most important first, to cover each tier's importance share.
    def units_to_cover(share):
        lo, _ = threshold_bracket(mass, mass, share * mass.sum(-1), iters)
        covering = present & (mass >= lo[:, None])
        # A share of 0 needs no unit; a positive share needs at least one.
        return jnp.where(share > 0, jnp.maximum(covering.sum(-1), 1), 0).astype(jnp.int32)

    want_hbm = jnp.minimum(units_to_cover(target_share[0]), units)
    want_fast = jnp.maximum(jnp.minimum(units_to_cover(target_share[0] + target_share[1]),
                                        units), want_hbm)
    demand_hbm = jnp.where(by_importance, want_hbm, units)
    demand_ddr = jnp.where(by_importance, want_fast - want_hbm, units)
    hbm, ddr, _ = prompt_tier_counts(demand_hbm, demand_ddr, units, free)

    in_hbm = jnp.where(by_importance, top_count(mass, present, hbm, iters),
                       position < hbm[:, None])
    in_fast = jnp.where(by_importance, top_count(mass, present, hbm + ddr, iters),
                        position < (hbm + ddr)[:, None])
    tier = jnp.where(in_hbm, 0, jnp.where(in_fast, 1, 2))
    return jnp.where(present, tier, -1).astype(jnp.int8)


def bank_group_order(params, activation):
    """Bank groups of each tier from least to most activated over the window, i32 [T, G].

    Padding groups (beyond a tier's count) sort last. Computed once per step and shared by
    every placement of that step (a CPU sort of [T, G] costs ~0.1 ms).
    """
    groups = activation.shape[-1]
    count = params.bank_groups.astype(jnp.int32)
    g = jnp.arange(groups, dtype=jnp.int32)
    padding = jnp.where(g[None, :] < count[:, None], 0, jnp.iinfo(jnp.int32).max // 2)
    return jnp.argsort(activation.sum(0) + padding, axis=-1, stable=True).astype(jnp.int32)


def assign_bank_groups(params, tier, is_new, order, sequence_index):
    """Bank group of new units inside their device (PAM's intra-device mapping).

    Greedy (PAM): the new units of a tier, taken in row-major order, go round-robin over that
    tier's bank groups sorted by their activation count over the last W decode steps
    (``order``, from bank_group_order), so the least-activated groups receive tokens first
    and a batch of new tokens does not herd onto one group. Sequential fill (ablation):
    ``naive_run_units`` consecutive units of a request share a bank group, as a fill-order
    layout would, ignoring activation.

    Args:
      tier: i8 [M] tier of each unit; is_new: bool [M] units to map.
      order: i32 [T, G] bank groups by increasing activation.
      sequence_index: i32 [M] global sequential position of each unit (request-major).

    Returns:
      i16 [M] bank groups (meaningful where ``is_new``; the caller masks).
    """
    count = params.bank_groups.astype(jnp.int32)  # [T]
    tier_i = jnp.clip(tier.astype(jnp.int32), 0, NUM_TIERS - 1)
    one_hot = (tier_i[:, None] == jnp.arange(NUM_TIERS)[None, :]) & is_new[:, None]
    rank = (jnp.cumsum(one_hot, axis=0) - one_hot)[jnp.arange(tier.shape[0]), tier_i]
    tier_count = count[tier_i]
    greedy = order[tier_i, rank % tier_count]
    naive = (sequence_index // jnp.maximum(params.naive_run_units, 1)) % tier_count
    return jnp.where(params.greedy_mapping, greedy, naive).astype(jnp.int16)
