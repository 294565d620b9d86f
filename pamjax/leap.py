"""Event leap: engine.step's trajectory, many decode steps per device iteration, for systems
whose step cost does not depend on the access model.

Why. One engine step (engine.step) is a few hundred small XLA operations: ~0.35 ms on a CPU
core whatever the batch. A trace replay needs one step per decode iteration (about 10 per
request on the Azure conversation trace), so it is bound by that per-step cost. Between two
events, arrivals that can be admitted and the steps that follow them, a decode step of a
system such as vLLM-offload changes the state in closed form: every running request adds
one token, to its last KV unit or to a new one, and the step's time is the cost model
(costs.step_cost) of counts that are simple functions of the step index. This module takes
one general step (admission, prefill, decode, completion), then up to ``leap_steps`` - 1
decode-only steps at once as [L, R] arrays, and keeps the prefix of those steps that
engine.step would have taken the same way.

Which systems. Those for which :func:`applies` is true: attention on the GPUs (the PIM
critical path depends on bank-group loads, which depend on the placement history), dense
attention (the selection is every unit, so the access model changes no decision), no
online scheduling, fastest-first prompt placement and new units in the fastest tier with
room; no learned placement score and no recorded scores. Of the study's systems that is
``vllm-offload``. simulation.simulate uses the leap for it automatically (``leap=None``).

When a leap step is engine.step's step. In leap step i (after the general step) nothing is
admitted or rejected, and every new KV unit lands in HBM. The leap keeps steps while:

* some request decodes (otherwise the step is idle and the clock jumps: a general step);
* the head of the queue cannot be taken at the step's start: not yet arrived, or it can be
  neither admitted (no slot or KV capacity left, given the requests that finished in the
  leap so far) nor rejected. Its arrival is compared with the clock as engine.step updates
  it, the same float32 additions in the same order;
* the units opened so far in the leap fit the HBM room there was after the general step
  (finishing requests only add room, so each opening found HBM free, as fastest-free
  allocation would have given it).

The first step that breaks a condition is left to the next iteration's general step.

State. Instead of the [R, U] unit table the leap keeps per slot the units on each tier and
the tier of its last unit: fastest-first placement fills a prompt's units in position order
and new units are appended, so every unit but the last is full and tokens per tier follow.
Bank groups, latent scores, importance and the activation window are not tracked: nothing
in these systems' costs or decisions reads them.

How close. The schedule (which requests decode, are admitted, finish or are rejected at
which step) and every integer metric equal engine.step's. Float32 results can differ in the
last bit: XLA evaluates the cost model on a vector of steps with other floating-point
contractions than on one, so a step time can be one ulp apart, and the clock after it
too. On the whole Azure conversation trace (193,150 steps) 2,337 step times differ by one
ulp (1.2e-7 relative) and 33 first-token times by one float32 ulp of the clock at ~3,000 s
(0.24 ms); the schedule is identical. (Should an arrival fall within such an ulp of a
step's end, the two would admit it one step apart.) ``selected_mass`` is the number of
decoding requests (each request's attention mass sums to 1; engine.step sums float32
softmax terms, within 1e-6 of it). After an ``overflow`` (a request outgrowing the slot's
U units, which make_config rules out) the two engines' unit counts differ.

Output. A chunk is a ``lax.while_loop`` over iterations that writes each iteration's
general step and kept leap steps into a [chunk_steps] buffer of StepMetrics rows, one row
per engine step as the scan of engine.rollout would produce, until the buffer cannot take
another full iteration; the host folds the first ``rows`` rows (simulation.run).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from pamjax import batching, placement
from pamjax.batching import units_needed
from pamjax.costs import StepCounts, empty_counts, static_energy_pj, step_cost
from pamjax.errors import ConfigError
from pamjax.types import (
    DDR,
    ENERGY_COMPONENTS,
    HBM,
    NEW_TOKEN_FASTEST_FREE,
    NUM_TIERS,
    PLACEMENT_FASTEST_FIRST,
    SSD,
    STATUS_FINISHED,
    STATUS_REJECTED,
    BatchState,
    DeviceWorkload,
    EngineConfig,
    SimParams,
    StepMetrics,
)

_STATIC = ENERGY_COMPONENTS.index("static")
LEAP_STEPS = 32
"""Default engine steps per iteration (one general step plus up to 31 leap steps)."""


@struct.dataclass
class LeapState(BatchState):
    """The serving system at a step boundary, as the leap tracks it: the BatchState fields
    (slots, clock, requests, as in EngineState), and

    slot_units i32 [R, T]: KV units per tier of each slot; slot_last_tier i32 [R]: tier of
      the request's last unit (the one being filled).
    iterations i32 []: general steps taken (each followed by a leap); steps / iterations is
      the leap's gain.
    """

    slot_units: jnp.ndarray
    slot_last_tier: jnp.ndarray
    iterations: jnp.ndarray


def applies(params: SimParams, config: EngineConfig) -> str | None:
    """None when the leap reproduces engine.step for this configuration, else the reason
    it does not (host-side; ``params`` must hold concrete values of one configuration)."""
    checks = (
        (config.placement_score is None, "a learned placement score is set"),
        (config.recorded_steps == 0, "recorded scores drive the access model"),
        (not bool(np.asarray(params.attention_on_pim)), "attention runs in PIM"),
        (float(np.asarray(params.select_fraction)) >= 1.0, "attention is sparse"),
        (int(np.asarray(params.swap_budget)) == 0, "online scheduling is on"),
        (int(np.asarray(params.placement_policy)) == PLACEMENT_FASTEST_FIRST,
         "prompt placement is not fastest-first"),
        (int(np.asarray(params.new_token_policy)) == NEW_TOKEN_FASTEST_FREE,
         "new units do not go to the fastest tier with room"),
    )
    return next((reason for ok, reason in checks if not ok), None)


def init_state(config: EngineConfig) -> LeapState:
    """An empty system at time 0 (the leap's engine.init_state)."""
    r = config.num_slots
    return LeapState(
        slot_units=jnp.zeros((r, NUM_TIERS), jnp.int32),
        slot_last_tier=jnp.zeros((r,), jnp.int32),
        iterations=jnp.zeros((), jnp.int32),
        **batching.empty_batch_state(config),
    )


def _tier_tokens(units, last_tier, context, page: int):
    """Tokens per tier, i32 [..., T], of requests whose units are all full but the last:
    ``units`` [..., T], ``last_tier`` [...] and ``context`` [...] tokens."""
    empty = jnp.sum(units, -1) * page - context  # unused tokens of the last unit
    is_last = last_tier[..., None] == jnp.arange(NUM_TIERS)
    return units * page - jnp.where(is_last, empty[..., None], 0)


def _one_hot(tier, count):
    """count (i32 [...]) at position ``tier`` of a new last axis of length T."""
    return jnp.where(tier[..., None] == jnp.arange(NUM_TIERS), count[..., None], 0)


def _counts(decode_requests, decode_context, tier_tokens, decode_writes, prefill_n=None,
            prefill_tier_tokens=None) -> StepCounts:
    """StepCounts of a dense GPU-attention step ([...]-batched). Fields that only PIM
    attention reads (bank groups, holders, partials) stay zero."""
    f32 = jnp.float32
    counts = empty_counts(decode_requests.shape).replace(
        decode_requests=decode_requests.astype(f32),
        decode_context=decode_context.astype(f32),
        tier_tokens=tier_tokens.astype(f32),
        tier_selected=tier_tokens.astype(f32),
        tier_decode_writes=decode_writes.astype(f32))
    if prefill_n is None:
        return counts
    return counts.replace(prefill_tokens=jnp.sum(prefill_n),
                          prefill_pairs=jnp.sum(prefill_n * (prefill_n + 1.0) / 2.0),
                          prefill_tier_tokens=prefill_tier_tokens.astype(f32))


def general_step(config: EngineConfig, params: SimParams, s: LeapState,
                 workload: DeviceWorkload):
    """One step as engine.step takes it (admission, prefill, decode, completion), on the
    leap's state, through the same batching functions.

    Args:
      config, params, workload: as engine.step; s: LeapState before the step.

    Returns:
      (new LeapState, StepMetrics of the step).
    """
    page = config.page_size
    capacity = batching.tier_capacity(params)
    decoding = s.slot_request >= 0  # requests admitted in this step decode from the next

    admission = batching.admit_fcfs(config, params, workload, s.slot_request, s.next_request,
                                    s.clock_whole + s.clock_frac, capacity)
    # Fastest-first prompt placement: units in position order fill HBM, DDR, then SSD.
    prompt = jnp.where(admission.admit, admission.prompt, 0)
    units = jnp.minimum(units_needed(prompt, page), config.units_per_slot)
    free_now = jnp.maximum(capacity - jnp.sum(s.slot_units, 0), 0)
    hbm, ddr, ssd = placement.prompt_tier_counts(units, jnp.zeros_like(units), units, free_now)
    c_units = jnp.stack([hbm, ddr, ssd], -1)
    c_last = jnp.where(ssd > 0, SSD, jnp.where(ddr > 0, DDR, HBM))
    c_tier_tokens = _tier_tokens(c_units, c_last, prompt, page)
    slot = admission.slot
    slot_request = s.slot_request.at[slot].set(admission.cand, mode="drop")
    slot_generated = s.slot_generated.at[slot].set(1, mode="drop")
    slot_context = s.slot_context.at[slot].set(admission.prompt, mode="drop")
    slot_units = s.slot_units.at[slot].set(c_units, mode="drop")
    last_tier = s.slot_last_tier.at[slot].set(c_last, mode="drop")

    # Decode: a new unit goes to the fastest tier with room, granted in slot order.
    token = batching.decode_token(config, slot_context, decoding)
    new_tier = placement.fastest_free_tier(
        token.opens, jnp.maximum(capacity - jnp.sum(slot_units, 0), 0))
    slot_units = slot_units + _one_hot(new_tier, token.opens.astype(jnp.int32))
    last_tier = jnp.where(token.opens, new_tier, last_tier)
    tokens = _tier_tokens(slot_units, last_tier, token.context, page)
    dec = decoding.astype(jnp.int32)
    # Each decoding request writes its token to its last unit's tier.
    counts = _counts(jnp.sum(dec), jnp.sum(dec * token.context),
                     jnp.sum(dec[:, None] * tokens, 0),
                     jnp.sum(_one_hot(last_tier, dec), 0), prompt.astype(jnp.float32),
                     jnp.sum(c_tier_tokens, 0))
    cost = step_cost(params, counts)

    busy = jnp.any(decoding) | jnp.any(admission.admit)
    end = batching.close_step(config, workload, s, admission, slot_request, slot_generated,
                              decoding, busy, cost.time_s)
    done = end.done
    slot_units = jnp.where(done[:, None], 0, slot_units)
    new_state = s.replace(
        slot_request=jnp.where(done, -1, slot_request),
        slot_generated=jnp.where(done, 0, end.generated),
        slot_context=jnp.where(done, 0, token.context),
        slot_units=slot_units,
        slot_last_tier=jnp.where(done, 0, last_tier),
        clock_whole=end.clock_whole,
        clock_frac=end.clock_frac,
        step=s.step + 1,
        next_request=end.next_request,
        req_status=end.req_status,
        req_first_token_s=end.req_first_token_s,
        req_finish_s=end.req_finish_s,
        overflow=s.overflow | token.overflow,
        iterations=s.iterations + 1,
    )
    # Dense attention selects every unit; a request that decoded at the previous step
    # (generated >= 2) had all of its then units selected.
    selected = jnp.sum(dec * units_needed(token.context, page))
    persisted = jnp.sum(jnp.where(decoding & (s.slot_generated >= 2),
                                  units_needed(token.context - 1, page), 0))
    metrics = _metrics(params, end.step_time_s, end.idle_s, jnp.sum(dec),
                       jnp.sum(dec * token.context), jnp.sum(admission.admit),
                       jnp.sum(slot_units, 0), cost, busy, selected, persisted,
                       jnp.sum(admission.rejected))
    return new_state, metrics


def _metrics(params, dt, idle, decode_requests, decode_context, prefill_requests, tier_units,
             cost, busy, selected, persisted, rejected) -> StepMetrics:
    """StepMetrics from a step's (possibly [L]-batched) pieces."""
    i32, zero = jnp.int32, jnp.zeros(dt.shape, jnp.int32)
    busy_t = busy[..., None]
    return StepMetrics(
        step_time_s=dt,
        idle_s=idle,
        decode_requests=decode_requests.astype(i32),
        decode_context=decode_context.astype(i32),
        prefill_requests=prefill_requests.astype(i32),
        output_tokens=(decode_requests + prefill_requests).astype(i32),
        tier_units=tier_units.astype(i32),
        attention_s=jnp.where(busy, cost.attention_s, 0.0),
        tier_attention_s=jnp.where(busy_t, cost.tier_attention_s, 0.0),
        selected_units=selected.astype(i32),
        persisted_units=persisted.astype(i32),
        previously_selected_units=persisted.astype(i32),
        selected_mass=decode_requests.astype(jnp.float32),
        migrated_units=zero,
        migrated_from_ssd=zero,
        energy_pj=jnp.where(busy_t, cost.energy_pj, 0.0).at[..., _STATIC].add(
            static_energy_pj(params, idle)),
        rejected=rejected.astype(i32),
    )


def _queue_head_taken(config: EngineConfig, params: SimParams, s: LeapState,
                      workload: DeviceWorkload, decoding, start):
    """bool [L]: would the head of the queue be admitted or rejected at the start of each
    leap step (then that step is not a leap step)?

    Args:
      decoding: bool [L, R], the requests running at each leap step's start (exactly those
        decoding in it); start: f32 [L], each step's start time as engine.step's clock.
    """
    page, n_units, n_req = config.page_size, config.units_per_slot, config.num_requests
    capacity = batching.tier_capacity(params)
    req = jnp.maximum(s.slot_request, 0)
    head = jnp.minimum(s.next_request, n_req - 1)
    need = units_needed(workload.prompt_tokens[head] + workload.output_tokens[head] - 1, page)
    never_fits = (need > jnp.sum(capacity)) | (need > n_units)
    reserved = jnp.sum(jnp.where(decoding, units_needed(
        workload.prompt_tokens[req] + workload.output_tokens[req] - 1, page), 0), -1)
    has_slot = jnp.sum(decoding, -1) < jnp.minimum(params.max_batch, config.num_slots)
    fits = need <= jnp.sum(capacity) - reserved
    arrived = (s.next_request < n_req) & (workload.arrival_s[head] <= start)
    return arrived & (never_fits | (fits & has_slot))


def leap(config: EngineConfig, params: SimParams, s: LeapState, workload: DeviceWorkload,
         num_steps: int, step_limit):
    """Up to ``num_steps`` decode-only steps from ``s``, keeping the prefix of steps that
    engine.step would take the same way (module docstring).

    Args:
      config, params, workload: as engine.step.
      s: state after a general step.
      num_steps: L, candidate steps (static).
      step_limit: i32 [], no step beyond this index is taken.

    Returns:
      (new LeapState, StepMetrics stacked over [L] (rows beyond the kept steps describe
      steps not taken: run_chunk overwrites them), kept steps i32 []).
    """
    page, n_units, n_req = config.page_size, config.units_per_slot, config.num_requests
    i = jnp.arange(num_steps, dtype=jnp.int32)[:, None]  # [L, 1] leap step
    capacity = batching.tier_capacity(params)
    live = s.slot_request >= 0
    req = jnp.maximum(s.slot_request, 0)
    c, g = s.slot_context, s.slot_generated
    units = s.slot_units
    total_units = jnp.sum(units, -1)
    # Leap step at which each running request produces its last token (then frees its slot).
    last_step = jnp.where(live, workload.output_tokens[req] - g - 1, -1)
    decoding = live & (i <= last_step)  # [L, R]
    context = c + i + 1
    opens = decoding & ((context - 1) % page == 0)
    opened = units_needed(context, page) - total_units  # new units so far, all in HBM
    hbm_room = jnp.maximum(capacity[HBM] - jnp.sum(units[:, HBM]), 0)
    fits_hbm = jnp.cumsum(jnp.sum(opens, -1)) <= hbm_room

    room_in_last = total_units * page - c
    in_last = jnp.minimum(i + 1, room_in_last)
    tokens = _tier_tokens(units, s.slot_last_tier, c, page) \
        + _one_hot(jnp.broadcast_to(s.slot_last_tier, in_last.shape), in_last) \
        + _one_hot(jnp.zeros_like(in_last), i + 1 - in_last)  # [L, R, T]
    dec = decoding.astype(jnp.int32)
    # A token fills the last unit while it has room, then lands in a new HBM unit.
    landed = jnp.where(i < room_in_last, s.slot_last_tier, HBM)  # [L, R]
    counts = _counts(jnp.sum(dec, -1), jnp.sum(dec * context, -1),
                     jnp.sum(dec[..., None] * tokens, 1), jnp.sum(_one_hot(landed, dec), 1))
    # lax.map, not vmap: each step's cost is then the very program engine.step runs, so the
    # step times agree to the bit (vmapped, XLA fuses the arithmetic differently and an
    # ulp's difference in the clock can move an arrival across a step boundary).
    cost = lax.map(lambda one: step_cost(params, one), counts)
    busy = jnp.any(decoding, -1)
    dt = jnp.where(busy, cost.time_s, 0.0)

    # The clock exactly as engine.step advances it, one float32 addition per step.
    clock = [(s.clock_whole, s.clock_frac, s.clock_whole + s.clock_frac)]
    for k in range(num_steps):
        clock.append(batching.advance_clock(*clock[-1][:2], dt[k], 0.0))
    whole_after, frac_after, end = (jnp.stack(column) for column in zip(*clock[1:]))
    start = jnp.stack([c[2] for c in clock[:-1]])

    admission = _queue_head_taken(config, params, s, workload, decoding, start)

    ok = busy & ~admission & fits_hbm & (s.step + i[:, 0] < step_limit)
    kept_mask = jnp.cumprod(ok.astype(jnp.int32)).astype(bool)  # [L]
    kept = jnp.sum(kept_mask).astype(jnp.int32)

    # Commit the kept steps.
    last = jnp.maximum(kept - 1, 0)
    finished = live & (last_step < kept)
    stays = live & ~finished
    moved = kept > 0
    new_units = units.at[:, HBM].add(jnp.where(stays & moved, opened[last], 0))
    finished_id = jnp.where(finished, s.slot_request, n_req)
    valid_dec = decoding & kept_mask[:, None]
    overflow = s.overflow | jnp.any(valid_dec & opens & ((context - 1) // page >= n_units))
    new_state = s.replace(
        slot_request=jnp.where(finished, -1, s.slot_request),
        slot_generated=jnp.where(stays, g + kept, jnp.where(finished, 0, g)),
        slot_context=jnp.where(stays, c + kept, jnp.where(finished, 0, c)),
        slot_units=jnp.where(finished[:, None], 0, new_units),
        slot_last_tier=jnp.where(finished, 0, jnp.where(
            stays & moved & (opened[last] > 0), 0, s.slot_last_tier)),
        clock_whole=jnp.where(moved, whole_after[last], s.clock_whole),
        clock_frac=jnp.where(moved, frac_after[last], s.clock_frac),
        step=s.step + kept,
        req_status=s.req_status.at[finished_id].set(STATUS_FINISHED, mode="drop"),
        req_finish_s=s.req_finish_s.at[finished_id].set(
            end[jnp.clip(last_step, 0, num_steps - 1)], mode="drop"),
        overflow=overflow,
    )

    after = live & (i < last_step)  # still holding units after the step
    tier_units = jnp.sum(jnp.where(after[..., None], units + _one_hot(
        jnp.zeros_like(opened), opened), 0), 1)
    selected = jnp.sum(dec * units_needed(context, page), -1)
    persisted = jnp.sum(jnp.where(decoding & (g + i >= 2), units_needed(context - 1, page),
                                  0), -1)
    zero = jnp.zeros((num_steps,), jnp.int32)
    metrics = _metrics(params, dt, jnp.zeros((num_steps,), jnp.float32), jnp.sum(dec, -1),
                       jnp.sum(dec * context, -1), zero,
                       tier_units, cost, busy, selected, persisted, zero)
    return new_state, metrics, kept


@functools.partial(jax.jit, static_argnames=("config", "chunk_steps", "leap_steps"),
                   donate_argnums=(2,))
def run_chunk(config: EngineConfig, params: SimParams, state: LeapState,
              workload: DeviceWorkload, chunk_steps: int, leap_steps: int, step_limit):
    """Iterations (a general step + a leap) until ``chunk_steps`` rows could overflow, every
    request is done, or ``step_limit`` steps are taken.

    Args:
      config, params, workload: as engine.step; state: LeapState (donated).
      chunk_steps: C, rows of the metrics buffer (static); leap_steps: K <= C, engine steps
        per iteration at most (static); step_limit: i32 [].

    Returns:
      (LeapState, StepMetrics [C] whose first ``rows`` rows are the steps taken in order,
      rows i32 [], finished or rejected requests i32 []).
    """
    if not 2 <= leap_steps <= chunk_steps:
        raise ConfigError("leap_steps", leap_steps, f"must be in [2, chunk_steps = {chunk_steps}]")
    row = jax.eval_shape(lambda: general_step(config, params, state, workload)[1])
    buffer = jax.tree.map(lambda x: jnp.zeros((chunk_steps,) + x.shape, x.dtype), row)

    def all_done(s):
        return (s.next_request >= config.num_requests) & jnp.all(s.slot_request < 0)

    def more(carry):
        s, _, rows = carry
        return (rows + leap_steps <= chunk_steps) & ~all_done(s) & (s.step < step_limit)

    def iteration(carry):
        s, buf, rows = carry
        s, first = general_step(config, params, s, workload)
        s, rest, kept = leap(config, params, s, workload, leap_steps - 1, step_limit)
        block = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
        buf = jax.tree.map(lambda b, x: lax.dynamic_update_slice_in_dim(b, x, rows, 0),
                           buf, block)
        return s, buf, rows + 1 + kept

    state, buffer, rows = lax.while_loop(more, iteration, (state, buffer, jnp.int32(0)))
    status = state.req_status
    done = jnp.sum((status == STATUS_FINISHED) | (status == STATUS_REJECTED), dtype=jnp.int32)
    return state, buffer, rows, done
