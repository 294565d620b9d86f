"""Engine data types: static shape config, the numeric parameter pytree, state and metrics.

Shapes use R = request slots (the largest batch), U = KV units per slot (a KV unit is a
page of ``page_size`` consecutive tokens; page_size 1 is token granularity), T = 3 tiers in
:data:`TIER_NAMES` order, G = bank groups per device (padded to the largest tier's count),
W = activation window (decode steps), N = requests in the workload, C = energy components.

Everything in :class:`SimParams` is a JAX array, so ``jax.vmap`` over a stacked params pytree
sweeps systems, batch sizes and hardware design points with one compilation. Everything that
fixes an array shape lives in :class:`EngineConfig` and is static.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import struct

from pamjax.errors import ConfigError

TIER_NAMES = ("hbm", "ddr", "ssd")
"""Tier order used by every [T] array in pamjax: index 0 is the fastest tier."""
HBM, DDR, SSD = 0, 1, 2
"""Tier indices (positions in :data:`TIER_NAMES`)."""
NUM_TIERS = len(TIER_NAMES)
NO_UNIT = -1
"""``unit_tier`` of a KV unit that does not exist."""

ENERGY_COMPONENTS = (
    "gpu_compute",  # FC layers, prefill and (GPU-side) attention arithmetic
    "gpu_memory",  # weights and GPU-side KV read from HBM by the GPUs
    "pim_attention",  # KV and label reads inside PIM devices plus PU arithmetic
    "reduction",  # intra-device partial-result traffic to the reduction units
    "transfer",  # Q, partials, top-k scores, KV writes, offloaded KV, all-reduces
    "migration",  # tokens moved between tiers by the scheduler or by displacement
    "static",  # the platform's idle power over the simulated time
)

PLACEMENT_FASTEST_FIRST = 0  # fill the fastest enabled tier, then the next (baselines)
PLACEMENT_IMPORTANCE_RATIO = 1  # PAM: most important units first, to the x:y:1 ratio

NEW_TOKEN_FASTEST_FREE = 0  # the fastest enabled tier with room (baselines)
NEW_TOKEN_HBM_DISPLACE = 1  # PAM: HBM, displacing the request's least important HBM unit

MAPPING_GREEDY = 0  # PAM: new units to the least-activated bank groups over the window
MAPPING_STRIPED = 1  # AttAcc's layout: consecutive tokens on consecutive bank groups
MAPPING_SEQUENTIAL = 2  # runs of naive_run_units units per bank group (a naive fill)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes of a simulation (each distinct value compiles once).

    Fields:
      num_slots: R, request slots; the largest batch any params in a vmap may use.
      units_per_slot: U, KV units per slot; ceil(max context / page_size).
      page_size: tokens per KV unit (1 = token granularity).
      num_requests: N, requests in the workload arrays.
      padded_bank_groups: G, bank groups per device, padded to the largest tier's count
        (SimParams.bank_groups_per_device has each tier's own count).
      window: W, decode steps of bank-group activation history (PAM: 10).
      max_swaps: static bound on the per-request swap budget of each scheduling phase.
      admit_window: requests considered for admission per step (FCFS look-ahead).
      bisection_iters: iterations of the per-request threshold searches.
      recorded_steps: rows of recorded scores (0 = synthetic access model).
      placement_score: None (PAM ranks units by their importance factor) or a learned
        placement policy (policy.net_engine_hook): a callable ``f(params.policy,
        importance, selected, context, unit_tier, present, view) -> f32 [R, U]`` log-scale
        correction c, ``view`` a :class:`LifetimeView` of the same rows. The online
        scheduler ranks and balances ``importance x exp(c)`` (placement.corrected_key) and
        admission ranks prompt units by log prefill mass + c (called with the prefill mass,
        nothing selected and unit_tier -1); c = 0 is the PAM rule exactly. Static, so it
        must hash stably. Only with a score set does the engine build views and keep
        ``EngineState.migrated_tokens`` (the cost stays off every other system).
      skip_idle: leave out work that cannot change anything: the per-request phases
        (access model, attention load, PAM's scheduler) run on the decoding rows only
        (active_rows.py) and prompt placement only in steps that admit a request. The
        schedules and the clock are the same; float32 state may differ in its last bit
        (active_rows.py, tests/test_active_rows.py). Off under vmap, where
        a switch or cond on a batched value runs every branch (engine.vmapped).
      narrow_units: with ``skip_idle``, the decoding rows whose units fit in this many
        columns run the per-request phases on those columns alone, the others on all U
        (active_rows.Columns); 0 = off (simulation.narrow_units picks it for a workload).
        No schedule changes; float32 sums over the unit axis may differ in the last bit.
    """

    num_slots: int
    units_per_slot: int
    page_size: int = 1
    num_requests: int = 1
    padded_bank_groups: int = 256
    window: int = 10
    max_swaps: int = 8
    admit_window: int = 64
    bisection_iters: int = 20
    recorded_steps: int = 0
    placement_score: object = None
    skip_idle: bool = True
    narrow_units: int = 0

    def __post_init__(self):
        if self.placement_score is not None and not callable(self.placement_score):
            raise ConfigError("engine.placement_score", self.placement_score,
                              "must be None or a callable")
        for f in dataclasses.fields(self):
            if f.name == "placement_score":
                continue
            if f.name == "skip_idle":
                if not isinstance(self.skip_idle, bool):
                    raise ConfigError("engine.skip_idle", self.skip_idle,
                                      "must be True or False")
                continue
            value = getattr(self, f.name)
            minimum = 0 if f.name in ("recorded_steps", "narrow_units") else 1
            if not isinstance(value, int) or value < minimum:
                raise ConfigError(f"engine.{f.name}", value, f"must be an integer >= {minimum}")


@struct.dataclass
class SimParams:
    """Numeric parameters of one simulated configuration (vmappable pytree).

    Policy (see systems.py for the systems):
      attention_on_pim: bool [], attention runs in PIM tiers (else on the GPUs, offloaded KV
        fetched over PCIe).
      select_fraction: f32 [], fraction of each request's tokens attended per step (1 = dense).
      placement_policy, new_token_policy: i32 [], PLACEMENT_* / NEW_TOKEN_* codes.
      tier_enabled: bool [T], tiers that may hold KV.
      swap_budget: i32 [], tokens each request may move per scheduling phase per step (0 =
        no online scheduling); a page moves once the request's allowance covers it, so the
        moved volume does not depend on the page size.
      target_x, target_y: f32 [], PAM importance target IS_HBM:IS_DDR:IS_SSD = x:y:1.
      ema_lambda: f32 [], importance EMA weight of the current score (PAM: 0.6).
      use_pamattention: bool [], PAMattention: one partial per request, layer and head
        leaves each tier and partials merge across tiers on the HBM side; else a fixed
        FlashDecoding split (``decode_split_tokens``) ignores device boundaries and one
        partial per split chunk with attended tokens on a tier leaves it for central
        reduction.
      decode_split_tokens: i32 [], tokens per FlashDecoding chunk without PAMattention.
      mapping_policy: i32 [], MAPPING_* code (intra-device bank-group mapping).
      naive_run_units: i32 [], consecutive units sharing a bank group under MAPPING_SEQUENTIAL.
      migration_slowdown: f32 [], 1 for the PAM interface, 20 for a CPU-side re-layout.
      max_batch: i32 [], concurrent requests allowed (<= num_slots).
      prefill_token_budget: i32 [], prompt tokens prefilled per step at most (vLLM's
        max_num_batched_tokens); a longer single prompt is still admitted alone.
    Access model (locality.py): sigma, persistence, sink_tokens, sink_bonus, recency_bonus,
      recency_tokens, all f32 [].
    Tiers, [T]: capacity_units i32 (KV units the tier may hold); f32: bank_groups_per_device
      (bank groups, or SSD channels, per device), device_rate (effective PIM attention KV
      bytes/s per device: min(internal / passes, compute cap x w / (2 g)), hardware.py),
      bank_group_rate (one bank group's own KV bytes/s), device_internal_rate (bytes/s one
      device reads or writes at the tier's kv_run_bytes, for migration and KV writes), read_passes (reads
      of each KV byte per query group), num_devices, link_rate (bytes/s of the tier's device
      interfaces together, per direction), behind_pcie (1 when the tier's path crosses the
      GPUs' PCIe), link_latency (s), pim_read_pj and host_read_pj (pJ/bit).
    GPU, f32 []: num_gpus, tp, pp, gpu_flops (achievable FLOP/s per GPU), gpu_mem_rate
      (achievable HBM bytes/s per GPU), nvlink_rate (bytes/s per GPU, pipeline hand-offs),
      collective_rate and collective_latency (tensor-parallel all-reduce: NVLink inside a
      node, RDMA across nodes), pcie_rate (bytes/s per GPU, per direction),
      gpu_link_latency (s), kernel_overhead (s per layer).
    Model, f32 []: layers, q_heads, kv_heads, head_dim, hidden, kv_bytes_per_token,
      fc_flops_per_token (active parameters only for MoE), streamed_weight_bytes (every
      weight, every expert), routed_weight_bytes (the routed experts' share of it, 0 when
      dense), expert_route_fraction (k / E: a token's share of a layer's routed experts).
    Energy, f32 []: gpu_pj_per_flop (pJ/FLOP), gpu_hbm_read_pj, bank_group_read_pj,
      nvlink_pj, pcie_pj (pJ/bit), pim_pu_factor (dimensionless), static_power_w (W, the
      platform's idle power, charged for every simulated second).
    policy: None, or the parameter pytree of a learned placement scorer that
      ``EngineConfig.placement_score`` applies (policy.py).
    """

    attention_on_pim: jnp.ndarray
    select_fraction: jnp.ndarray
    placement_policy: jnp.ndarray
    new_token_policy: jnp.ndarray
    tier_enabled: jnp.ndarray
    swap_budget: jnp.ndarray
    target_x: jnp.ndarray
    target_y: jnp.ndarray
    ema_lambda: jnp.ndarray
    use_pamattention: jnp.ndarray
    decode_split_tokens: jnp.ndarray
    mapping_policy: jnp.ndarray
    naive_run_units: jnp.ndarray
    migration_slowdown: jnp.ndarray
    max_batch: jnp.ndarray
    prefill_token_budget: jnp.ndarray
    sigma: jnp.ndarray
    persistence: jnp.ndarray
    sink_tokens: jnp.ndarray
    sink_bonus: jnp.ndarray
    recency_bonus: jnp.ndarray
    recency_tokens: jnp.ndarray
    capacity_units: jnp.ndarray
    bank_groups_per_device: jnp.ndarray
    device_rate: jnp.ndarray
    bank_group_rate: jnp.ndarray
    device_internal_rate: jnp.ndarray
    read_passes: jnp.ndarray
    num_devices: jnp.ndarray
    link_rate: jnp.ndarray
    behind_pcie: jnp.ndarray
    link_latency: jnp.ndarray
    pim_read_pj: jnp.ndarray
    host_read_pj: jnp.ndarray
    num_gpus: jnp.ndarray
    tp: jnp.ndarray
    pp: jnp.ndarray
    gpu_flops: jnp.ndarray
    gpu_mem_rate: jnp.ndarray
    nvlink_rate: jnp.ndarray
    collective_rate: jnp.ndarray
    collective_latency: jnp.ndarray
    pcie_rate: jnp.ndarray
    gpu_link_latency: jnp.ndarray
    kernel_overhead: jnp.ndarray
    layers: jnp.ndarray
    q_heads: jnp.ndarray
    kv_heads: jnp.ndarray
    head_dim: jnp.ndarray
    hidden: jnp.ndarray
    kv_bytes_per_token: jnp.ndarray
    fc_flops_per_token: jnp.ndarray
    streamed_weight_bytes: jnp.ndarray
    routed_weight_bytes: jnp.ndarray
    expert_route_fraction: jnp.ndarray
    gpu_pj_per_flop: jnp.ndarray
    gpu_hbm_read_pj: jnp.ndarray
    bank_group_read_pj: jnp.ndarray
    nvlink_pj: jnp.ndarray
    pcie_pj: jnp.ndarray
    pim_pu_factor: jnp.ndarray
    static_power_w: jnp.ndarray
    policy: object = None


@struct.dataclass
class LifetimeView:
    """What a learned placement score (``EngineConfig.placement_score``) is told about the
    requests whose units it scores and about the system, beyond the units themselves.

    Only quantities the serving system knows at that point, never a request's true output
    length (the policy predicts its remaining length from the prompt, learn/policy.py).

    prompt i32 [R]: prompt tokens of each request (row).
    generated i32 [R]: output tokens it has produced so far (0 at a fresh admission).
    occupancy f32 [T]: units held on each tier / the tier's capacity (0 for a tier the
      system does not use).
    link_load_s f32 []: the previous step's migration on its busiest link, s
      (costs.migration_link_s; 0 before the first step).
    """

    prompt: jnp.ndarray
    generated: jnp.ndarray
    occupancy: jnp.ndarray
    link_load_s: jnp.ndarray


@struct.dataclass
class DeviceWorkload:
    """Device-side request arrays (sorted by arrival), each [N].

    Fields: arrival_s f32 (s), prompt_tokens i32, output_tokens i32, generated_tokens i32
    (output tokens an in-flight request had produced before t = 0; 0 = fresh; see
    workload.Workload).
    """

    arrival_s: jnp.ndarray
    prompt_tokens: jnp.ndarray
    output_tokens: jnp.ndarray
    generated_tokens: jnp.ndarray


STATUS_WAITING, STATUS_RUNNING, STATUS_FINISHED, STATUS_REJECTED = 0, 1, 2, 3


@struct.dataclass
class BatchState:
    """What continuous batching tracks (batching.py), shared by the engine and the leap.

    Slots [R]: slot_request i32 (workload index, -1 = free), slot_generated i32 (output
      tokens produced so far), slot_context i32 (tokens in the KV cache).
    Clock: clock_whole f32 (integer seconds), clock_frac f32 (in [0, 1) s); split so that
      hour-long runs keep sub-microsecond resolution in float32.
    step i32 []: steps taken; next_request i32 []: FCFS pointer into the workload.
    Requests [N]: req_status i8 (STATUS_*), req_first_token_s f32, req_finish_s f32.
    overflow bool []: a request needed more units than a slot holds (rerun with larger U).
    """

    slot_request: jnp.ndarray
    slot_generated: jnp.ndarray
    slot_context: jnp.ndarray
    clock_whole: jnp.ndarray
    clock_frac: jnp.ndarray
    step: jnp.ndarray
    next_request: jnp.ndarray
    req_status: jnp.ndarray
    req_first_token_s: jnp.ndarray
    req_finish_s: jnp.ndarray
    overflow: jnp.ndarray


@struct.dataclass
class EngineState(BatchState):
    """The whole serving system at a decode-step boundary: the BatchState fields, and

    Units [R, U]: unit_tier i8 (-1 = no unit), unit_bank_group i16, unit_latent f32
      (access-model log-importance), unit_importance f32 (PAM importance EMA I),
      unit_selected bool (attended at the previous step).
    activation i32 [W, T, G]: selected units per bank group over the last W decode steps.
    seed u32 []: access-model seed.
    migrated_tokens i32 [T, T]: tokens the previous step moved from tier i to tier j (the
      link load a learned placement score sees, LifetimeView); None unless
      ``EngineConfig.placement_score`` is set, so no other system carries it.
    """

    unit_tier: jnp.ndarray
    unit_bank_group: jnp.ndarray
    unit_latent: jnp.ndarray
    unit_importance: jnp.ndarray
    unit_selected: jnp.ndarray
    activation: jnp.ndarray
    seed: jnp.ndarray
    migrated_tokens: object = None


@struct.dataclass
class StepMetrics:
    """What one step reports (stacked over steps by the rollout).

    step_time_s f32 []: wall time the step takes on the simulated hardware (0 when idle and
      the clock jumps to the next arrival; idle_s holds that jump).
    decode_requests i32 []: requests that generated a token by decode this step.
    decode_context i32 []: their context lengths summed (tokens in their KV after the step's
      token), so decode_context / decode_requests is the mean context attended.
    prefill_requests i32 []: requests admitted and prefilled this step.
    output_tokens i32 []: tokens produced (decode + first tokens from prefill).
    tier_units i32 [T]: KV units held per tier after the step.
    attention_s f32 []: attention time on the step's critical path (tiers in parallel for
      PIM attention; fetch then compute for GPU attention).
    tier_attention_s f32 [T]: attention time per tier this step.
    selected_units i32 [], persisted_units i32 [], previously_selected_units i32 []: units
      attended this step, those of them also attended at the previous step, and the units
      of decoding requests attended at the previous step (persistence = ratio of the last
      two; a context-locality statistic).
    selected_mass f32 []: sum over decode requests of the attention mass their selection
      covers (divide by decode_requests for the mean share).
    migrated_units i32 [] and migrated_from_ssd i32 []: units moved between tiers.
    energy_pj f32 [C]: energy per component, pJ.
    rejected i32 []: requests rejected this step because they can never fit.
    """

    step_time_s: jnp.ndarray
    idle_s: jnp.ndarray
    decode_requests: jnp.ndarray
    decode_context: jnp.ndarray
    prefill_requests: jnp.ndarray
    output_tokens: jnp.ndarray
    tier_units: jnp.ndarray
    attention_s: jnp.ndarray
    tier_attention_s: jnp.ndarray
    selected_units: jnp.ndarray
    persisted_units: jnp.ndarray
    previously_selected_units: jnp.ndarray
    selected_mass: jnp.ndarray
    migrated_units: jnp.ndarray
    migrated_from_ssd: jnp.ndarray
    energy_pj: jnp.ndarray
    rejected: jnp.ndarray
