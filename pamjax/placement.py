"""Where KV units live: prompt placement, new units, bank-group mapping and the attention load.

The placement table is two [R, U] arrays in the engine state: ``unit_tier`` (int8, -1 = no
unit) and ``unit_bank_group`` (int16). Every function here is vectorised over requests and
units; capacity is shared by all requests, so allocations are made in slot (FCFS) order with
an exclusive cumulative sum instead of a loop.

Engine phases that live here (engine.step): ``place_prompts`` (admitted prompts, PAM_SPEC §5
initial placement), ``place_new_units`` (the units decode tokens open, with PAM's HBM
displacement) and ``attention_load`` (attended tokens per bank group, the partials each
device produces, the activation window that the greedy mapping reads).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import struct
from jax import lax

from pamjax import locality
from pamjax._numerics import threshold_bracket, tier_units, top_count, unit_hash
from pamjax.active_rows import narrow_columns, narrow_width, on_active_rows
from pamjax.batching import units_needed
from pamjax.costs import migration_link_s
from pamjax.types import (
    DDR,
    HBM,
    MAPPING_GREEDY,
    MAPPING_SEQUENTIAL,
    NEW_TOKEN_HBM_DISPLACE,
    NO_UNIT,
    NUM_TIERS,
    PLACEMENT_IMPORTANCE_RATIO,
    SSD,
    LifetimeView,
)


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


def lifetime_view(params, tier_counts, prompt, generated, migrated_tokens) -> LifetimeView:
    """The LifetimeView a learned placement score sees (types.LifetimeView).

    Args:
      params: SimParams; tier_counts: f32 or i32 [T] units held per tier (expected counts in
        the relaxation); prompt, generated: [R] tokens; migrated_tokens: [T, T] tokens the
        previous step moved (None before any step).
    """
    capacity = jnp.where(params.tier_enabled, params.capacity_units, 0).astype(jnp.float32)
    occupancy = jnp.where(capacity > 0, jnp.asarray(tier_counts, jnp.float32)
                          / jnp.maximum(capacity, 1.0), 0.0)
    link = jnp.float32(0.0) if migrated_tokens is None else migration_link_s(params,
                                                                             migrated_tokens)
    return LifetimeView(prompt=jnp.asarray(prompt, jnp.int32),
                        generated=jnp.asarray(generated, jnp.int32), occupancy=occupancy,
                        link_load_s=link)


def target_share(params):
    """Importance share per tier implied by PAM's x:y:1 target, f32 [T] summing to 1."""
    total = params.target_x + params.target_y + 1.0
    return jnp.stack([params.target_x, params.target_y, jnp.ones_like(total)]) / total


def fastest_free_tier(opens, free):
    """Tier of each new unit when new units fill the fastest tier with room, in row order.

    Args:
      opens: bool [M] rows that open a unit; free: i32 [T] free units per tier.

    Returns:
      i32 [M] HBM while HBM has room, then DDR, then SSD (meaningful where ``opens``).
    """
    count = opens.astype(jnp.int32)
    to_hbm = allocate_in_order(count, free[HBM])
    to_ddr = allocate_in_order(count - to_hbm, free[DDR])
    return jnp.where(to_hbm > 0, HBM, jnp.where(to_ddr > 0, DDR, SSD))


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
    tier = jnp.where(in_hbm, HBM, jnp.where(in_fast, DDR, SSD))
    return jnp.where(present, tier, -1).astype(jnp.int8)


def bank_group_order(params, activation):
    """Bank groups of each tier from least to most activated over the window, i32 [T, G].

    Padding groups (beyond a tier's count) sort last. Computed once per step and shared by
    every placement of that step (a CPU sort of [T, G] costs ~0.1 ms).

    Args:
      params: uses ``bank_groups_per_device`` f32 [T] (each tier's count);
      activation: i32 [W, T, G] selected units per bank group over the last W steps.

    Returns:
      i32 [T, G] bank-group indices, least activated first (ties by index).
    """
    groups = activation.shape[-1]
    count = params.bank_groups_per_device.astype(jnp.int32)
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


def assign_bank_groups(params, tier, is_new, order, request, unit, page_size: int):
    """Bank group of new units inside their device (the intra-device mapping, PAM_SPEC §5).

    Greedy (PAM): the new units of a tier, taken in row-major order, go round-robin over that
    tier's bank groups sorted by their activation count over the last W decode steps
    (``order``, from bank_group_order), so the least-activated groups receive tokens first
    and a batch of new tokens does not herd onto one group. Striped (AttAcc's layout, the
    baselines and the ablation): consecutive tokens of a request sit on consecutive bank
    groups from a start group given by its id (naive_start), ignoring activation.
    Sequential: ``naive_run_units`` consecutive units of a request share a bank group, the
    runs following each other from the same start (a naive fill, kept for studies).

    Args:
      tier: i8 [M] tier of each unit; is_new: bool [M] units to map.
      order: i32 [T, G] bank groups by increasing activation.
      request: i32 [M] request id of each unit; unit: i32 [M] its unit index.
      page_size: tokens per unit (static); a striped page starts where its first token
        falls.

    Returns:
      i16 [M] bank groups (meaningful where ``is_new``; the caller masks). A page's tokens
      continue on the following bank groups (spread_over_pages) except under sequential.
    """
    count = params.bank_groups_per_device.astype(jnp.int32)  # [T]
    tier_i = jnp.clip(tier.astype(jnp.int32), 0, NUM_TIERS - 1)
    one_hot = (tier_i[:, None] == jnp.arange(NUM_TIERS)[None, :]) & is_new[:, None]
    rank = (jnp.cumsum(one_hot, axis=0) - one_hot)[jnp.arange(tier.shape[0]), tier_i]
    tier_count = count[tier_i]
    greedy = order[tier_i, rank % tier_count]
    offset = jnp.where(params.mapping_policy == MAPPING_SEQUENTIAL,
                       unit // jnp.maximum(params.naive_run_units, 1), unit * page_size)
    start = (naive_start(request) % tier_count.astype(jnp.uint32)).astype(jnp.int32)
    naive = (start + offset % tier_count) % tier_count
    return jnp.where(params.mapping_policy == MAPPING_GREEDY, greedy, naive).astype(jnp.int16)


def spread_over_pages(params, start_load, page_size: int):
    """Attended tokens per bank group when a unit's tokens are spread over its page.

    At token granularity a unit is one token in one bank group. A page of ``page_size``
    tokens is a coarse-graining of that: under the greedy and striped mappings its tokens
    would sit in consecutive bank groups from the page's own, so each of ``page_size``
    consecutive groups (cyclically, within the tier's count) gets 1/page_size of its load.
    Under the sequential mapping a page lies inside one run and keeps its load in one group.

    Args:
      start_load: f32 [T, G] attended tokens per (tier, bank group of the unit).
      page_size: tokens per unit (static).

    Returns:
      f32 [T, G] attended tokens per (tier, bank group).
    """
    if page_size == 1:
        return start_load
    groups = start_load.shape[-1]
    count = params.bank_groups_per_device.astype(jnp.int32)[:, None]  # [T, 1]
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
    return jnp.where(params.mapping_policy == MAPPING_SEQUENTIAL, start_load, spread)


# ---------------------------------------------------------------------------------------------
# Engine phases
# ---------------------------------------------------------------------------------------------

def mapping_order(config, params, state, admission, decoding):
    """Bank groups by increasing activation (bank_group_order), computed only when the step
    places units under the greedy mapping: prompts admitted, or a decode opening a unit.

    The order is a sort, the costliest single operation of a step, so other steps skip it
    (a select under vmap). Returns i32 [T, G] (zeros when skipped).
    """
    places_units = jnp.any(admission.admit) | jnp.any(
        decoding & (state.slot_context % config.page_size == 0))
    return lax.cond((params.mapping_policy == MAPPING_GREEDY) & places_units,
                    lambda a: bank_group_order(params, a),
                    lambda a: jnp.zeros((NUM_TIERS, a.shape[-1]), jnp.int32),
                    state.activation)


@struct.dataclass
class PromptUnits:
    """The KV units of the prompts in the admission window A (place_prompts), each [A, U].

    tier i8 (-1 where no unit), bank_group i16 (0 where no unit), latent f32 (access-model
    log-importance; 0 on the candidates not admitted), importance f32 (PAM's importance
    factor: the unit's prefill attention mass); tier_tokens i32 [T]: prompt tokens written
    to each tier.
    """

    tier: jnp.ndarray
    bank_group: jnp.ndarray
    latent: jnp.ndarray
    importance: jnp.ndarray
    tier_tokens: jnp.ndarray


def held_units(config, state):
    """KV units each tier holds, i32 [T]: ``tier_units`` of the whole [R, U] tier table.

    With narrow columns (``config.narrow_units``, under ``skip_idle``) they are counted on
    the occupied slots alone and, for those that fit, on the narrow columns (active_rows): a
    slot holds no unit past its context's units, and a free slot none (engine._next_state
    clears them), so the counts are the same, from a fraction of the table. (Without them
    the table is small: counting on the rows was no faster at 16-token pages, measured, and
    compiles more branches.)
    """
    columns = narrow_columns(config, state.slot_context, True, False)
    if not config.skip_idle or columns is None:
        return tier_units(state.unit_tier)

    def per_slot(tier):
        return jnp.stack([jnp.sum(tier == t, -1, dtype=jnp.int32) for t in range(NUM_TIERS)],
                         -1)

    counts = on_active_rows(state.slot_request >= 0, per_slot, state.unit_tier,
                            jnp.zeros((config.num_slots, NUM_TIERS), jnp.int32), columns)
    return jnp.sum(counts, 0)


ADMITTED_BUCKET = 4
"""Rows in which place_prompts places the admitted candidates (more: the whole window).
A step rarely admits more (the first 2,000 conversation requests: 1,696 steps admit one,
127 two, 14 three, 2 four, none more), and each bucket compiles the placement once more."""


def place_prompts(config, params, state, admission, capacity, order, recorded,
                  view=None) -> PromptUnits:
    """Tiers and bank groups of the admitted prompts' units (PAM_SPEC §5 initial placement).

    Each prompt unit gets its access-model latent; its prefill attention mass is its initial
    importance and ranks it for PAM's importance-ratio placement (initial_tiers), or the
    units fill the tiers in position order (fastest-first). Prompts are placed before
    anything else takes capacity this step. Most steps admit nobody, so the work is skipped
    then (a select under vmap). With ``config.skip_idle`` (and no learned score) only the
    admitted candidates are placed, on the narrow columns when all their prompts fit there:
    capacity and bank groups go to the prompts in window order, and a candidate not admitted
    takes none, so the placement is the same.

    Args:
      config: static sizes; params: SimParams; state: EngineState before admission;
      admission: batching.Admission; capacity: i32 [T] units per enabled tier;
      order: i32 [T, G] from mapping_order; recorded: optional recorded unit logits;
      view: LifetimeView of the admission window's candidates [A] (only with a learned
        ``config.placement_score``).

    Returns:
      PromptUnits.
    """
    n_units, page = config.units_per_slot, config.page_size
    all_units = jnp.arange(n_units, dtype=jnp.int32)
    free_now = jnp.maximum(capacity - held_units(config, state), 0)

    def place(rows, width: int):
        # Candidates (any number, in window order) on their first ``width`` columns, then
        # widened to U with no unit there; latents are drawn on all U (the slots keep them).
        cand_c, c_prompt, admit = rows
        c_tokens = locality.unit_tokens(jnp.where(admit, c_prompt, 0), page, width)
        c_present = c_tokens > 0
        latent = jnp.where(admit[:, None], locality.initial_latent(
            params, state.seed, cand_c[:, None], all_units[None, :]), 0.0)
        the_logits = locality.unit_logits(config, params, latent[:, :width], c_prompt,
                                          jnp.ones_like(cand_c), recorded)
        mass = jnp.where(c_present, locality.attention_mass(the_logits, c_tokens), 0.0)
        log_mass = the_logits + jnp.log(jnp.maximum(c_tokens, 1).astype(jnp.float32))
        if config.placement_score is not None:
            # A learned policy ranks the prompt's units at admission too, with what is known
            # then: prefill mass as importance, nothing selected yet, no tier yet (-1).
            log_mass = log_mass + config.placement_score(
                params.policy, mass, jnp.zeros_like(c_present), c_prompt,
                jnp.full(c_present.shape, NO_UNIT, jnp.int8), c_present, view)
        tier = initial_tiers(params, log_mass, c_present, free_now, target_share(params),
                             config.bisection_iters)
        bank_group = assign_bank_groups(
            params, tier.ravel(), c_present.ravel(), order,
            jnp.broadcast_to(cand_c[:, None], tier.shape).ravel(),
            jnp.broadcast_to(all_units[None, :width], tier.shape).ravel(),
            page).reshape(tier.shape)
        bank_group = jnp.where(c_present, bank_group, 0)
        tier_tokens = jnp.stack([jnp.sum(jnp.where(tier == t, c_tokens, 0), -1)
                                 for t in range(NUM_TIERS)], -1)

        def widen(x, value):
            return x if width == n_units else jnp.pad(x, ((0, 0), (0, n_units - width)),
                                                      constant_values=value)

        return (widen(tier, NO_UNIT), widen(bank_group, 0), latent, widen(mass, 0.0),
                tier_tokens)

    shape = (config.admit_window, n_units)
    nothing = (jnp.full(shape, NO_UNIT, jnp.int8), jnp.zeros(shape, jnp.int16),
               jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32),
               jnp.zeros((config.admit_window, NUM_TIERS), jnp.int32))
    rows = (admission.cand_c, admission.prompt, admission.admit)
    place_all = functools.partial(place, width=n_units)
    width = narrow_width(config)

    def place_narrow_if_all_fit(rows):
        _, c_prompt, admit = rows
        fit = jnp.all(units_needed(jnp.where(admit, c_prompt, 0), page) <= width)
        return lax.cond(fit, functools.partial(place, width=width), place_all, rows)

    if config.skip_idle and view is None:
        placed = on_active_rows(admission.admit,
                                place_all if width is None else place_narrow_if_all_fit,
                                rows, nothing, largest_bucket=ADMITTED_BUCKET)
    else:
        placed = lax.cond(jnp.any(admission.admit), place_all, lambda r: nothing, rows)
    tier, bank_group, latent, mass, tier_tokens = placed
    return PromptUnits(tier=tier, bank_group=bank_group, latent=latent, importance=mass,
                       tier_tokens=jnp.sum(tier_tokens, 0))


def place_new_units(config, params, state, token, capacity, order):
    """Tier, bank group and latent of the units that this step's decode tokens open.

    Fastest-free (baselines): the fastest tier with room, granted in slot order. PAM: HBM;
    without room there, the request's least important HBM unit is displaced to the fastest
    lower tier with room (DDR, else SSD), or the new unit goes there itself when the request
    has no HBM unit. New units are mapped to bank groups first, displaced ones after them.

    Args:
      config: static sizes; params: SimParams; state: EngineState after admission;
      token: batching.DecodeToken of the step; capacity: i32 [T]; order: i32 [T, G].

    Returns:
      EngineState with ``unit_tier``, ``unit_bank_group`` and ``unit_latent`` updated.
    """
    r_slots, n_units = config.num_slots, config.units_per_slot
    rows = jnp.arange(r_slots)
    all_units = jnp.arange(n_units, dtype=jnp.int32)
    req = jnp.maximum(state.slot_request, 0)
    unit_tier = state.unit_tier
    opens = token.opens

    free = jnp.maximum(capacity - held_units(config, state), 0)
    fastest_free = fastest_free_tier(opens, free)

    def least_important_hbm_unit(rows):
        tier, importance = rows  # [S, U] or narrower (on_active_rows' Columns)
        hbm_key = jnp.where(tier == HBM, importance, jnp.inf)
        lowest = jnp.min(hbm_key, axis=-1)
        # argmin (first least unit) as two plain reductions: XLA:CPU's variadic argmin
        # reduction is several times slower over [R, U]. No HBM unit: victim n_units.
        columns = all_units[:tier.shape[-1]]
        return lowest, jnp.min(jnp.where(hbm_key == lowest[:, None], columns[None, :],
                                         n_units), -1)

    tables = (unit_tier, state.unit_importance)
    if config.skip_idle:
        # Only a request that opens a unit may displace one; the others' victims go unused.
        lowest, victim = on_active_rows(opens, least_important_hbm_unit, tables,
                                        (jnp.full(r_slots, jnp.inf), jnp.full(r_slots, n_units)),
                                        narrow_columns(config, token.context, True, False))
    else:
        lowest, victim = least_important_hbm_unit(tables)
    victim = jnp.minimum(victim, n_units - 1)
    has_victim = jnp.isfinite(lowest)
    needs_room = opens & (fastest_free != HBM)
    displaces = params.new_token_policy == NEW_TOKEN_HBM_DISPLACE
    displace = displaces & needs_room
    down_ddr = allocate_in_order(displace.astype(jnp.int32), free[DDR])
    lower_tier = jnp.where(down_ddr > 0, DDR, SSD)
    pam_tier = jnp.where(needs_room & ~has_victim, lower_tier, HBM)
    new_tier = jnp.where(displaces, pam_tier, fastest_free)
    demote = displace & has_victim
    victim_col = jnp.where(demote, victim, n_units)

    mapped = assign_bank_groups(
        params,
        jnp.concatenate([new_tier, lower_tier]).astype(jnp.int8),
        jnp.concatenate([opens, demote]),
        order,
        jnp.concatenate([req, req]),
        jnp.concatenate([token.unit, victim]).astype(jnp.int32),
        config.page_size)
    unit_tier = unit_tier.at[rows, victim_col].set(lower_tier.astype(jnp.int8), mode="drop")
    unit_bg = state.unit_bank_group.at[rows, victim_col].set(mapped[r_slots:], mode="drop")
    unit_tier = unit_tier.at[rows, token.column].set(new_tier.astype(jnp.int8), mode="drop")
    unit_bg = unit_bg.at[rows, token.column].set(mapped[:r_slots], mode="drop")
    new_latent = locality.initial_latent(params, state.seed, req, token.unit)
    unit_latent = state.unit_latent.at[rows, token.column].set(new_latent, mode="drop")
    return state.replace(unit_tier=unit_tier, unit_bank_group=unit_bg, unit_latent=unit_latent)


@struct.dataclass
class AttentionLoad:
    """Where the step's attention reads and its decode writes (attention_load); costs.
    StepCounts is built from it. All i32.

    bank_group_tokens [T, G]: attended tokens per (tier, bank group of their unit);
    tier_tokens [T]: tokens of decoding requests held per tier (their selection labels are
      read there);
    tier_holders [T]: decoding requests with any KV on the tier (Q goes there);
    tier_requests [T]: decoding requests with attended tokens on the tier;
    active_bank_groups [T]: sum over decoding requests of the bank groups holding their
      attended tokens (one partial each for the reduction units);
    active_chunks [T]: sum over decoding requests of the FlashDecoding chunks
      (``params.decode_split_tokens`` consecutive positions) with attended tokens on the
      tier (0 under PAMattention, which does not use them);
    topk_candidates [T]: sum over decoding requests of min(tokens on the tier, the
      selector's token target): label scores gathered for the top-k;
    decode_writes [T]: decode tokens written to each tier.
    """

    bank_group_tokens: jnp.ndarray
    tier_tokens: jnp.ndarray
    tier_holders: jnp.ndarray
    tier_requests: jnp.ndarray
    active_bank_groups: jnp.ndarray
    active_chunks: jnp.ndarray
    topk_candidates: jnp.ndarray
    decode_writes: jnp.ndarray


def attention_load(config, params, state, attended, token):
    """Attended tokens per bank group, partial results per device and the step's decode
    writes, on the placement before this step's scheduling (labels are read, and attention
    runs, where the tokens sit when they are selected); the activation window gains this
    step's row.

    Args:
      config: static sizes; params: SimParams; state: EngineState after new units;
      attended: locality.Attention of the step; token: batching.DecodeToken.

    Returns:
      (activation i32 [W, T, G] with this step's selected units per bank group, AttentionLoad).
    """
    groups, page = config.padded_bank_groups, config.page_size

    def per_request(rows):
        # Only row-wise work (every count is an integer, so summing the rows afterwards gives
        # the same totals in any order): on_active_rows may run it on decoding rows alone.
        unit_tier, bank_group, selected, tokens, unit = rows  # unit tables [S, U or narrower]
        r_rows, n_units = unit_tier.shape
        tier_i = jnp.clip(unit_tier.astype(jnp.int32), 0, NUM_TIERS - 1)
        # One flat id per unit (row, tier, bank group): a 1-D scatter-add is ~40% cheaper
        # on CPU than the same one with 2-D indices.
        segments = NUM_TIERS * groups
        segment = (jnp.arange(r_rows, dtype=jnp.int32)[:, None] * segments
                   + tier_i * groups + bank_group.astype(jnp.int32)).ravel()

        def per_segment(values):
            return jnp.zeros(r_rows * segments, jnp.int32).at[segment].add(
                values.ravel()).reshape(r_rows, segments)

        bg_units = per_segment(selected.astype(jnp.int32))
        # At token granularity every present unit holds one token: the counts coincide.
        bg_tokens = bg_units if page == 1 else per_segment(jnp.where(selected, tokens, 0))
        # Partials a request's attention produces per device: one per bank group holding its
        # attended units (PAM_SPEC §4).
        request_bg = (bg_units > 0).reshape(r_rows, NUM_TIERS, groups)
        # Tokens per request and tier: who holds KV where, and the top-k label candidates.
        held = jnp.stack([jnp.sum(jnp.where(unit_tier == t, tokens, 0), -1)
                          for t in range(NUM_TIERS)], -1)
        target = jnp.maximum(jnp.ceil(params.select_fraction * jnp.sum(held, -1)), 1.0)
        candidates = jnp.minimum(held.astype(jnp.float32), target[:, None]).astype(jnp.int32)
        chunks = lax.cond(params.use_pamattention,
                          lambda: jnp.zeros((r_rows, NUM_TIERS), jnp.int32),
                          lambda: _active_chunks(params, tier_i, selected, page))
        decoding = jnp.any(tokens > 0, -1)
        landed = jnp.take_along_axis(unit_tier, jnp.clip(unit, 0, n_units - 1)[:, None], -1)
        writes = decoding[:, None] & (landed == jnp.arange(NUM_TIERS, dtype=jnp.int8))
        return (bg_tokens, bg_units, held, request_bg.any(-1), request_bg.sum(-1), chunks,
                candidates, writes.astype(jnp.int32))

    rows = (state.unit_tier, state.unit_bank_group, attended.selected, attended.tokens,
            token.unit)
    if config.skip_idle:
        # A request that does not decode attends nothing and writes nothing: zero counts.
        r_slots = config.num_slots
        wide = jnp.zeros((r_slots, NUM_TIERS * groups), jnp.int32)
        narrow = jnp.zeros((r_slots, NUM_TIERS), jnp.int32)
        inactive = (wide, wide, narrow, narrow.astype(bool), narrow, narrow, narrow, narrow)
        columns = narrow_columns(config, token.context, (True,) * 4 + (False,), False)
        counts = on_active_rows(attended.present[:, 0], per_request, rows, inactive, columns)
    else:
        counts = per_request(rows)
    bg_tokens, bg_units, held, requests, bank_groups, chunks, candidates, writes = counts
    activation = state.activation.at[state.step % config.window].set(
        jnp.sum(bg_units, 0).reshape(NUM_TIERS, groups))
    return activation, AttentionLoad(
        bank_group_tokens=jnp.sum(bg_tokens, 0).reshape(NUM_TIERS, groups),
        tier_tokens=jnp.sum(held, 0),
        tier_holders=jnp.sum(held > 0, 0),
        tier_requests=jnp.sum(requests, 0),
        active_bank_groups=jnp.sum(bank_groups, 0),
        active_chunks=jnp.sum(chunks, 0),
        topk_candidates=jnp.sum(candidates, 0),
        decode_writes=jnp.sum(writes, 0))


def _active_chunks(params, tier_i, selected, page_size: int):
    """FlashDecoding chunks with attended tokens, per request and tier, i32 [R, T].

    A chunk is ``decode_split_tokens`` consecutive positions of a request. A unit counts
    for the chunk of its first token, plus the further chunks its page reaches when a page
    is longer than a chunk; units sharing a chunk and a tier count once.
    """
    r_slots, n_units = selected.shape
    split = jnp.maximum(params.decode_split_tokens, 1)
    first = jnp.arange(n_units, dtype=jnp.int32) * page_size
    # Chunk of each unit's first token, as an id below U: when pages are at least a chunk
    # long no two units share one, so the unit's own index serves.
    chunk = jnp.minimum(first // split, jnp.arange(n_units, dtype=jnp.int32))
    extra = (first + page_size - 1) // split - first // split  # [U] chunks beyond the first
    ids = (jnp.arange(r_slots)[:, None] * n_units + chunk[None, :]) * NUM_TIERS + tier_i
    present = jnp.zeros((r_slots * n_units * NUM_TIERS,), bool).at[ids.ravel()].max(
        selected.ravel()).reshape(r_slots, n_units, NUM_TIERS)
    spanned = jnp.stack([jnp.sum(jnp.where(selected & (tier_i == t), extra[None, :], 0), -1)
                         for t in range(NUM_TIERS)], -1)
    return jnp.sum(present, 1).astype(jnp.int32) + spanned.astype(jnp.int32)
