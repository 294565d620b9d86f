"""Request lifecycle of continuous batching: admission, the decode token, the clock, completion.

vLLM-style continuous batching with prefill priority (PAM_SPEC §3). At each step, requests
that have arrived are admitted in FCFS order while a slot is free, ``params.max_batch``
allows it, and the KV capacity of the enabled tiers can hold their whole prompt plus output
(reserved at admission, so a running request never runs out of room); their prompts are
prefilled in that step, producing their first token. Requests that were already running each
decode one token. A request that has produced all its output tokens finishes and frees its
slot. With nothing to do, the clock jumps to the next arrival.

These functions are shared by the general engine step (engine.py) and the event leap
(leap.py), so both take the same decisions with the same float32 operations in the same order.
Shapes: R slots, N requests, A = ``admit_window`` candidates, T tiers.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from pamjax.types import (
    STATUS_FINISHED,
    STATUS_REJECTED,
    STATUS_RUNNING,
    DeviceWorkload,
    EngineConfig,
    SimParams,
)


def units_needed(tokens, page_size: int):
    """KV units (pages of ``page_size`` tokens) holding ``tokens`` tokens, rounded up; any
    integer array shape."""
    return (tokens + page_size - 1) // page_size


def units_ahead(prompt_tokens, output_tokens, slot_request, next_request: int, lookahead: int,
                page_size: int) -> int:
    """Host-side bound on the KV units any slot may need while the FCFS pointer stays below
    ``next_request + lookahead``: the largest reservation (prompt + output - 1 tokens, as
    admission reserves) of the running requests and of the next ``lookahead`` requests.

    Args:
      prompt_tokens, output_tokens: numpy int [N] of the workload; slot_request: numpy int
        [R] (-1 = free slot); next_request: the FCFS pointer; lookahead: requests ahead of
        it that may be admitted; page_size: tokens per unit.

    Returns:
      int, units (>= 1).
    """
    ahead = slice(next_request, next_request + lookahead)
    running = slot_request[slot_request >= 0]
    tokens = np.concatenate([prompt_tokens[running] + output_tokens[running],
                             prompt_tokens[ahead] + output_tokens[ahead]]) - 1
    return max(int(units_needed(tokens, page_size).max(initial=1)), 1)


def tier_capacity(params: SimParams):
    """KV units each tier may hold, i32 [T] (0 for the tiers the system does not use)."""
    return jnp.where(params.tier_enabled, params.capacity_units, 0).astype(jnp.int32)


def empty_batch_state(config: EngineConfig) -> dict:
    """The BatchState fields at time 0, before any step (shared by engine.init_state and
    leap.init_state): every slot free, every request waiting, no event recorded."""
    r, n = config.num_slots, config.num_requests
    return dict(
        slot_request=jnp.full((r,), -1, jnp.int32),
        slot_generated=jnp.zeros((r,), jnp.int32),
        slot_context=jnp.zeros((r,), jnp.int32),
        clock_whole=jnp.zeros((), jnp.float32),
        clock_frac=jnp.zeros((), jnp.float32),
        step=jnp.zeros((), jnp.int32),
        next_request=jnp.zeros((), jnp.int32),
        req_status=jnp.zeros((n,), jnp.int8),
        req_first_token_s=jnp.full((n,), jnp.nan, jnp.float32),
        req_finish_s=jnp.full((n,), jnp.nan, jnp.float32),
        overflow=jnp.zeros((), bool),
    )


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


def start_requests(state, admission: Admission, prompts):
    """The admitted requests take their slots with their prompt's KV units.

    Args:
      state: EngineState before admission.
      admission: the step's Admission.
      prompts: placement.PromptUnits of the admission window (tier, bank_group, latent,
        importance, each [A, U]).

    Returns:
      EngineState whose admitted slots hold their request, its first token (prefill
      produces it) and its prompt's units.
    """
    slot = admission.slot
    return state.replace(
        unit_tier=state.unit_tier.at[slot].set(prompts.tier, mode="drop"),
        unit_bank_group=state.unit_bank_group.at[slot].set(prompts.bank_group, mode="drop"),
        unit_latent=state.unit_latent.at[slot].set(prompts.latent, mode="drop"),
        unit_importance=state.unit_importance.at[slot].set(prompts.importance, mode="drop"),
        slot_request=state.slot_request.at[slot].set(admission.cand, mode="drop"),
        slot_generated=state.slot_generated.at[slot].set(1, mode="drop"),
        slot_context=state.slot_context.at[slot].set(admission.prompt, mode="drop"),
    )


@struct.dataclass
class DecodeToken:
    """The token each running request decodes in a step (decode_token).

    context i32 [R]: tokens in each slot's KV after the step's decode (unchanged for the
      slots that do not decode);
    opens bool [R]: the token opens a new KV unit;
    unit i32 [R]: index of the unit the token lands in ((context - 1) // page_size, may
      reach U after an overflow);
    column i32 [R]: ``unit`` clamped to U - 1 where ``opens``, U elsewhere (a scatter index
      that drops the rows opening nothing);
    overflow bool []: some request needed more than the U units of its slot.
    """

    context: jnp.ndarray
    opens: jnp.ndarray
    unit: jnp.ndarray
    column: jnp.ndarray
    overflow: jnp.ndarray


def decode_token(config: EngineConfig, slot_context, decoding) -> DecodeToken:
    """Every ``decoding`` request (bool [R]) adds one token to its KV (slot_context i32 [R])."""
    page, n_units = config.page_size, config.units_per_slot
    context = jnp.where(decoding, slot_context + 1, slot_context)
    opens = decoding & ((context - 1) % page == 0)
    unit = (context - 1) // page
    return DecodeToken(context=context, opens=opens, unit=unit,
                       column=jnp.where(opens, jnp.minimum(unit, n_units - 1), n_units),
                       overflow=jnp.any(opens & (unit >= n_units)))


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


@struct.dataclass
class StepEnd:
    """How a step ends (close_step): its time, the clock and the request bookkeeping.

    step_time_s f32 []: the step's duration (0 when idle); idle_s f32 []: the clock's jump
      to the next arrival when the step had nothing to do;
    clock_whole, clock_frac f32 []: the clock after the step;
    generated i32 [R]: output tokens per slot after the step (before freeing);
    done bool [R]: slots whose request finished in the step (to be freed);
    req_status i8 [N], req_first_token_s f32 [N], req_finish_s f32 [N]: request events;
    next_request i32 []: the FCFS pointer past the requests admitted or rejected.
    """

    step_time_s: jnp.ndarray
    idle_s: jnp.ndarray
    clock_whole: jnp.ndarray
    clock_frac: jnp.ndarray
    generated: jnp.ndarray
    done: jnp.ndarray
    req_status: jnp.ndarray
    req_first_token_s: jnp.ndarray
    req_finish_s: jnp.ndarray
    next_request: jnp.ndarray


def close_step(config: EngineConfig, workload: DeviceWorkload, state, admission: Admission,
               slot_request, slot_generated, decoding, busy, time_s) -> StepEnd:
    """The step's duration, the clock, completions and request events.

    A busy step (something decoded or was admitted) takes ``time_s``; an idle one takes no
    time and the clock jumps to the arrival of the oldest request still waiting. Decoding
    slots gain one output token; a request with all its output tokens is done at the end of
    the step.

    Args:
      config: static sizes; workload: request arrays [N];
      state: the state at the start of the step (clock, FCFS pointer, request arrays; an
        EngineState or a leap.LeapState);
      admission: the step's admission; slot_request i32 [R] after admission;
      slot_generated i32 [R] after admission (admitted slots hold their first token);
      decoding bool [R]: slots that decoded; busy bool []: the step did work;
      time_s f32 []: the step's simulated duration when busy (costs.step_cost).

    Returns:
      StepEnd.
    """
    n_req = config.num_requests
    now = state.clock_whole + state.clock_frac
    dt = jnp.where(busy, time_s, 0.0)
    next_arrival = workload.arrival_s[jnp.minimum(state.next_request, n_req - 1)]
    waiting_more = state.next_request + jnp.sum(admission.taken) < n_req
    idle = jnp.where(~busy & waiting_more, jnp.maximum(next_arrival - now, 0.0), 0.0)
    clock_whole, clock_frac, end = advance_clock(state.clock_whole, state.clock_frac, dt, idle)

    generated = jnp.where(decoding, slot_generated + 1, slot_generated)
    live = slot_request >= 0
    done = live & (generated >= workload.output_tokens[jnp.maximum(slot_request, 0)])
    req_status, req_first, req_finish = record_request_events(
        state.req_status, state.req_first_token_s, state.req_finish_s,
        admitted=jnp.where(admission.admit, admission.cand, n_req),
        rejected=jnp.where(admission.rejected, admission.cand, n_req),
        finished=jnp.where(done, slot_request, n_req), end=end)
    return StepEnd(step_time_s=dt, idle_s=idle, clock_whole=clock_whole, clock_frac=clock_frac,
                   generated=generated, done=done, req_status=req_status,
                   req_first_token_s=req_first, req_finish_s=req_finish,
                   next_request=state.next_request + jnp.sum(admission.taken).astype(jnp.int32))
