"""Where KV units live: tier allocation, initial (prefill) placement and bank-group mapping.

The placement table is two [R, U] arrays in the engine state: ``unit_tier`` (int8, -1 = no
unit) and ``unit_bank_group`` (int16). Every function here is vectorised over requests and
units; capacity is shared by all requests, so allocations are made in slot (FCFS) order with
an exclusive cumulative sum instead of a loop.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pamjax.locality import threshold_bracket, top_count, unit_hash
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


def prompt_tier_counts(demand_hbm, demand_ssd, units, free):
    """Units of each prompt per tier, honouring every tier's free room.

    Each request asks for ``demand_hbm`` HBM units and ``demand_ssd`` SSD units, the rest on
    DDR; what HBM cannot grant goes to DDR, what DDR cannot grant to SSD, and what SSD
    cannot take goes back up to DDR, then HBM (admission reserved every admitted request's
    whole KV across the enabled tiers, so the total always fits).

    Args:
      demand_hbm, demand_ssd, units: i32 [M]; free: i32 [T] free units per tier.

    Returns:
      (hbm, ddr, ssd) i32 [M] each, summing to ``units``.
    """
    hbm = allocate_in_order(demand_hbm, free[0])
    ddr = allocate_in_order(jnp.maximum(units - hbm - demand_ssd, 0), free[1])
    ssd = allocate_in_order(units - hbm - ddr, free[2])
    left = units - hbm - ddr - ssd
    more_ddr = allocate_in_order(left, free[1] - ddr.sum())
    more_hbm = allocate_in_order(left - more_ddr, free[0] - hbm.sum())
    return hbm + more_hbm, ddr + more_ddr, ssd


def corrected_key(importance, log_correction, present):
    """Ranking key of a learned placement policy: ``importance x exp(c - max_u c)``.

    A learned scorer (``EngineConfig.placement_score``) returns a log-scale correction c per
    unit; the key multiplies the importance factor by exp(c), scaled per request so that
    its largest factor is 1 (overflow-free; the x:y:1 rule and every ranking are per-request
    ratios, so the scale changes no decision). A zero correction returns ``importance``
    bit for bit, so an untrained zero-head scorer is the PAM rule exactly.

    Args:
      importance: f32 [R, U] importance factors (>= 0).
      log_correction: f32 [R, U] the scorer's correction (natural-log units).
      present: bool [R, U] units that exist.

    Returns:
      f32 [R, U] key (>= 0), zero where absent.
    """
    peak = jnp.max(jnp.where(present, log_correction, -jnp.inf), axis=-1, keepdims=True)
    peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    factor = jnp.exp(jnp.minimum(log_correction - peak, 0.0))
    return jnp.where(present, importance * factor, 0.0)


def initial_tiers(params, log_mass, present, free, target_share, iters: int):
    """Tier of every prompt unit of the requests being admitted.

    Fastest-first (baselines): units in position order fill HBM, then DDR, then SSD.
    Importance ratio (PAM, PAM_SPEC §5): the most important units go to HBM until HBM holds
    ``target_share[0]`` of the request's importance, the least important go to SSD while the
    SSD holds at most ``target_share[2]`` of it, the rest to DDR; shortfalls of capacity
    spill to the neighbouring tiers. Disabled tiers have no free units. Ranking uses
    bisection on log-mass (uniform resolution down to tiny tail masses), not a sort.

    Args:
      log_mass: f32 [A, U] log of each unit's prefill attention mass, up to a per-row
        constant (logit + log tokens); with a learned scorer, that plus its correction
        (the log of :func:`corrected_key`'s key).
      present: bool [A, U] units that exist (prompt units of admitted requests).
      free: i32 [T] free units per tier.
      target_share: f32 [T] desired importance share per tier (sums to 1).
      iters: bisection iterations.

    Returns:
      i8 [A, U] tiers (-1 where not present).
    """
    position = jnp.arange(log_mass.shape[-1], dtype=jnp.int32)[None, :]
    by_importance = params.placement_policy == PLACEMENT_IMPORTANCE_RATIO
    units = present.sum(-1).astype(jnp.int32)
    log_mass = jnp.where(present, log_mass, -jnp.inf)
    peak = jnp.max(log_mass, axis=-1, keepdims=True)
    mass = jnp.where(present, jnp.exp(log_mass - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = mass.sum(-1)
    values = jnp.where(present, log_mass, 0.0)

    # Fewest most-important units covering HBM's share = all but the most least-important
    # units staying within the other tiers' share. Stated from the tail because HBM's share
    # is often 1 - 1e-12, which is 1.0 in float32: covering "all" the mass would then hinge
    # on summation order, while the tail's share (y + 1) / (x + y + 1) keeps its precision.
    _, hi_rest = threshold_bracket(-values, mass, (target_share[1] + target_share[2]) * total,
                                   iters)
    cover_hbm = units - jnp.sum(present & (-values >= hi_rest[:, None]), -1)
    # Most least-important units staying within SSD's share.
    _, hi = threshold_bracket(-values, mass, target_share[2] * total, iters)
    within_ssd = jnp.sum(present & (-values >= hi[:, None]), -1)
    want_ssd = jnp.minimum(within_ssd, units).astype(jnp.int32)
    want_hbm = jnp.minimum(cover_hbm, units - want_ssd).astype(jnp.int32)

    demand_hbm = jnp.where(by_importance, want_hbm, units)
    demand_ssd = jnp.where(by_importance, want_ssd, 0)
    hbm, ddr, _ = prompt_tier_counts(demand_hbm, demand_ssd, units, free)

    in_hbm = jnp.where(by_importance, top_count(values, present, hbm, iters),
                       position < hbm[:, None])
    in_fast = jnp.where(by_importance, top_count(values, present, hbm + ddr, iters),
                        position < (hbm + ddr)[:, None])
    tier = jnp.where(in_hbm, 0, jnp.where(in_fast, 1, 2))
    return jnp.where(present, tier, -1).astype(jnp.int8)


def bank_group_order(params, activation):
    """Bank groups of each tier from least to most activated over the window, i32 [T, G].

    Padding groups (beyond a tier's count) sort last. Computed once per step and shared by
    every placement of that step (a CPU sort of [T, G] costs ~0.1 ms).

    Args:
      params: uses ``bank_groups`` f32 [T] (each tier's bank-group units per device);
      activation: i32 [W, T, G] selected units per bank group over the last W steps.

    Returns:
      i32 [T, G] bank-group indices, least activated first (ties by index).
    """
    groups = activation.shape[-1]
    count = params.bank_groups.astype(jnp.int32)
    g = jnp.arange(groups, dtype=jnp.int32)
    padding = jnp.where(g[None, :] < count[:, None], 0, jnp.iinfo(jnp.int32).max // 2)
    return jnp.argsort(activation.sum(0) + padding, axis=-1, stable=True).astype(jnp.int32)


def naive_start(request):
    """Bank group where sequential fill starts a request: a hash of its id (uint32).

    Independent of any array size, so the baseline mapping does not change with how the
    simulation is padded.

    Args:
      request: int32 request ids, any shape (e.g. [R]).

    Returns:
      uint32 hash of the same shape; callers take it modulo a tier's bank-group count.
    """
    return unit_hash(0, request, 0, 0x5EED)


def assign_bank_groups(params, tier, is_new, order, request, unit):
    """Bank group of new units inside their device (PAM's intra-device mapping).

    Greedy (PAM): the new units of a tier, taken in row-major order, go round-robin over that
    tier's bank groups sorted by their activation count over the last W decode steps
    (``order``, from bank_group_order), so the least-activated groups receive tokens first
    and a batch of new tokens does not herd onto one group. Sequential fill (ablation and
    baselines): ``naive_run_units`` consecutive units of a request share a bank group, the
    request's runs following each other from a start group given by its id (naive_start),
    ignoring activation.

    Args:
      tier: i8 [M] tier of each unit; is_new: bool [M] units to map.
      order: i32 [T, G] bank groups by increasing activation.
      request: i32 [M] request id of each unit; unit: i32 [M] its unit index.

    Returns:
      i16 [M] bank groups (meaningful where ``is_new``; the caller masks).
    """
    count = params.bank_groups.astype(jnp.int32)  # [T]
    tier_i = jnp.clip(tier.astype(jnp.int32), 0, NUM_TIERS - 1)
    one_hot = (tier_i[:, None] == jnp.arange(NUM_TIERS)[None, :]) & is_new[:, None]
    rank = (jnp.cumsum(one_hot, axis=0) - one_hot)[jnp.arange(tier.shape[0]), tier_i]
    tier_count = count[tier_i]
    greedy = order[tier_i, rank % tier_count]
    run = unit // jnp.maximum(params.naive_run_units, 1)
    naive = ((naive_start(request) % tier_count.astype(jnp.uint32)).astype(jnp.int32) + run) \
        % tier_count
    return jnp.where(params.greedy_mapping, greedy, naive).astype(jnp.int16)


def spread_over_pages(params, start_load, page_size: int):
    """Attended tokens per bank group when a unit's tokens are spread over its page.

    At token granularity a unit is one token in one bank group. A page of ``page_size``
    tokens is a coarse-graining of that: under the greedy mapping its tokens would sit in
    consecutive bank groups from the page's own, so each of ``page_size`` consecutive groups
    (cyclically, within the tier's count) gets 1/page_size of its load. Under sequential
    fill a page lies inside one run and keeps its load in one group.

    Args:
      start_load: f32 [T, G] attended tokens per (tier, bank group of the unit).
      page_size: tokens per unit (static).

    Returns:
      f32 [T, G] attended tokens per (tier, bank group).
    """
    if page_size == 1:
        return start_load
    groups = start_load.shape[-1]
    count = params.bank_groups.astype(jnp.int32)[:, None]  # [T, 1]
    g = jnp.arange(groups, dtype=jnp.int32)[None, :]
    # A window of page_size groups ending at g wraps ``whole`` times around the tier's
    # ``count`` groups plus a partial window of ``part`` groups: prefix sums over the tier's
    # groups laid out twice give it in O(T x G) instead of an O(T x G x P) gather (the
    # gather was half of a step at page 256). Exact for integer loads below 2**24 per tier.
    whole, part = page_size // count, page_size % count  # [T, 1]
    inside = g < count
    load = jnp.where(inside, start_load, 0.0)
    laps = jnp.arange(2 * groups, dtype=jnp.int32)[None, :] % count
    twice = jnp.take_along_axis(load, laps, axis=-1)
    prefix = jnp.concatenate([jnp.zeros_like(twice[:, :1]), jnp.cumsum(twice, -1)], -1)
    end = g + count + 1  # window (end - part, end] in the doubled layout
    window = (jnp.take_along_axis(prefix, end, -1)
              - jnp.take_along_axis(prefix, end - part, -1))
    spread = (whole * load.sum(-1, keepdims=True) + window) / page_size
    spread = jnp.where(inside, spread, 0.0)
    return jnp.where(params.greedy_mapping, spread, start_load)
