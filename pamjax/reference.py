"""A plain numpy/Python reference of the serving step, written for reading, not for speed.

This module computes what :func:`pamjax.engine.step` computes, with explicit loops over
request slots and KV units instead of masks, scatters and cumulative sums, so that it doubles
as readable documentation of the simulated serving model and as an independent check of the
vectorised engine (``tests/test_engine_reference.py`` runs both side by side).

The model, one step at a time (PAM_SPEC §3 and §5):

1. **Admission (FCFS, prefill priority).** Requests are taken in arrival order, at most
   ``admit_window`` per step, while they have arrived. A request whose whole KV (prompt plus
   output minus one token, in units of ``page_size`` tokens) can never fit, because it exceeds
   the capacity of all enabled tiers together or the units of one slot, is rejected. The
   others are admitted while a slot is free under ``max_batch``, their whole KV fits the
   capacity left after the reservations of the running requests (reserving at admission means
   a running request never runs out of room), and the prompts admitted in this step stay
   within ``prefill_token_budget`` tokens (the first admitted prompt always may); the first
   request that cannot be admitted stops the walk. An admitted request takes the lowest free
   slot, its prompt is prefilled (which produces its first token) and its prompt units are
   placed.
2. **Prompt placement.** Each admitted prompt first says what it wants. Fastest-first
   (baselines): everything on HBM, ranked by position. Importance ratio (PAM): units are
   ranked by decreasing log-mass (logit + log tokens, ties by position); with the target
   shares ``(x, y, 1) / (x + y + 1)``, the request wants on HBM the fewest most important
   units whose mass covers the HBM share of its mass (cumulative >= share), and on SSD the
   largest number of least important units whose mass stays strictly below the SSD share
   (counting from the least important end, so tiny tail masses are resolved); the HBM wish
   is capped at the units not wanted on SSD, and DDR is wanted for the rest. Capacity is then
   granted tier by tier over all the step's prompts in FCFS order: HBM to every prompt, then
   DDR for what is neither on HBM nor wanted on SSD, then SSD for the rest, and what SSD
   cannot take goes back up to DDR's remaining room and then HBM's (admission reserved the
   whole KV, so everything fits). The top-ranked units of a prompt go to HBM, the next to
   DDR and the rest to SSD, in the granted numbers.
3. **Decode: the new KV token.** Each request that was running at the start of the step
   decodes one token. When the token opens a new unit, that unit is placed, in slot order:
   fastest-first puts it on the fastest tier with free room; PAM puts it on HBM and, when HBM
   is full, demotes the request's least important HBM unit to DDR (or SSD when DDR is full).
4. **Bank-group mapping.** Every unit placed in this step gets a bank group of its device:
   greedily (PAM), the units of a tier, in the order they are placed, go round-robin over the
   tier's bank groups sorted by their selected-unit count over the last ``window`` decode
   steps; sequentially (ablation, baselines), ``naive_run_units`` consecutive units of a
   request share a bank group regardless of activity. The units of the admitted prompts are
   mapped as one batch and the decode units (new units, then demoted ones) as a second batch.
5. **Access model.** Every unit of a decoding request has a latent log-importance that drifts
   by one AR(1) step per decode step (a unit created in this step keeps its fresh draw); its
   logit adds the sink and recency bonuses (:mod:`pamjax.locality`); its attention mass is the
   softmax of the logits over the request, a unit of n tokens counting n times. The selector
   attends units in decreasing logit until ``select_fraction`` of the request's tokens are
   covered (all units when attention is dense). PAM's importance factor is the EMA
   ``I = lambda * mass + (1 - lambda) * I``.
6. **Attention load.** Selected tokens are counted per (tier, bank group) on the placement
   *before* this step's scheduling (selected units per group are this step's activation
   row). Under the greedy mapping a page of ``page_size`` tokens stands for tokens in that
   many consecutive bank groups, so its load is shared equally among them when finding the
   busiest group (token granularity: no change). A
   request's attention yields one partial result per bank group holding its attended units,
   on each tier.
7. **Online scheduling (PAM).** Per decoding request, with IS_t the sum of the importance
   factors of the request's units on tier t and x* = IS_HBM / IS_SSD, y* = IS_DDR / IS_SSD:
   phase 1 swaps the least important DDR unit with the most important SSD unit while
   x* + y* < x + y; phase 2 swaps the least important HBM unit with the most important DDR
   unit while x* / y* < x / y. A phase stops as soon as the slower tier's candidate is not
   more important than the faster tier's, or after ``min(swap_budget, max_swaps)`` swaps. A
   swapped unit takes its partner's bank group.
8. **Time, energy, clock.** The step's counts (decode requests and contexts, tokens and
   selected tokens per tier, the busiest bank group of each tier, bank groups and requests
   with selected tokens, prefill tokens, and the tokens that ended the step on another tier
   than they started it on) go through :func:`pamjax.costs.step_cost`. The selection labels
   are read where the tokens sit when they are selected, i.e. before scheduling. A step that
   neither decodes nor admits takes no time and moves the clock to the arrival of the oldest
   request that was waiting when the step began.
9. **Completion.** A request that has produced all its output tokens is finished; its slot and
   its KV are freed. First-token and finish times are the clock at the end of the step.

Units are ``page_size`` consecutive tokens (page_size 1 is token granularity). Rankings are
exact sorts (ties by unit index) where the engine bisects, and importance, attention mass,
prompt log-masses, target shares and the cost arithmetic are float64; the access model's
latents and logits are the float32 values that the :mod:`pamjax.locality` functions produce,
since those functions are the definition of the synthetic access model. (The engine sums
float32 masses, so a prompt whose cumulative mass falls within float32 rounding of a target
share may get one unit more or less on HBM or SSD there.) Recorded attention scores are not
supported here.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import jax
import numpy as np

from pamjax import locality
from pamjax.costs import StepCounts, step_cost
from pamjax.errors import ConfigError
from pamjax.placement import naive_start
from pamjax.types import (
    DDR,
    ENERGY_COMPONENTS,
    HBM,
    MAPPING_GREEDY,
    MAPPING_SEQUENTIAL,
    NEW_TOKEN_HBM_DISPLACE,
    NO_UNIT,
    NUM_TIERS,
    PLACEMENT_IMPORTANCE_RATIO,
    SSD,
    STATUS_FINISHED,
    STATUS_REJECTED,
    STATUS_RUNNING,
    STATUS_WAITING,
    EngineConfig,
    SimParams,
)

# Compiled once per shape only so that the per-request calls below are cheap; what they compute
# is the definition in locality.py and costs.py, unchanged.
_initial_latent = jax.jit(locality.initial_latent)
_evolve_latent = jax.jit(locality.evolve_latent)
_logits = jax.jit(locality.logits, static_argnums=3)
_attention_mass = jax.jit(locality.attention_mass)
_step_cost = jax.jit(step_cost)


@dataclasses.dataclass
class RefState:
    """The reference system between two steps (numpy mirror of ``EngineState``).

    Fields:
      slot_request: int [R], workload index of the request in each slot (-1 = free).
      slot_generated: int [R], output tokens produced so far.
      slot_context: int [R], tokens in the slot's KV cache.
      unit_tier: int [R, U], tier of each KV unit (-1 = no unit).
      unit_bank_group: int [R, U], bank group of each unit inside its device.
      unit_latent: float32 [R, U], access-model latent log-importance (unused where no
        unit).
      unit_importance: float64 [R, U], PAM importance factor I (0 where no unit).
      unit_selected: bool [R, U], attended at the previous step.
      activation: int [W, T, G], selected units per bank group over the last W decode steps
        (row ``step % W`` holds step ``step``).
      clock_s: float, simulated time, s.
      step: int, steps taken.
      next_request: int, FCFS pointer: requests before it were admitted or rejected.
      req_status: int [N], STATUS_* of each request.
      req_first_token_s: float64 [N], time of the first token, s (NaN until then).
      req_finish_s: float64 [N], time of the last token, s (NaN until then).
      seed: int, access-model seed.
    """

    slot_request: np.ndarray
    slot_generated: np.ndarray
    slot_context: np.ndarray
    unit_tier: np.ndarray
    unit_bank_group: np.ndarray
    unit_latent: np.ndarray
    unit_importance: np.ndarray
    unit_selected: np.ndarray
    activation: np.ndarray
    clock_s: float
    step: int
    next_request: int
    req_status: np.ndarray
    req_first_token_s: np.ndarray
    req_finish_s: np.ndarray
    seed: int


@dataclasses.dataclass
class RefMetrics:
    """What one reference step reports; fields as in :class:`pamjax.types.StepMetrics`.

    Fields:
      step_time_s, idle_s: float, s.
      decode_requests, prefill_requests, output_tokens: int.
      decode_context: int, the decoding requests' contexts after their token, summed.
      tier_units: int [T], units per tier after the step.
      attention_s: float, attention time on the step's critical path, s.
      tier_attention_s: float [T], attention time per tier, s.
      selected_units, persisted_units, previously_selected_units: int.
      selected_mass: float, attention mass covered by the selections, summed over requests.
      migrated_units, migrated_from_ssd: int.
      energy_pj: float [C], energy per component (types.ENERGY_COMPONENTS), pJ.
      rejected: int.
    """

    step_time_s: float
    idle_s: float
    decode_requests: int
    decode_context: int
    prefill_requests: int
    output_tokens: int
    tier_units: np.ndarray
    attention_s: float
    tier_attention_s: np.ndarray
    selected_units: int
    persisted_units: int
    previously_selected_units: int
    selected_mass: float
    migrated_units: int
    migrated_from_ssd: int
    energy_pj: np.ndarray
    rejected: int


def reference_init(config: EngineConfig, seed: int = 0) -> RefState:
    """An empty system at time 0: every slot free, every request waiting.

    Args:
      config: static sizes (the same EngineConfig the engine uses).
      seed: access-model seed.

    Returns:
      RefState.
    """
    r, u, n = config.num_slots, config.units_per_slot, config.num_requests
    return RefState(
        slot_request=np.full(r, -1, np.int64),
        slot_generated=np.zeros(r, np.int64),
        slot_context=np.zeros(r, np.int64),
        unit_tier=np.full((r, u), NO_UNIT, np.int64),
        unit_bank_group=np.zeros((r, u), np.int64),
        unit_latent=np.zeros((r, u), np.float32),
        unit_importance=np.zeros((r, u), np.float64),
        unit_selected=np.zeros((r, u), bool),
        activation=np.zeros((config.window, NUM_TIERS, config.padded_bank_groups), np.int64),
        clock_s=0.0,
        step=0,
        next_request=0,
        req_status=np.full(n, STATUS_WAITING, np.int64),
        req_first_token_s=np.full(n, np.nan),
        req_finish_s=np.full(n, np.nan),
        seed=int(seed),
    )


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def units_for(tokens: int, page_size: int) -> int:
    """KV units that hold ``tokens`` tokens."""
    return -(-tokens // page_size)


def tokens_per_unit(context: int, page_size: int, num_units: int) -> np.ndarray:
    """Tokens in each unit of a request whose KV holds ``context`` tokens, int [U]."""
    tokens = np.zeros(num_units, np.int64)
    for u in range(num_units):
        tokens[u] = min(page_size, max(context - u * page_size, 0))
    return tokens


def count_units_per_tier(unit_tier: np.ndarray) -> list[int]:
    """Units held on each tier, over the whole tier table."""
    counts = [0] * NUM_TIERS
    for tier in unit_tier.ravel():
        if tier != NO_UNIT:
            counts[tier] += 1
    return counts


def _row_logits(p: SimParams, latent_row: np.ndarray, context: int, page_size: int):
    """Attention logits of one request's units (locality.logits on a single row)."""
    return np.asarray(_logits(p, latent_row[None, :], np.array([context]), page_size))[0]


def _row_mass(logits_row: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Attention mass of one request's units, float64 [U] (locality.attention_mass)."""
    mass = _attention_mass(logits_row[None, :], tokens[None, :])
    return np.asarray(mass, np.float64)[0]


def _select(logits_row: np.ndarray, tokens: np.ndarray, select_fraction: float) -> np.ndarray:
    """The selector: units in decreasing logit until the token target is covered.

    The target is ``max(ceil(select_fraction * context), 1)`` tokens; dense attention
    (``select_fraction >= 1``) attends every unit.
    """
    present = [u for u in range(len(tokens)) if tokens[u] > 0]
    chosen = np.zeros(len(tokens), bool)
    if select_fraction >= 1.0:
        chosen[present] = True
        return chosen
    target = max(math.ceil(select_fraction * int(tokens.sum())), 1)
    covered = 0
    for u in sorted(present, key=lambda u: -logits_row[u]):
        if covered >= target:
            break
        chosen[u] = True
        covered += tokens[u]
    return chosen


def _map_bank_groups(p: SimParams, placements: list[tuple[int, int]],
                     activation: np.ndarray, page_size: int) -> list[int]:
    """Bank groups for a batch of units placed together.

    Args:
      p: parameters (``bank_groups_per_device`` per tier, ``mapping_policy``,
        ``naive_run_units``).
      placements: (tier, request id, unit index) of each unit, in placement order.
      activation: int [W, T, G] activation history at the start of the step.
      page_size: tokens per unit.

    Returns:
      The bank group of each unit.
    """
    groups = [int(p.bank_groups_per_device[t]) for t in range(NUM_TIERS)]
    if int(p.mapping_policy) == MAPPING_GREEDY:
        # Least-activated first (lowest index among equals), then round-robin.
        order = []
        for t in range(NUM_TIERS):
            load = [int(activation[:, t, g].sum()) for g in range(groups[t])]
            order.append(sorted(range(groups[t]), key=lambda g: (load[g], g)))
        placed = [0] * NUM_TIERS
        result = []
        for tier, _, _ in placements:
            result.append(order[tier][placed[tier] % groups[tier]])
            placed[tier] += 1
        return result
    # Striped: a request's token k sits on bank group start + k. Sequential: runs of
    # ``naive_run_units`` units per bank group. Both from the request's start group.
    def offset(unit):
        if int(p.mapping_policy) == MAPPING_SEQUENTIAL:
            return unit // max(int(p.naive_run_units), 1)
        return unit * page_size

    return [(int(naive_start(np.int32(request))) % groups[tier] + offset(unit))
            % groups[tier] for tier, request, unit in placements]


def _tier_importance(importance_row, tier_row, present) -> list[float]:
    """IS per tier of one request: sum of the importance factors of its units there."""
    sums = [0.0] * NUM_TIERS
    for u in range(len(tier_row)):
        if present[u]:
            sums[tier_row[u]] += importance_row[u]
    return sums


def _swap_phase(importance_row, tier_row, bank_group_row, present, fast: int, slow: int,
                budget: int, wants_more) -> None:
    """One phase of PAM's online scheduling on one request, in place.

    While ``wants_more(IS)`` holds and the budget is not exhausted, swap the least important
    unit of the fast tier with the most important unit of the slow tier, provided the slow
    one is strictly more important (lowest unit index among equal importances).
    """
    swaps = 0
    while swaps < budget and wants_more(_tier_importance(importance_row, tier_row, present)):
        fast_units = [u for u in range(len(tier_row)) if present[u] and tier_row[u] == fast]
        slow_units = [u for u in range(len(tier_row)) if present[u] and tier_row[u] == slow]
        if not fast_units or not slow_units:
            break
        f = min(fast_units, key=lambda u: (importance_row[u], u))
        s = min(slow_units, key=lambda u: (-importance_row[u], u))
        if not importance_row[s] > importance_row[f]:
            break
        tier_row[f], tier_row[s] = slow, fast
        bank_group_row[f], bank_group_row[s] = bank_group_row[s], bank_group_row[f]
        swaps += 1


def _schedule_request(p: SimParams, config: EngineConfig, importance_row, tier_row,
                      bank_group_row, present, decode_index: int) -> None:
    """PAM's two swap phases on one decoding request (PAM_SPEC §5), in place. The request
    may move ``swap_budget`` tokens per phase per step: at its k-th decode step, the pages
    its allowance completes, floor((k + 1) B / P) - floor(k B / P)."""
    x, y = float(p.target_x), float(p.target_y)
    tokens, page = int(p.swap_budget), config.page_size
    pages = (decode_index + 1) * tokens // page - decode_index * tokens // page
    budget = min(pages, config.max_swaps)

    def phase1(share):  # x* + y* < x + y; with no SSD importance x* is infinite
        hbm, ddr, ssd = share
        return ssd > 0 and (hbm / ssd + ddr / ssd) < x + y

    def phase2(share):  # x* / y* = IS_HBM / IS_DDR < x / y; infinite with no DDR importance
        hbm, ddr, _ = share  # y = 0 (no DDR share wanted): x / y is infinite
        return ddr > 0 and (y == 0 or hbm / ddr < x / y)

    _swap_phase(importance_row, tier_row, bank_group_row, present, DDR, SSD, budget, phase1)
    _swap_phase(importance_row, tier_row, bank_group_row, present, HBM, DDR, budget, phase2)


def target_shares(params: SimParams) -> tuple[float, float, float]:
    """Importance share per tier implied by PAM's x:y:1 target (float64)."""
    x, y = float(params.target_x), float(params.target_y)
    total = x + y + 1.0
    return x / total, y / total, 1.0 / total


def prompt_wants(params: SimParams, log_mass) -> tuple[list[int], int, int]:
    """What one prompt asks of the tiers before capacity is granted (step 2 of the docstring).

    Args:
      params: parameters (``placement_policy``, ``target_x``, ``target_y``).
      log_mass: float [n], log of each prompt unit's attention mass up to a constant
        (logit + log tokens), one entry per prompt unit.

    Returns:
      (rank order of the units, units wanted on HBM, units wanted on SSD). PAM ranks by
      decreasing log-mass (ties by position); fastest-first ranks by position and wants
      everything on HBM.
    """
    num_units = len(log_mass)
    if int(params.placement_policy) != PLACEMENT_IMPORTANCE_RATIO:
        return list(range(num_units)), num_units, 0
    log_mass = [float(v) for v in log_mass]
    order = sorted(range(num_units), key=lambda u: (-log_mass[u], u))
    peak = max(log_mass, default=0.0)
    mass = [math.exp(v - peak) for v in log_mass]
    total = sum(mass)
    share_hbm, _, share_ssd = target_shares(params)

    # HBM: the fewest most important units whose mass covers share_hbm of the request's.
    want_hbm, covered = 0, 0.0
    while want_hbm < num_units and covered < share_hbm * total:
        covered += mass[order[want_hbm]]
        want_hbm += 1
    # SSD: the most least-important units whose mass stays strictly below share_ssd of it.
    want_ssd, tail = 0, 0.0
    for u in reversed(order):
        if not tail + mass[u] < share_ssd * total:
            break
        tail += mass[u]
        want_ssd += 1
    return order, min(want_hbm, num_units - want_ssd), want_ssd


def grant_prompt_counts(demand_hbm: list[int], demand_ssd: list[int], units: list[int],
                        free: list[int]) -> list[tuple[int, int, int]]:
    """Units of each prompt per tier, granted tier by tier over all prompts in FCFS order.

    A pass over the prompts grants HBM; a second grants DDR the units that are neither on
    HBM nor wanted on SSD (so what HBM could not take goes to DDR); a third grants SSD what
    is left (what DDR could not take included); what SSD could not take then goes back up,
    to DDR's remaining room and then to HBM's. Each pass hands a tier's remaining room to
    the prompts one after the other.

    Args:
      demand_hbm, demand_ssd, units: per prompt, in FCFS order.
      free: free units per tier [T] before the prompts; consumed in place.

    Returns:
      (hbm, ddr, ssd) units of each prompt.
    """
    def take(tier, want):
        got = min(max(want, 0), free[tier])
        free[tier] -= got
        return got

    n = len(units)
    hbm = [take(HBM, demand_hbm[k]) for k in range(n)]
    ddr = [take(DDR, units[k] - hbm[k] - demand_ssd[k]) for k in range(n)]
    ssd = [take(SSD, units[k] - hbm[k] - ddr[k]) for k in range(n)]
    left = [units[k] - hbm[k] - ddr[k] - ssd[k] for k in range(n)]
    more_ddr = [take(DDR, left[k]) for k in range(n)]
    more_hbm = [take(HBM, left[k] - more_ddr[k]) for k in range(n)]
    return [(hbm[k] + more_hbm[k], ddr[k] + more_ddr[k], ssd[k]) for k in range(n)]


def prompt_tiers(params: SimParams, log_masses, free: list[int]) -> list[list[int]]:
    """Tiers of the units of the prompts admitted in one step (step 2 of the docstring).

    Args:
      params: parameters (``placement_policy``, ``target_x``, ``target_y``).
      log_masses: per admitted prompt in FCFS order, float [n] log-mass of its n units.
      free: free units per tier [T]; the granted units are taken from it.

    Returns:
      Per prompt, the tier of each of its units.
    """
    wants = [prompt_wants(params, log_mass) for log_mass in log_masses]
    counts = grant_prompt_counts([want_hbm for _, want_hbm, _ in wants],
                                 [want_ssd for _, _, want_ssd in wants],
                                 [len(log_mass) for log_mass in log_masses], free)
    placed = []
    for (order, _, _), (on_hbm, on_ddr, _) in zip(wants, counts, strict=True):
        tiers = [SSD] * len(order)
        for rank, u in enumerate(order):
            if rank < on_hbm:
                tiers[u] = HBM
            elif rank < on_hbm + on_ddr:
                tiers[u] = DDR
        placed.append(tiers)
    return placed


def _numpy_params(params: SimParams) -> SimParams:
    return jax.tree.map(np.asarray, params)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Requests:
    """The workload as float64/int64 numpy arrays [N]: arrival_s, prompt and output tokens."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def kv_units(self, i: int, page_size: int) -> int:
        """Units of request i's whole KV: prompt + all but the last output token."""
        return units_for(int(self.prompt[i] + self.output[i] - 1), page_size)


@dataclasses.dataclass
class _Prefill:
    """What the step's prefill writes: prompt tokens per tier [T], the sum of prompt lengths
    n and of n (n + 1) / 2 (prefill FLOPs), and (request, slot) of each admitted prompt."""

    tier_tokens: np.ndarray
    tokens: float
    pairs: float
    slots: list


@dataclasses.dataclass
class _Load:
    """Where the step's attention reads and its decode writes (phase 4): attended tokens
    per (tier, bank group) and the same spread over a page's bank groups (busiest-group
    input), tokens per tier, requests holding KV / attending per tier, active bank groups,
    FlashDecoding chunks with attended tokens (without PAMattention), top-k label
    candidates and decode writes per tier."""

    bank_group_tokens: np.ndarray
    bank_group_load: np.ndarray
    tier_tokens: np.ndarray
    tier_holders: np.ndarray
    tier_requests: np.ndarray
    active_bank_groups: np.ndarray
    active_chunks: np.ndarray
    topk_candidates: np.ndarray
    decode_writes: np.ndarray


def reference_step(config: EngineConfig, params: SimParams, state: RefState, workload):
    """Advance the reference system by one step (see the module docstring for the model).

    The phases have the engine's names and order (engine.step), written as plain loops
    and without calling the engine's phases.

    Args:
      config: static sizes (recorded scores are not supported: ``recorded_steps`` must be 0).
      params: numeric parameters of one configuration (not batched).
      state: RefState before the step (not modified).
      workload: anything with ``arrival_s``, ``prompt_tokens`` and ``output_tokens`` arrays
        of length ``config.num_requests`` (a host or a device Workload).

    Returns:
      (RefState after the step, RefMetrics of the step).

    Raises:
      ConfigError: ``config.recorded_steps`` is not 0.
    """
    if config.recorded_steps:
        raise ConfigError("engine.recorded_steps", config.recorded_steps,
                          "the reference implements the synthetic access model only")
    p = _numpy_params(params)
    s = copy.deepcopy(state)
    requests = _Requests(np.asarray(workload.arrival_s, np.float64),
                         np.asarray(workload.prompt_tokens, np.int64),
                         np.asarray(workload.output_tokens, np.int64))
    capacity = [int(p.capacity_units[t]) if bool(p.tier_enabled[t]) else 0
                for t in range(NUM_TIERS)]
    # Requests admitted in this step decode from the next step on.
    decoding = [r for r in range(config.num_slots) if s.slot_request[r] >= 0]

    admitted, rejected = admit(config, p, s, requests, capacity)                # 1.
    prefill = prefill_and_place_prompts(config, p, s, requests, admitted, capacity)
    tier_before = s.unit_tier.copy()
    opened = place_new_units(config, p, s, decoding, capacity)                  # 2.
    tokens, selected, selected_mass = attend(config, p, s, decoding, opened)   # 3.
    load = attention_load(config, p, s, decoding, tokens, selected)            # 4.
    for r in decoding:                                                          # 5.
        _schedule_request(p, config, s.unit_importance[r], s.unit_tier[r],
                          s.unit_bank_group[r], tokens[r] > 0, int(s.slot_generated[r]))
    migrated, migrated_units, migrated_from_ssd = migration(tier_before, s.unit_tier, tokens)
    busy = bool(decoding) or bool(admitted)
    decode_context = sum(int(s.slot_context[r]) for r in decoding)
    cost = step_cost_of(p, s, decoding, load, prefill, migrated)                # 6.
    step_time, idle = complete(config, s, state, requests, decoding, prefill,   # 7.
                               rejected, float(cost.time_s) if busy else 0.0, busy)
    unit_selected_before = state.unit_selected
    selected_units = int(selected.sum())
    persisted = int((selected & unit_selected_before).sum())
    previously_selected = int(sum(unit_selected_before[r].sum() for r in decoding))
    for r in range(config.num_slots):
        if s.slot_request[r] < 0:
            selected[r] = False
    s.unit_selected = selected

    metrics = RefMetrics(
        step_time_s=step_time,
        idle_s=idle,
        decode_requests=len(decoding),
        decode_context=decode_context,
        prefill_requests=len(admitted),
        output_tokens=len(decoding) + len(admitted),
        tier_units=np.array(count_units_per_tier(s.unit_tier)),
        attention_s=float(cost.attention_s) if busy else 0.0,
        tier_attention_s=cost.tier_attention_s if busy else np.zeros(NUM_TIERS),
        selected_units=selected_units,
        persisted_units=persisted,
        previously_selected_units=previously_selected,
        selected_mass=selected_mass,
        migrated_units=migrated_units,
        migrated_from_ssd=migrated_from_ssd,
        energy_pj=_energy_with_idle(p, cost.energy_pj if busy else
                                    np.zeros_like(cost.energy_pj), idle),
        rejected=len(rejected),
    )
    return s, metrics


def _energy_with_idle(p: SimParams, energy_pj: np.ndarray, idle_s: float) -> np.ndarray:
    """The step's energy plus the static power of an idle clock jump (pJ, [C])."""
    energy = np.array(energy_pj, np.float64)
    energy[ENERGY_COMPONENTS.index("static")] += float(p.static_power_w) * idle_s * 1e12
    return energy


def admit(config: EngineConfig, p: SimParams, s: RefState, requests: _Requests,
          capacity: list[int]) -> tuple[list[int], list[int]]:
    """Phase 1a, admission (FCFS): the requests admitted and rejected in this step."""
    page = config.page_size
    running = [r for r in range(config.num_slots) if s.slot_request[r] >= 0]
    reserved = sum(requests.kv_units(s.slot_request[r], page) for r in running)
    room = min(int(p.max_batch), config.num_slots) - len(running)
    admitted, rejected = [], []
    admitted_units = admitted_prompt_tokens = 0
    last = min(s.next_request + config.admit_window, len(requests.arrival))
    for i in range(s.next_request, last):
        if requests.arrival[i] > s.clock_s:
            break
        need = requests.kv_units(i, page)
        if need > sum(capacity) or need > config.units_per_slot:
            rejected.append(i)
            continue
        if reserved + admitted_units + need > sum(capacity) or len(admitted) >= room:
            break
        if admitted and admitted_prompt_tokens + requests.prompt[i] > int(
                p.prefill_token_budget):
            break
        admitted.append(i)
        admitted_units += need
        admitted_prompt_tokens += int(requests.prompt[i])
    return admitted, rejected


def prefill_and_place_prompts(config: EngineConfig, p: SimParams, s: RefState,
                              requests: _Requests, admitted: list[int],
                              capacity: list[int]) -> _Prefill:
    """Phase 1b, prefill and prompt placement: each admitted request takes the lowest free
    slot, gets its first token, and its prompt units are placed and mapped (in place)."""
    num_units, page = config.units_per_slot, config.page_size
    free_slots = [r for r in range(config.num_slots) if s.slot_request[r] < 0]
    slots = list(zip(admitted, free_slots[:len(admitted)], strict=True))
    free = [max(capacity[t] - n, 0) for t, n in enumerate(count_units_per_tier(s.unit_tier))]
    prefill = _Prefill(np.zeros(NUM_TIERS), 0.0, 0.0, slots)
    placements = []  # (slot, unit, tier, request id) in placement order
    prompts = []  # (request, slot, tokens, units, latent, logits) in FCFS order
    for i, slot in slots:
        n_prompt = int(requests.prompt[i])
        latent = np.asarray(_initial_latent(p, np.uint32(s.seed), i, np.arange(num_units)),
                            np.float32)
        prompts.append((i, slot, tokens_per_unit(n_prompt, page, num_units),
                        units_for(n_prompt, page), latent,
                        _row_logits(p, latent, n_prompt, page)))
    placed = prompt_tiers(
        p, [[float(logits_row[u]) + math.log(tokens[u]) for u in range(n_units)]
            for _, _, tokens, n_units, _, logits_row in prompts], free)
    for (i, slot, tokens, n_prompt_units, latent, logits_row), tiers in zip(prompts, placed,
                                                                            strict=True):
        n_prompt = int(requests.prompt[i])
        mass = _row_mass(logits_row, tokens)
        for u in range(n_prompt_units):
            s.unit_tier[slot, u] = tiers[u]
            s.unit_latent[slot, u] = latent[u]
            s.unit_importance[slot, u] = mass[u]
            prefill.tier_tokens[tiers[u]] += tokens[u]
            placements.append((slot, u, tiers[u], i))
        s.slot_request[slot] = i
        s.slot_generated[slot] = 1  # prefill produces the first token
        s.slot_context[slot] = n_prompt
        s.req_status[i] = STATUS_RUNNING
        prefill.tokens += n_prompt
        prefill.pairs += n_prompt * (n_prompt + 1) / 2.0
    groups = _map_bank_groups(p, [(t, i, u) for _, u, t, i in placements], s.activation,
                              page)
    for (slot, u, _, _), group in zip(placements, groups, strict=True):
        s.unit_bank_group[slot, u] = group
    return prefill


def place_new_units(config: EngineConfig, p: SimParams, s: RefState, decoding: list[int],
                    capacity: list[int]) -> dict[int, int]:
    """Phase 2, the decode token: each decoding request adds a token; one that opens a unit
    gets a tier (fastest with room, or PAM's HBM with displacement) and, with the units it
    displaced, a bank group (in place). Returns {slot: index of the unit opened}."""
    num_units, page = config.units_per_slot, config.page_size
    free = [max(capacity[t] - n, 0) for t, n in enumerate(count_units_per_tier(s.unit_tier))]
    opened = {}
    new_units, demoted = [], []  # (slot, unit, tier, request id)
    for r in decoding:
        s.slot_context[r] += 1
        context = int(s.slot_context[r])
        if (context - 1) % page:
            continue  # the token joins the request's last unit
        u = (context - 1) // page
        i = int(s.slot_request[r])
        opened[r] = u
        if int(p.new_token_policy) == NEW_TOKEN_HBM_DISPLACE:
            tier = HBM
            if free[HBM] > 0:
                free[HBM] -= 1
            else:
                lower = DDR if free[DDR] > 0 else SSD
                if lower == DDR:
                    free[DDR] -= 1
                on_hbm = [c for c in range(num_units) if s.unit_tier[r, c] == HBM]
                if on_hbm:
                    victim = min(on_hbm, key=lambda c: (s.unit_importance[r, c], c))
                    s.unit_tier[r, victim] = lower
                    demoted.append((r, victim, lower, i))
                else:
                    tier = lower
        else:
            tier = next((t for t in (HBM, DDR) if free[t] > 0), SSD)
            if tier != SSD:
                free[tier] -= 1
        s.unit_tier[r, u] = tier
        s.unit_latent[r, u] = np.float32(_initial_latent(p, np.uint32(s.seed), i, u))
        new_units.append((r, u, tier, i))
    placements = new_units + demoted
    groups = _map_bank_groups(p, [(t, i, u) for _, u, t, i in placements], s.activation,
                              page)
    for (r, u, _, _), group in zip(placements, groups, strict=True):
        s.unit_bank_group[r, u] = group
    return opened


def attend(config: EngineConfig, p: SimParams, s: RefState, decoding: list[int],
           opened: dict[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Phase 3, the access model: latents drift, the selector picks units, the importance
    EMA absorbs the attention mass (in place). Returns (tokens [R, U], selected [R, U], the
    attention mass the selections cover)."""
    num_units, page = config.units_per_slot, config.page_size
    lam = float(p.ema_lambda)
    tokens = np.zeros((config.num_slots, num_units), np.int64)
    selected = np.zeros((config.num_slots, num_units), bool)
    selected_mass = 0.0
    for r in decoding:
        i = int(s.slot_request[r])
        context = int(s.slot_context[r])
        tokens[r] = tokens_per_unit(context, page, num_units)
        evolved = np.asarray(_evolve_latent(p, s.unit_latent[r], np.uint32(s.seed), i,
                                            np.arange(num_units), s.step), np.float32)
        for u in range(num_units):
            if tokens[r, u] > 0 and opened.get(r) != u:
                s.unit_latent[r, u] = evolved[u]
        logits_row = _row_logits(p, s.unit_latent[r], context, page)
        mass = _row_mass(logits_row, tokens[r])
        selected[r] = _select(logits_row, tokens[r], float(p.select_fraction))
        for u in range(num_units):
            if tokens[r, u] > 0:
                s.unit_importance[r, u] = lam * mass[u] + (1.0 - lam) * s.unit_importance[r, u]
                if selected[r, u]:
                    selected_mass += mass[u]
    return tokens, selected, selected_mass


def attention_load(config: EngineConfig, p: SimParams, s: RefState, decoding: list[int],
                   tokens: np.ndarray, selected: np.ndarray) -> _Load:
    """Phase 4, the attention load on the placement before scheduling, and the decode
    writes; the activation window records this step's selected units per bank group (in
    place)."""
    groups, page = config.padded_bank_groups, config.page_size
    zeros = [np.zeros(NUM_TIERS) for _ in range(7)]
    load = _Load(np.zeros((NUM_TIERS, groups), np.int64), None, *zeros)
    bg_units = np.zeros((NUM_TIERS, groups), np.int64)
    split = int(p.decode_split_tokens)
    for r in decoding:
        touched, chunks = set(), set()
        held = [0] * NUM_TIERS
        for u in range(config.units_per_slot):
            if tokens[r, u] == 0:
                continue
            tier, group = s.unit_tier[r, u], s.unit_bank_group[r, u]
            load.tier_tokens[tier] += tokens[r, u]
            held[tier] += tokens[r, u]
            if selected[r, u]:
                load.bank_group_tokens[tier, group] += tokens[r, u]
                bg_units[tier, group] += 1
                touched.add((tier, group))
                # FlashDecoding chunks of the unit's page (page_size positions from u x P).
                first, last = u * page // split, (u * page + page - 1) // split
                chunks.update((tier, c) for c in range(first, last + 1))
        target = max(math.ceil(float(p.select_fraction) * sum(held)), 1)
        for t in range(NUM_TIERS):
            on_t = sum(1 for tier, _ in touched if tier == t)
            load.active_bank_groups[t] += on_t
            load.tier_requests[t] += on_t > 0
            load.tier_holders[t] += held[t] > 0  # Q goes to every tier holding its KV
            load.topk_candidates[t] += min(held[t], target)
            if not bool(p.use_pamattention):
                load.active_chunks[t] += sum(1 for tier, _ in chunks if tier == t)
        # The decode token was written to the unit it landed in.
        last_unit = (int(s.slot_context[r]) - 1) // page
        load.decode_writes[s.unit_tier[r, last_unit]] += 1
    s.activation[s.step % config.window] = bg_units
    # Busiest bank group. Under the greedy and striped mappings a page's tokens stand for
    # tokens that would sit in page_size consecutive bank groups (cyclically within the
    # tier), so each of those gets an equal share; a sequential page stays in one group.
    load.bank_group_load = load.bank_group_tokens.astype(np.float64)
    if int(p.mapping_policy) != MAPPING_SEQUENTIAL and page > 1:
        load.bank_group_load = np.zeros_like(load.bank_group_load)
        for t in range(NUM_TIERS):
            count = int(p.bank_groups_per_device[t])
            for group in range(count):
                for j in range(page):
                    load.bank_group_load[t, (group + j) % count] += \
                        load.bank_group_tokens[t, group] / page
    return load


def migration(tier_before: np.ndarray, tier_after: np.ndarray, tokens: np.ndarray):
    """Phase 5 (after the swaps): tokens moved from tier i to tier j [T, T], units moved,
    units moved off the SSD (scheduler swaps and HBM displacements alike)."""
    migrated_tokens = np.zeros((NUM_TIERS, NUM_TIERS))
    migrated_units = migrated_from_ssd = 0
    rows, cols = tier_before.shape
    for r in range(rows):
        for u in range(cols):
            start, end = tier_before[r, u], tier_after[r, u]
            if start != NO_UNIT and end != start:
                migrated_tokens[start, end] += tokens[r, u]
                migrated_units += 1
                migrated_from_ssd += start == SSD
    return migrated_tokens, migrated_units, migrated_from_ssd


def step_cost_of(p: SimParams, s: RefState, decoding: list[int], load: _Load,
                 prefill: _Prefill, migrated_tokens: np.ndarray):
    """Phase 6, cost: the step's counts through pamjax.costs.step_cost, in float64."""
    counts = StepCounts(
        decode_requests=np.float64(len(decoding)),
        decode_context=np.float64(sum(int(s.slot_context[r]) for r in decoding)),
        tier_tokens=load.tier_tokens,
        tier_selected=load.bank_group_tokens.sum(axis=1).astype(np.float64),
        tier_busiest_bank_group=load.bank_group_load.max(axis=1),
        tier_requests=load.tier_requests,
        tier_holders=load.tier_holders,
        tier_active_bank_groups=load.active_bank_groups,
        tier_active_chunks=load.active_chunks,
        tier_topk_candidates=load.topk_candidates,
        tier_decode_writes=load.decode_writes,
        prefill_tokens=np.float64(prefill.tokens),
        prefill_pairs=np.float64(prefill.pairs),
        prefill_tier_tokens=prefill.tier_tokens,
        migrated_tokens=migrated_tokens,
        sparse=np.float64(float(p.select_fraction) < 1.0),
    )
    with jax.enable_x64(True):
        return jax.tree.map(lambda v: np.asarray(v, np.float64), _step_cost(p, counts))


def complete(config: EngineConfig, s: RefState, start: RefState, requests: _Requests,
             decoding: list[int], prefill: _Prefill, rejected: list[int], step_time: float,
             busy: bool) -> tuple[float, float]:
    """Phase 7, completion: the clock (an idle step jumps to the next arrival), request
    events, finished requests free their slot and KV (in place). Returns (step time, idle
    jump) in seconds."""
    now = start.clock_s
    s.clock_s = now + step_time
    idle = 0.0
    taken = len(prefill.slots) + len(rejected)
    if not busy and start.next_request + taken < len(requests.arrival):
        s.clock_s = max(now, float(requests.arrival[start.next_request]))  # next arrival
        idle = s.clock_s - now
    end = s.clock_s
    for r in decoding:
        s.slot_generated[r] += 1
    for i, _ in prefill.slots:
        s.req_first_token_s[i] = end
    for i in rejected:
        s.req_status[i] = STATUS_REJECTED
    for r in range(config.num_slots):
        i = int(s.slot_request[r])
        if i >= 0 and s.slot_generated[r] >= requests.output[i]:
            s.req_status[i] = STATUS_FINISHED
            s.req_finish_s[i] = end
            s.slot_request[r] = -1
            s.slot_generated[r] = s.slot_context[r] = 0
            s.unit_tier[r] = NO_UNIT
            s.unit_bank_group[r] = 0
            s.unit_latent[r] = 0.0
            s.unit_importance[r] = 0.0
    s.step += 1
    s.next_request += taken
    return step_time, idle


def reference_rollout(config: EngineConfig, params: SimParams, workload, num_steps: int,
                      seed: int = 0):
    """Run ``num_steps`` reference steps from :func:`reference_init`.

    Args:
      config, params, workload: as for :func:`reference_step`.
      num_steps: steps to take.
      seed: access-model seed.

    Returns:
      (final RefState, list of the RefMetrics of every step).
    """
    state = reference_init(config, seed)
    history = []
    for _ in range(num_steps):
        state, metrics = reference_step(config, params, state, workload)
        history.append(metrics)
    return state, history
