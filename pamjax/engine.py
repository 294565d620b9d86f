"""The serving engine: ``step(config, params, state, workload)`` and its ``lax.scan`` rollout.

One step is one iteration of vLLM-style continuous batching with prefill priority
(PAM_SPEC §3): requests that have arrived are admitted in FCFS order while a slot is free,
``params.max_batch`` allows it, and the KV capacity of the enabled tiers can hold their whole
prompt plus output (reserved at admission, so a running request never runs out of room);
their prompts are prefilled and placed (placement.py), producing their first token. Requests
that were already running each decode one token: its KV unit is placed, the access model
(locality.py) picks the attended units, the importance EMA is updated, PAM's scheduler
(scheduler.py) swaps units between tiers, and the step's time and energy come from the
gathered counts (costs.py). A request whose KV can never fit the enabled tiers is rejected
and counted. With nothing to do, the clock jumps to the next arrival.

Everything is fixed-shape and branch-free on traced values, so ``jax.vmap`` over a stacked
SimParams pytree runs many configurations in one compiled program, and a chunk of steps runs
without returning to the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from pamjax import locality, placement, scheduler
from pamjax.costs import StepCounts, step_cost
from pamjax.types import (
    NEW_TOKEN_HBM_DISPLACE,
    STATUS_FINISHED,
    STATUS_REJECTED,
    STATUS_RUNNING,
    DeviceWorkload,
    EngineConfig,
    EngineState,
    SimParams,
    StepMetrics,
)

NUM_TIERS = 3
_NO_UNIT = -1


def init_state(config: EngineConfig, seed: int = 0) -> EngineState:
    """An empty system at time 0: no request admitted, every slot free.

    Args:
      config: static sizes (R slots, U units per slot, N requests, window, bank groups).
      seed: access-model seed (uint32), stored in the state.

    Returns:
      EngineState with [R] slot arrays, [R, U] unit tables, [N] request arrays, a
      [W, 3, G] activation window and the clock at 0 s.
    """
    r, u, n = config.num_slots, config.units_per_slot, config.num_requests
    return EngineState(
        slot_request=jnp.full((r,), -1, jnp.int32),
        slot_generated=jnp.zeros((r,), jnp.int32),
        slot_context=jnp.zeros((r,), jnp.int32),
        unit_tier=jnp.full((r, u), _NO_UNIT, jnp.int8),
        unit_bank_group=jnp.zeros((r, u), jnp.int16),
        unit_latent=jnp.zeros((r, u), jnp.float32),
        unit_importance=jnp.zeros((r, u), jnp.float32),
        unit_selected=jnp.zeros((r, u), bool),
        activation=jnp.zeros((config.window, NUM_TIERS, config.bank_groups), jnp.int32),
        clock_whole=jnp.zeros((), jnp.float32),
        clock_frac=jnp.zeros((), jnp.float32),
        step=jnp.zeros((), jnp.int32),
        next_request=jnp.zeros((), jnp.int32),
        req_status=jnp.zeros((n,), jnp.int8),
        req_first_token_s=jnp.full((n,), jnp.nan, jnp.float32),
        req_finish_s=jnp.full((n,), jnp.nan, jnp.float32),
        overflow=jnp.zeros((), bool),
        seed=jnp.asarray(seed, jnp.uint32),
    )


def units_needed(tokens, page_size: int):
    """KV units (pages of ``page_size`` tokens) holding ``tokens`` tokens, rounded up; any
    integer array shape."""
    return (tokens + page_size - 1) // page_size


F32_EXACT_TOTAL = 1 << 24
"""Sums of non-negative integers below this are exact in float32 in any order."""


def integer_sum(x, max_total: int | None = None):
    """Sum of a non-negative integer (or boolean) array, i32 [].

    XLA:CPU reduces float32 about twice as fast as int32 over large arrays, so when
    ``max_total`` (a static bound on the sum) is below F32_EXACT_TOTAL, every partial sum is
    an integer float32 holds exactly and the float32 reduction gives the same result.
    """
    if max_total is not None and max_total < F32_EXACT_TOTAL:
        return jnp.sum(x, dtype=jnp.float32).astype(jnp.int32)
    return jnp.sum(x, dtype=jnp.int32)


def tier_units(tier):
    """Units per tier, i32 [T], from a tier table of any shape (its size bounds each count,
    see integer_sum)."""
    return jnp.stack([integer_sum(tier == t, tier.size) for t in range(NUM_TIERS)])


def tier_sums(tier, values, max_total: int | None = None):
    """Sum of non-negative integer ``values`` per tier, i32 [T], from a tier table and values
    of the same shape (``max_total``: a static bound on the sum, see integer_sum)."""
    return jnp.stack([integer_sum(jnp.where(tier == t, values, 0), max_total)
                      for t in range(NUM_TIERS)])


def target_share(params: SimParams):
    """Importance share per tier implied by x:y:1."""
    total = params.target_x + params.target_y + 1.0
    return jnp.stack([params.target_x, params.target_y, jnp.ones_like(total)]) / total


def _unit_logits(config, params, state_latent, context, generated, recorded):
    if config.recorded_steps:
        row = (jnp.maximum(generated - 1, 0) % config.recorded_steps)
        return recorded[row]
    return locality.logits(params, state_latent, context, config.page_size)


@struct.dataclass
class Admission:
    """One step's FCFS admission decision over the look-ahead window A (admit_fcfs).

    cand i32 [A]: candidate request ids (next_request + 0..A-1, may run past N);
    cand_c i32 [A]: the same clamped to N - 1 (safe to gather with);
    prompt i32 [A]: their prompt tokens;
    admit bool [A]: admitted now; rejected bool [A]: rejected now (can never fit);
    taken bool [A]: admit | rejected (a prefix of the window: FCFS);
    slot i32 [A]: the free slot each admitted candidate takes (R = none).
    """

    cand: jnp.ndarray
    cand_c: jnp.ndarray
    prompt: jnp.ndarray
    admit: jnp.ndarray
    rejected: jnp.ndarray
    taken: jnp.ndarray
    slot: jnp.ndarray


def admit_fcfs(config: EngineConfig, params: SimParams, workload: DeviceWorkload,
               slot_request, next_request, now, capacity) -> Admission:
    """vLLM-style FCFS admission at time ``now`` (PAM_SPEC §3).

    Requests that have arrived are taken in order while a slot is free (``params.max_batch``
    and the R slots), the KV capacity left after every running request's reservation (whole
    prompt + output) holds theirs, and the step's prompts stay within the prefill token
    budget (the first always may). A request that can never fit (more units than all enabled
    tiers or a slot hold) is rejected in its turn. The first request that cannot be taken
    stops admission (no overtaking).

    Args:
      config: static sizes; params: SimParams; workload: request arrays [N].
      slot_request: i32 [R] request per slot (-1 = free); next_request: i32 [] FCFS pointer;
      now: f32 [] time (s); capacity: i32 [T] units per tier (0 for disabled tiers).

    Returns:
      Admission.
    """
    r_slots, n_req, page = config.num_slots, config.num_requests, config.page_size
    running = slot_request >= 0
    req = jnp.maximum(slot_request, 0)
    needs = units_needed(workload.prompt_tokens[req] + workload.output_tokens[req] - 1, page)
    reserved = jnp.sum(jnp.where(running, needs, 0))
    cand = next_request + jnp.arange(config.admit_window, dtype=jnp.int32)
    in_range = cand < n_req
    cand_c = jnp.minimum(cand, n_req - 1)
    c_prompt = workload.prompt_tokens[cand_c]
    c_need = units_needed(c_prompt + workload.output_tokens[cand_c] - 1, page)
    arrived = in_range & (workload.arrival_s[cand_c] <= now)
    never_fits = (c_need > jnp.sum(capacity)) | (c_need > config.units_per_slot)
    reject = arrived & never_fits
    fits = jnp.cumsum(jnp.where(reject, 0, c_need)) <= jnp.sum(capacity) - reserved
    room = jnp.minimum(params.max_batch, r_slots) - jnp.sum(running)
    has_slot = jnp.cumsum(arrived & ~reject) <= room
    # vLLM's max_num_batched_tokens: prompts prefilled in one step stay within a token budget
    # (the first admitted prompt always may, however long).
    prompt_before = jnp.cumsum(jnp.where(reject, 0, c_prompt)) - jnp.where(reject, 0, c_prompt)
    in_budget = (prompt_before + c_prompt <= params.prefill_token_budget) | (prompt_before == 0)
    taken = jnp.cumprod((arrived & (reject | (fits & has_slot & in_budget))).astype(jnp.int32)
                        ).astype(bool)
    admit = taken & ~reject

    free_slot = ~running
    rows = jnp.arange(r_slots, dtype=jnp.int32)
    slot_of_rank = jnp.full((r_slots,), r_slots, jnp.int32).at[
        jnp.where(free_slot, jnp.cumsum(free_slot) - 1, r_slots)].set(rows, mode="drop")
    admit_rank = jnp.clip(jnp.cumsum(admit) - 1, 0, r_slots - 1)
    slot = jnp.where(admit, slot_of_rank[admit_rank], r_slots)
    return Admission(cand=cand, cand_c=cand_c, prompt=c_prompt, admit=admit,
                     rejected=taken & reject, taken=taken, slot=slot)


def advance_clock(whole, frac, busy_s, idle_s):
    """The clock after a step of ``busy_s`` seconds and an idle jump of ``idle_s``.

    The clock is whole seconds plus a fraction in [0, 1) (float32 keeps sub-microsecond
    resolution over hour-long runs). The fraction gets ``busy_s`` then ``idle_s`` added, one
    float32 addition each, so every engine that advances time through here (engine.step,
    leap.py) rounds the same way.

    Returns:
      (whole, frac, end = whole + frac), f32 [] each.
    """
    frac = frac + busy_s + idle_s
    carry = jnp.floor(frac)
    whole, frac = whole + carry, frac - carry
    return whole, frac, whole + frac


def record_request_events(status, first_token_s, finish_s, *, admitted, rejected, finished,
                          end):
    """Request arrays [N] after a step that ends at ``end`` (s): the ``admitted`` requests
    run and got their first token, the ``rejected`` ones are refused, the ``finished`` ones
    are done. Each is an i32 array of request ids, N meaning none."""
    status = status.at[admitted].set(STATUS_RUNNING, mode="drop")
    status = status.at[rejected].set(STATUS_REJECTED, mode="drop")
    status = status.at[finished].set(STATUS_FINISHED, mode="drop")
    return (status, first_token_s.at[admitted].set(end, mode="drop"),
            finish_s.at[finished].set(end, mode="drop"))


def step(config: EngineConfig, params: SimParams, state: EngineState,
         workload: DeviceWorkload, recorded=None):
    """Advance the serving system by one iteration.

    Args:
      config: static sizes.
      params: numeric parameters of this configuration.
      state: system state before the step.
      workload: request arrays [N].
      recorded: f32 [S, U] recorded unit logits when ``config.recorded_steps`` > 0.

    Returns:
      (new state, StepMetrics of this step).
    """
    r_slots, n_units, page = config.num_slots, config.units_per_slot, config.page_size
    a_window, n_req = config.admit_window, config.num_requests
    rows = jnp.arange(r_slots)
    unit_idx = jnp.arange(n_units, dtype=jnp.int32)
    now = state.clock_whole + state.clock_frac
    enabled = params.tier_enabled
    capacity = jnp.where(enabled, params.capacity_units, 0).astype(jnp.int32)

    running = state.slot_request >= 0
    req = jnp.maximum(state.slot_request, 0)

    # ---------------------------------------------------------------- admission (FCFS)
    adm = admit_fcfs(config, params, workload, state.slot_request, state.next_request, now,
                     capacity)
    cand, cand_c, c_prompt = adm.cand, adm.cand_c, adm.prompt
    admit, taken, rejected_now, cand_slot = adm.admit, adm.taken, adm.rejected, adm.slot

    # Prompt units of admitted candidates, placed before anything else takes capacity. Most
    # steps admit nobody, so the placement work is skipped then (a select under vmap).
    c_tokens = locality.unit_tokens(jnp.where(admit, c_prompt, 0), page, n_units)
    c_present = c_tokens > 0
    free_now = jnp.maximum(capacity - tier_units(state.unit_tier), 0)
    # The greedy mapping's activation order (a sort, the costliest single op of a step) is
    # only needed when units are placed: prompts admitted, or a decode opening a new unit.
    places_units = jnp.any(admit) | jnp.any(running & (state.slot_context % page == 0))
    bg_order = lax.cond(params.greedy_mapping & places_units,
                        lambda a: placement.bank_group_order(params, a),
                        lambda a: jnp.zeros((NUM_TIERS, a.shape[-1]), jnp.int32),
                        state.activation)

    def place_prompts(_):
        latent = locality.initial_latent(params, state.seed, cand_c[:, None], unit_idx[None, :])
        the_logits = _unit_logits(config, params, latent, c_prompt, jnp.ones_like(cand_c),
                                  recorded)
        mass = jnp.where(c_present, locality.attention_mass(the_logits, c_tokens), 0.0)
        log_mass = the_logits + jnp.log(jnp.maximum(c_tokens, 1).astype(jnp.float32))
        if config.placement_score is not None:
            # A learned policy ranks the prompt's units at admission too, with what is known
            # then: prefill mass as importance, nothing selected yet, no tier yet (-1).
            log_mass = log_mass + config.placement_score(
                params.policy, mass, jnp.zeros_like(c_present), c_prompt,
                jnp.full(c_present.shape, _NO_UNIT, jnp.int8), c_present)
        tier = placement.initial_tiers(params, log_mass, c_present, free_now,
                                       target_share(params), config.bisection_iters)
        bank_group = placement.assign_bank_groups(
            params, tier.ravel(), c_present.ravel(), bg_order,
            jnp.broadcast_to(cand_c[:, None], tier.shape).ravel(),
            jnp.broadcast_to(unit_idx[None, :], tier.shape).ravel()).reshape(tier.shape)
        return tier, bank_group, latent, mass

    def nothing_to_place(_):
        shape = (a_window, n_units)
        return (jnp.full(shape, _NO_UNIT, jnp.int8), jnp.zeros(shape, jnp.int16),
                jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))

    c_tier, c_bg, c_latent, c_mass = lax.cond(jnp.any(admit), place_prompts, nothing_to_place,
                                              None)

    unit_tier = state.unit_tier.at[cand_slot].set(c_tier, mode="drop")
    unit_bg = state.unit_bank_group.at[cand_slot].set(c_bg, mode="drop")
    unit_latent = state.unit_latent.at[cand_slot].set(c_latent, mode="drop")
    unit_importance = state.unit_importance.at[cand_slot].set(c_mass, mode="drop")
    slot_request = state.slot_request.at[cand_slot].set(cand, mode="drop")
    slot_generated = state.slot_generated.at[cand_slot].set(1, mode="drop")
    slot_context = state.slot_context.at[cand_slot].set(c_prompt, mode="drop")
    prefill_tier_tokens = tier_sums(c_tier, c_tokens).astype(jnp.float32)
    c_n = jnp.where(admit, c_prompt, 0).astype(jnp.float32)

    # ---------------------------------------------------------------- decode: new KV unit
    decoding = running  # requests admitted this step do not decode until the next one
    context = jnp.where(decoding, slot_context + 1, slot_context)
    opens_unit = decoding & ((context - 1) % page == 0)
    new_u = (context - 1) // page
    overflow = state.overflow | jnp.any(opens_unit & (new_u >= n_units))
    new_col = jnp.where(opens_unit, jnp.minimum(new_u, n_units - 1), n_units)
    tier_before_decode = unit_tier

    free = jnp.maximum(capacity - tier_units(unit_tier), 0)
    new_count = opens_unit.astype(jnp.int32)
    to_hbm = placement.allocate_in_order(new_count, free[0])
    to_ddr = placement.allocate_in_order(new_count - to_hbm, free[1])
    fastest_free_tier = jnp.where(to_hbm > 0, 0, jnp.where(to_ddr > 0, 1, 2))
    # PAM: the new unit goes to HBM; without room there, the request's least important HBM
    # unit is displaced to the fastest lower tier with room.
    present_before = tier_before_decode >= 0
    hbm_key = jnp.where(tier_before_decode == 0, unit_importance, jnp.inf)
    lowest = jnp.min(hbm_key, axis=-1)
    # argmin (first least unit) as two plain reductions: XLA:CPU's variadic argmin
    # reduction is several times slower over [R, U].
    victim = jnp.min(jnp.where(hbm_key == lowest[:, None], unit_idx[None, :], n_units), -1)
    victim = jnp.minimum(victim, n_units - 1)
    has_victim = jnp.isfinite(lowest)
    needs_room = opens_unit & (to_hbm == 0)
    displace = (params.new_token_policy == NEW_TOKEN_HBM_DISPLACE) & needs_room
    down_ddr = placement.allocate_in_order(displace.astype(jnp.int32), free[1])
    lower_tier = jnp.where(down_ddr > 0, 1, 2)
    pam_tier = jnp.where(needs_room & ~has_victim, lower_tier, 0)
    new_tier = jnp.where(params.new_token_policy == NEW_TOKEN_HBM_DISPLACE, pam_tier,
                         fastest_free_tier)
    demote = displace & has_victim
    victim_col = jnp.where(demote, victim, n_units)

    mapped = placement.assign_bank_groups(
        params,
        jnp.concatenate([new_tier, lower_tier]).astype(jnp.int8),
        jnp.concatenate([opens_unit, demote]),
        bg_order,
        jnp.concatenate([req, req]),
        jnp.concatenate([new_u, victim]).astype(jnp.int32))
    unit_tier = unit_tier.at[rows, victim_col].set(lower_tier.astype(jnp.int8), mode="drop")
    unit_bg = unit_bg.at[rows, victim_col].set(mapped[r_slots:], mode="drop")
    unit_tier = unit_tier.at[rows, new_col].set(new_tier.astype(jnp.int8), mode="drop")
    unit_bg = unit_bg.at[rows, new_col].set(mapped[:r_slots], mode="drop")
    new_latent = locality.initial_latent(params, state.seed, req, new_u)
    unit_latent = unit_latent.at[rows, new_col].set(new_latent, mode="drop")

    # ---------------------------------------------------------------- decode: access model
    dec2 = decoding[:, None]
    tokens = jnp.where(dec2, locality.unit_tokens(context, page, n_units), 0)
    present = tokens > 0
    evolved = locality.evolve_latent(params, unit_latent, state.seed, req[:, None],
                                     unit_idx[None, :], state.step)
    # A unit opened this step keeps its fresh draw; older ones drift.
    fresh = unit_idx[None, :] == new_col[:, None]
    unit_latent = jnp.where(dec2 & present & ~fresh, evolved, unit_latent)
    generated_before = slot_generated
    the_logits = _unit_logits(config, params, unit_latent, context, generated_before, recorded)
    mass = locality.attention_mass(the_logits, tokens)
    # Dense systems attend every unit: the selector's bisection is skipped for them.
    selected = lax.cond(params.select_fraction >= 1.0, lambda: present,
                        lambda: locality.select(params, the_logits, tokens,
                                                config.bisection_iters) & present)
    unit_importance = jnp.where(
        dec2, locality.update_importance(params, unit_importance, mass, present),
        unit_importance)

    persisted = integer_sum(selected & state.unit_selected, selected.size)
    previously_selected = integer_sum(state.unit_selected & dec2, selected.size)
    selected_mass = jnp.sum(jnp.where(selected, mass, 0.0))
    sel_tokens = jnp.where(selected, tokens, 0)

    # Bank-group loads: attended tokens per (tier, bank group), and per request.
    groups = config.bank_groups
    tier_i = jnp.clip(unit_tier.astype(jnp.int32), 0, NUM_TIERS - 1)
    segment = tier_i * groups + unit_bg.astype(jnp.int32)
    bg_tokens = jax.ops.segment_sum(sel_tokens.ravel(), segment.ravel(),
                                    num_segments=NUM_TIERS * groups).reshape(NUM_TIERS, groups)
    # Partials a request's attention produces per device: one per bank group holding its
    # attended units (a [R, T x G] presence table; PAM_SPEC §4 and its ablation).
    request_bg = jnp.zeros((r_slots, NUM_TIERS * groups), bool).at[rows[:, None], segment].max(
        selected).reshape(r_slots, NUM_TIERS, groups)
    active_bg = request_bg.sum((0, 2))
    tier_requests = request_bg.any(-1).sum(0)
    # Label reads happen where the tokens sit while they are scored, before scheduling.
    tier_tokens = tier_sums(unit_tier, tokens, unit_tier.size * page)
    tier_holders = jnp.stack([jnp.sum(jnp.any(present & (unit_tier == t), axis=-1))
                              for t in range(NUM_TIERS)])
    sel_units_bg = jax.ops.segment_sum(selected.ravel().astype(jnp.int32), segment.ravel(),
                                       num_segments=NUM_TIERS * groups)
    activation = state.activation.at[state.step % config.window].set(
        sel_units_bg.reshape(NUM_TIERS, groups))

    # ---------------------------------------------------------------- online scheduling
    def run_scheduler(tier, bank_group):
        rank_key = unit_importance if config.placement_score is None else \
            placement.corrected_key(unit_importance, config.placement_score(
                params.policy, unit_importance, selected, context, tier, present), present)
        return scheduler.schedule(params, rank_key, tier, bank_group, present,
                                  config.max_swaps)[:2]

    # Systems without online scheduling (swap budget 0) skip it: no swap could happen.
    unit_tier, unit_bg = lax.cond(params.swap_budget > 0, run_scheduler,
                                  lambda tier, bank_group: (tier, bank_group), unit_tier, unit_bg)

    moved = present_before & (unit_tier != tier_before_decode)
    from_i = jnp.clip(tier_before_decode.astype(jnp.int32), 0, NUM_TIERS - 1)
    to_i = jnp.clip(unit_tier.astype(jnp.int32), 0, NUM_TIERS - 1)
    migrated = jax.ops.segment_sum(jnp.where(moved, tokens, 0).ravel(),
                                   (from_i * NUM_TIERS + to_i).ravel(),
                                   num_segments=NUM_TIERS * NUM_TIERS).reshape(NUM_TIERS, NUM_TIERS)

    # ---------------------------------------------------------------- time and energy
    counts = StepCounts(
        decode_requests=jnp.sum(decoding).astype(jnp.float32),
        decode_context=jnp.sum(jnp.where(decoding, context, 0)).astype(jnp.float32),
        tier_tokens=tier_tokens.astype(jnp.float32),
        tier_selected=jnp.sum(bg_tokens, -1).astype(jnp.float32),
        tier_busiest_bank_group=jnp.max(placement.spread_over_pages(
            params, bg_tokens.astype(jnp.float32), page), -1),
        tier_requests=tier_requests.astype(jnp.float32),
        tier_holders=tier_holders.astype(jnp.float32),
        tier_active_bank_groups=active_bg.astype(jnp.float32),
        prefill_tokens=jnp.sum(c_n),
        prefill_pairs=jnp.sum(c_n * (c_n + 1.0) / 2.0),
        prefill_tier_tokens=prefill_tier_tokens,
        migrated_tokens=migrated.astype(jnp.float32),
        sparse=(params.select_fraction < 1.0).astype(jnp.float32),
    )
    cost = step_cost(params, counts)
    busy = jnp.any(decoding) | jnp.any(admit)
    dt = jnp.where(busy, cost.time_s, 0.0)
    next_arrival = workload.arrival_s[jnp.minimum(state.next_request, n_req - 1)]
    waiting_more = state.next_request + jnp.sum(taken) < n_req
    idle = jnp.where(~busy & waiting_more, jnp.maximum(next_arrival - now, 0.0), 0.0)
    clock_whole, clock_frac, end = advance_clock(state.clock_whole, state.clock_frac, dt, idle)

    # ---------------------------------------------------------------- completion
    slot_generated = jnp.where(decoding, slot_generated + 1, slot_generated)
    slot_context = context
    live = slot_request >= 0
    out_tokens = workload.output_tokens[jnp.maximum(slot_request, 0)]
    done = live & (slot_generated >= out_tokens)
    req_status, req_first, req_finish = record_request_events(
        state.req_status, state.req_first_token_s, state.req_finish_s,
        admitted=jnp.where(admit, cand, n_req), rejected=jnp.where(rejected_now, cand, n_req),
        finished=jnp.where(done, slot_request, n_req), end=end)

    done2 = done[:, None]
    new_state = EngineState(
        slot_request=jnp.where(done, -1, slot_request),
        slot_generated=jnp.where(done, 0, slot_generated),
        slot_context=jnp.where(done, 0, slot_context),
        unit_tier=jnp.where(done2, jnp.int8(_NO_UNIT), unit_tier),
        unit_bank_group=jnp.where(done2, jnp.int16(0), unit_bg),
        unit_latent=jnp.where(done2, 0.0, unit_latent),
        unit_importance=jnp.where(done2, 0.0, unit_importance),
        unit_selected=jnp.where(done2, False, selected),
        activation=activation,
        clock_whole=clock_whole,
        clock_frac=clock_frac,
        step=state.step + 1,
        next_request=state.next_request + jnp.sum(taken).astype(jnp.int32),
        req_status=req_status,
        req_first_token_s=req_first,
        req_finish_s=req_finish,
        overflow=overflow,
        seed=state.seed,
    )
    metrics = StepMetrics(
        step_time_s=dt,
        idle_s=idle,
        decode_requests=jnp.sum(decoding).astype(jnp.int32),
        prefill_requests=jnp.sum(admit).astype(jnp.int32),
        output_tokens=(jnp.sum(decoding) + jnp.sum(admit)).astype(jnp.int32),
        tier_units=tier_units(new_state.unit_tier),
        attention_s=jnp.where(busy, cost.attention_s, 0.0),
        tier_attention_s=jnp.where(busy, cost.tier_attention_s, 0.0),
        selected_units=integer_sum(selected, selected.size),
        persisted_units=persisted.astype(jnp.int32),
        previously_selected_units=previously_selected.astype(jnp.int32),
        selected_mass=selected_mass,
        migrated_units=integer_sum(moved, moved.size),
        migrated_from_ssd=integer_sum(moved & (tier_before_decode == 2), moved.size),
        energy_pj=jnp.where(busy, cost.energy_pj, 0.0),
        rejected=jnp.sum(rejected_now).astype(jnp.int32),
    )
    return new_state, metrics


def rollout(config: EngineConfig, params: SimParams, state: EngineState,
            workload: DeviceWorkload, num_steps: int, recorded=None):
    """Run ``num_steps`` steps with ``lax.scan``.

    Args:
      config: static sizes; params: SimParams; state: EngineState; workload: request
        arrays [N]; num_steps: S (static); recorded: optional f32 [S_rec, U] unit logits.

    Returns:
      (final EngineState, StepMetrics with every field stacked over [S]).
    """

    def body(carry, _):
        return step(config, params, carry, workload, recorded)

    return lax.scan(body, state, None, length=num_steps)


@functools.partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnums=(2,))
def rollout_jit(config, params, state, workload, num_steps, recorded=None):
    """Jitted :func:`rollout` with the state donated (one compile per config and chunk)."""
    return rollout(config, params, state, workload, num_steps, recorded)


@functools.partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnums=(2,))
def rollout_batch(config, params, state, workload, num_steps, recorded=None):
    """:func:`rollout` vmapped over a leading axis C of ``params`` and ``state`` (one
    configuration each); returns (states [C, ...], StepMetrics [C, S, ...]). State donated."""
    return jax.vmap(rollout, in_axes=(None, 0, 0, None, None, None))(
        config, params, state, workload, num_steps, recorded)
