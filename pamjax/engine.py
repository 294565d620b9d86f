"""The serving engine: ``step(config, params, state, workload)`` and its ``lax.scan`` rollout.

One step is one iteration of vLLM-style continuous batching with prefill priority
(PAM_SPEC §3), written as the serving loop's phases, each in the module of its name:

1. **admit and prefill** (batching, placement): requests that have arrived are admitted in
   FCFS order while slots and KV capacity allow; their prompts are prefilled and their KV
   units placed (importance ratio for PAM, fastest-first for the baselines);
2. **place new units** (placement): every request that was already running decodes one
   token; a token that opens a KV unit gets a tier and a bank group (PAM: HBM, displacing
   the request's least important HBM unit when HBM is full);
3. **attend** (locality): the access model picks the attended units and updates PAM's
   importance EMA;
4. **account the attention load** (placement): attended tokens per bank group, partial
   results per device, the activation window;
5. **schedule** (scheduler): PAM's online x:y:1 swaps, and the tokens that moved;
6. **cost** (costs): the step's time and energy from the gathered counts;
7. **complete** (batching): the clock, finished requests, request events.

A request whose KV can never fit the enabled tiers is rejected and counted. With nothing to
do, the clock jumps to the next arrival. Everything is fixed-shape and branch-free on traced
values, so ``jax.vmap`` over a stacked SimParams pytree runs many configurations in one
compiled program, and a chunk of steps runs without returning to the host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pamjax import batching, locality, placement, scheduler
from pamjax._numerics import tier_units
from pamjax.active_rows import narrow_columns
from pamjax.costs import StepCounts, static_energy_pj, step_cost
from pamjax.types import (
    ENERGY_COMPONENTS,
    NO_UNIT,
    NUM_TIERS,
    STATUS_REJECTED,
    STATUS_RUNNING,
    DeviceWorkload,
    EngineConfig,
    EngineState,
    SimParams,
    StepMetrics,
)


def init_state(config: EngineConfig, seed: int = 0) -> EngineState:
    """An empty system at time 0: no request admitted, every slot free.

    Args:
      config: static sizes (R slots, U units per slot, N requests, window, bank groups).
      seed: access-model seed (uint32), stored in the state.

    Returns:
      EngineState with [R] slot arrays, [R, U] unit tables, [N] request arrays, a
      [W, 3, G] activation window and the clock at 0 s.
    """
    r, u = config.num_slots, config.units_per_slot
    return EngineState(
        unit_tier=jnp.full((r, u), NO_UNIT, jnp.int8),
        unit_bank_group=jnp.zeros((r, u), jnp.int16),
        unit_latent=jnp.zeros((r, u), jnp.float32),
        unit_importance=jnp.zeros((r, u), jnp.float32),
        unit_selected=jnp.zeros((r, u), bool),
        activation=jnp.zeros((config.window, NUM_TIERS, config.padded_bank_groups), jnp.int32),
        seed=jnp.asarray(seed, jnp.uint32),
        migrated_tokens=None if config.placement_score is None
        else jnp.zeros((NUM_TIERS, NUM_TIERS), jnp.int32),
        **batching.empty_batch_state(config),
    )


def step(config: EngineConfig, params: SimParams, state: EngineState,
         workload: DeviceWorkload, recorded=None):
    """Advance the serving system by one iteration (the phases of the module docstring).

    Args:
      config: static sizes.
      params: numeric parameters of this configuration.
      state: system state before the step.
      workload: request arrays [N].
      recorded: f32 [S, U] recorded unit logits when ``config.recorded_steps`` > 0.

    Returns:
      (new state, StepMetrics of this step).
    """
    start = state
    decoding = state.slot_request >= 0  # requests admitted in this step decode from the next
    capacity = batching.tier_capacity(params)

    # 1. Admit and prefill.
    admission = batching.admit_fcfs(config, params, workload, state.slot_request,
                                    state.next_request, state.clock_whole + state.clock_frac,
                                    capacity)
    order = placement.mapping_order(config, params, state, admission, decoding)
    learned = config.placement_score is not None  # static: views only for a learned policy
    view = placement.lifetime_view(
        params, tier_units(state.unit_tier), workload.prompt_tokens[admission.cand_c],
        jnp.zeros_like(admission.cand_c), state.migrated_tokens) if learned else None
    state, prefill_tier_tokens = admit_prompts(config, params, state, admission, capacity,
                                               order, recorded, view)

    # 2. Place new units.
    token = batching.decode_token(config, state.slot_context, decoding)
    tier_before = state.unit_tier
    state = placement.place_new_units(config, params, state, token, capacity, order)

    # 3. Attend.
    state, attended = locality.attend(config, params, state, decoding, token, recorded)

    # 4. Account the attention load (on the placement before this step's scheduling).
    activation, load = placement.attention_load(config, params, state, attended, token)

    # 5. Schedule.
    view = placement.lifetime_view(
        params, tier_units(state.unit_tier),
        workload.prompt_tokens[jnp.maximum(state.slot_request, 0)], state.slot_generated,
        start.migrated_tokens) if learned else None
    state = scheduler.schedule_step(config, params, state, attended, token.context, view)
    migration = scheduler.migration(
        tier_before, state.unit_tier, attended.tokens,
        attended.present[:, 0] if config.skip_idle else None,
        narrow_columns(config, token.context, True, False) if config.skip_idle else None)

    # 6. Cost.
    cost = step_cost(params, _step_counts(config, params, decoding, token, prefill_tier_tokens,
                                          admission, attended, load, migration.tokens))

    # 7. Complete.
    busy = jnp.any(decoding) | jnp.any(admission.admit)
    end = batching.close_step(config, workload, start, admission, state.slot_request,
                              state.slot_generated, decoding, busy, cost.time_s)
    new_state = _next_state(config, state, end, token, attended, activation, start,
                            migration.tokens if learned else None)
    metrics = _metrics(config, params, end, decoding, admission, new_state, cost, busy,
                       attended, migration, token.context)
    return new_state, metrics


def admit_prompts(config, params, state, admission, capacity, order, recorded, view=None):
    """The admitted requests take their slots with their prompts' KV units
    (placement.place_prompts, batching.start_requests; ``view``: the candidates'
    LifetimeView, only with a learned placement score).

    Returns:
      (EngineState, i32 [T] prompt tokens written to each tier). Most steps admit nobody;
      with ``config.skip_idle`` the phase is then skipped (nothing would change).
    """
    def admit(state):
        prompts = placement.place_prompts(config, params, state, admission, capacity, order,
                                          recorded, view)
        return batching.start_requests(state, admission, prompts), prompts.tier_tokens

    if not config.skip_idle:
        return admit(state)
    return lax.cond(jnp.any(admission.admit), admit,
                    lambda state: (state, jnp.zeros((NUM_TIERS,), jnp.int32)), state)


def _step_counts(config, params, decoding, token, prefill_tier_tokens, admission, attended,
                 load, migrated) -> StepCounts:
    """The counts costs.step_cost prices, from the step's phase records."""
    prefill_n = jnp.where(admission.admit, admission.prompt, 0).astype(jnp.float32)
    bank_group_tokens = load.bank_group_tokens.astype(jnp.float32)
    return StepCounts(
        decode_requests=jnp.sum(decoding).astype(jnp.float32),
        decode_context=jnp.sum(jnp.where(decoding, token.context, 0)).astype(jnp.float32),
        tier_tokens=load.tier_tokens.astype(jnp.float32),
        tier_selected=jnp.sum(load.bank_group_tokens, -1).astype(jnp.float32),
        tier_busiest_bank_group=jnp.max(placement.spread_over_pages(
            params, bank_group_tokens, config.page_size), -1),
        tier_requests=load.tier_requests.astype(jnp.float32),
        tier_holders=load.tier_holders.astype(jnp.float32),
        tier_active_bank_groups=load.active_bank_groups.astype(jnp.float32),
        tier_active_chunks=load.active_chunks.astype(jnp.float32),
        tier_topk_candidates=load.topk_candidates.astype(jnp.float32),
        tier_decode_writes=load.decode_writes.astype(jnp.float32),
        prefill_tokens=jnp.sum(prefill_n),
        prefill_pairs=jnp.sum(prefill_n * (prefill_n + 1.0) / 2.0),
        prefill_tier_tokens=prefill_tier_tokens.astype(jnp.float32),
        migrated_tokens=migrated.astype(jnp.float32),
        sparse=(params.select_fraction < 1.0).astype(jnp.float32),
    )


def _next_state(config: EngineConfig, state: EngineState, end: batching.StepEnd,
                token: batching.DecodeToken, attended: locality.Attention, activation,
                start: EngineState, migrated=None) -> EngineState:
    """The state after the step: finished requests free their slot and their KV (with
    ``config.skip_idle``, the unit tables are only rewritten in steps where one finished);
    ``migrated`` (i32 [T, T], only with a learned placement score) is kept for its link
    load."""
    done, done2 = end.done, end.done[:, None]

    def free_units(tables):
        tier, bank_group, latent, importance, selected = tables
        return (jnp.where(done2, jnp.int8(NO_UNIT), tier), jnp.where(done2, jnp.int16(0), bank_group),
                jnp.where(done2, 0.0, latent), jnp.where(done2, 0.0, importance),
                jnp.where(done2, False, selected))

    tables = (state.unit_tier, state.unit_bank_group, state.unit_latent, state.unit_importance,
              attended.selected)
    if config.skip_idle:
        tables = lax.cond(jnp.any(done), free_units, lambda tables: tables, tables)
    else:
        tables = free_units(tables)
    tier, bank_group, latent, importance, selected = tables
    return EngineState(
        slot_request=jnp.where(done, -1, state.slot_request),
        slot_generated=jnp.where(done, 0, end.generated),
        slot_context=jnp.where(done, 0, token.context),
        unit_tier=tier,
        unit_bank_group=bank_group,
        unit_latent=latent,
        unit_importance=importance,
        unit_selected=selected,
        activation=activation,
        clock_whole=end.clock_whole,
        clock_frac=end.clock_frac,
        step=start.step + 1,
        next_request=end.next_request,
        req_status=end.req_status,
        req_first_token_s=end.req_first_token_s,
        req_finish_s=end.req_finish_s,
        overflow=start.overflow | token.overflow,
        seed=start.seed,
        migrated_tokens=migrated,
    )


def _metrics(config, params, end: batching.StepEnd, decoding,
             admission: batching.Admission, new_state: EngineState, cost, busy,
             attended: locality.Attention, migration: scheduler.Migration,
             new_state_context) -> StepMetrics:
    """What the step reports (types.StepMetrics); an idle clock jump costs static energy."""
    return StepMetrics(
        step_time_s=end.step_time_s,
        idle_s=end.idle_s,
        decode_requests=jnp.sum(decoding).astype(jnp.int32),
        decode_context=jnp.sum(jnp.where(decoding, new_state_context, 0)).astype(jnp.int32),
        prefill_requests=jnp.sum(admission.admit).astype(jnp.int32),
        output_tokens=(jnp.sum(decoding) + jnp.sum(admission.admit)).astype(jnp.int32),
        tier_units=placement.held_units(config, new_state),
        attention_s=jnp.where(busy, cost.attention_s, 0.0),
        tier_attention_s=jnp.where(busy, cost.tier_attention_s, 0.0),
        selected_units=attended.selected_units,
        persisted_units=attended.persisted_units.astype(jnp.int32),
        previously_selected_units=attended.previously_selected_units.astype(jnp.int32),
        selected_mass=attended.selected_mass,
        migrated_units=migration.units,
        migrated_from_ssd=migration.units_from_ssd,
        energy_pj=step_energy_pj(params, cost, busy, end.idle_s),
        rejected=jnp.sum(admission.rejected).astype(jnp.int32),
    )


def resume(config: EngineConfig, params: SimParams, state: EngineState,
           workload: DeviceWorkload, recorded=None) -> EngineState:
    """Put the workload's in-flight requests in their slots at t = 0 (a steady-state start).

    The in-flight requests (``generated_tokens`` > 0, the first K of the workload;
    workload.steady_state) take slots 0..K-1 in FCFS order while slots, ``max_batch`` and
    the KV capacity (each request's whole prompt + output reserved, as admission does)
    allow. A request that has produced g tokens holds prompt + g - 1 tokens of KV (its last
    token's K/V is written when it decodes the next), placed as the system places a prompt
    of that length (placement.place_prompts: PAM by importance ratio, the baselines fastest
    first) and mapped to bank groups. No time passes and nothing is charged: their prefill
    happened before t = 0, so their first-token time stays NaN (no TTFT). In-flight requests
    that do not fit are rejected (the batch is out of memory), so the FCFS pointer starts
    past all K and only fresh requests are admitted later.

    Args:
      config: static sizes; params: SimParams; state: a fresh EngineState (init_state);
      workload: request arrays [N] with ``generated_tokens``; recorded: optional recorded
        unit logits.

    Returns:
      The EngineState the first step starts from.
    """
    r, n_req, page = config.num_slots, config.num_requests, config.page_size
    capacity = batching.tier_capacity(params)
    cand = jnp.arange(r, dtype=jnp.int32)
    cand_c = jnp.minimum(cand, n_req - 1)
    generated = workload.generated_tokens[cand_c]
    in_flight = (cand < n_req) & (generated > 0)
    prompt, output = workload.prompt_tokens[cand_c], workload.output_tokens[cand_c]
    need = batching.units_needed(prompt + output - 1, page)
    fits = (jnp.cumsum(jnp.where(in_flight, need, 0)) <= jnp.sum(capacity)) \
        & (need <= config.units_per_slot) & (cand < jnp.minimum(params.max_batch, r))
    admit = jnp.cumprod((in_flight & fits).astype(jnp.int32)).astype(bool)
    admission = batching.Admission(
        cand=cand, cand_c=cand_c, prompt=prompt + generated - 1, admit=admit,
        rejected=jnp.zeros(r, bool), taken=admit, slot=jnp.where(admit, cand, r))
    wide = dataclasses.replace(config, admit_window=r)
    order = placement.mapping_order(wide, params, state, admission, jnp.zeros(r, bool))
    view = None if config.placement_score is None else placement.lifetime_view(
        params, tier_units(state.unit_tier), prompt, jnp.where(in_flight, generated, 0),
        state.migrated_tokens)
    prompts = placement.place_prompts(wide, params, state, admission, capacity, order,
                                      recorded, view)
    state = batching.start_requests(state, admission, prompts)
    admitted = jnp.where(admit, cand, n_req)
    refused = jnp.where(in_flight & ~admit, cand, n_req)
    status = state.req_status.at[admitted].set(STATUS_RUNNING, mode="drop")
    return state.replace(
        slot_generated=jnp.where(admit, generated, state.slot_generated),
        next_request=jnp.sum(in_flight).astype(jnp.int32),
        req_status=status.at[refused].set(STATUS_REJECTED, mode="drop"))


UNIT_FIELDS = {"unit_tier": NO_UNIT, "unit_bank_group": 0, "unit_latent": 0.0,
               "unit_importance": 0.0, "unit_selected": False}
"""The [R, U] fields of EngineState and the value of a column that holds no unit."""


def relay_units(state: EngineState, units: int) -> EngineState:
    """The state with its unit axis cut or padded to ``units`` columns.

    The step's results do not depend on U beyond the units that exist (every [R, U] sum
    and ranking is masked by presence, and a request's columns are its token positions), so
    a state may run with U just large enough for the requests it can hold in the coming
    steps (simulation.run sizes it per chunk). Cut columns must hold no unit; they may
    hold a stale latent (a prompt's latents are drawn for every column), which no step reads
    before it is redrawn identically when the unit opens. Padded columns hold no unit.

    Args:
      state: EngineState with [R, U0] unit tables.
      units: the new U (>= 1).

    Returns:
      EngineState with [R, units] unit tables (the same arrays where U is unchanged).
    """
    def fit(name, table):
        have = table.shape[-1]
        if units <= have:
            return table[:, :units]
        fill = jnp.full((table.shape[0], units - have), UNIT_FIELDS[name], table.dtype)
        return jnp.concatenate([table, fill], axis=-1)

    return state.replace(**{name: fit(name, getattr(state, name)) for name in UNIT_FIELDS})


def step_energy_pj(params: SimParams, cost, busy, idle_s):
    """A step's energy per component, pJ [C]: the cost model's when the step did work, plus
    the static power of an idle clock jump (shared with the event leap)."""
    energy = jnp.where(busy, cost.energy_pj, 0.0)
    return energy.at[ENERGY_COMPONENTS.index("static")].add(static_energy_pj(params, idle_s))


def vmapped(config: EngineConfig) -> EngineConfig:
    """The config a vmapped step runs with: ``skip_idle`` off, since under vmap a switch or
    cond on a batched value runs every branch; the results are the same."""
    return dataclasses.replace(config, skip_idle=False)


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


resume_jit = jax.jit(resume, static_argnums=0)
"""Jitted :func:`resume` (one compile per EngineConfig)."""


@functools.partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnums=(2,))
def rollout_jit(config, params, state, workload, num_steps, recorded=None):
    """Jitted :func:`rollout` with the state donated (one compile per config and chunk)."""
    return rollout(config, params, state, workload, num_steps, recorded)


@functools.partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnums=(2,))
def rollout_batch(config, params, state, workload, num_steps, recorded=None):
    """:func:`rollout` vmapped over a leading axis C of ``params`` and ``state`` (one
    configuration each); returns (states [C, ...], StepMetrics [C, S, ...]). State donated.
    Rows are not compacted (:func:`vmapped`)."""
    return jax.vmap(rollout, in_axes=(None, 0, 0, None, None, None))(
        vmapped(config), params, state, workload, num_steps, recorded)
