"""The systems PAM is compared with (PAM_SPEC §7), as parameter sets of one engine.

What is hardware is the same for every system that has it (PAM_SPEC §7, revised): every PIM
device reduces the partials of its bank groups with its own reduction units, and a baseline's
KV is striped over bank groups the way AttAcc lays it out. A baseline lacks only what is
PAM's: PAMattention (the exact per-device partial softmax merged across tiers), the
activation-aware mapping, the importance placement and the online scheduling.

* ``vllm-offload``: GPU only. PagedAttention/FlashDecoding on the GPUs over the whole context
  (dense). KV fills GPU HBM first, then is offloaded to host DDR, then SSD, and offloaded KV
  is fetched over PCIe every time it is attended. No migration.
* ``attacc``: GPU + HBM-PIM. FC layers on the GPUs, dense attention in HBM-PIM. KV lives in
  HBM only, so the batch is capacity-bound: a request that would not fit waits, and a batch
  whose KV exceeds HBM (net of weights and the activation reserve) is out of memory.
* ``l-pim``: layered PIM in HBM, DDR and SSD; KV fills the fastest tier first; dense attention
  in every tier; no PAMattention, no PAM KV management. While all KV fits HBM it is AttAcc.
* ``ls-pim``: l-pim plus the same retrieval sparsity as PAM (1/8 of the tokens per step),
  static placement.
* ``pam``: sparsity, locality-aware importance-ratio placement at prefill, new tokens to HBM,
  PAMattention, greedy least-activated bank-group mapping, and online x:y:1 scheduling
  through the PAM interface.
* Ablations: ``pam-no-pamattention`` (a fixed FlashDecoding split, central reduction),
  ``pam-no-mapping`` (the baselines' striping), ``pam-no-scheduling`` (swap budget 0; the
  prefill placement is kept).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pamjax.costs import StepCounts, step_cost
from pamjax.errors import CapacityError, ConfigError, UnknownNameError
from pamjax.hardware import TIER_NAMES, Platform, get_platform, query_passes
from pamjax.locality import AccessModel, logits
from pamjax.models import Model, get_model
from pamjax.types import (
    MAPPING_GREEDY,
    MAPPING_SEQUENTIAL,
    MAPPING_STRIPED,
    NEW_TOKEN_FASTEST_FREE,
    NEW_TOKEN_HBM_DISPLACE,
    PLACEMENT_FASTEST_FIRST,
    PLACEMENT_IMPORTANCE_RATIO,
    SimParams,
)

MAPPINGS = {"greedy": MAPPING_GREEDY, "striped": MAPPING_STRIPED,
            "sequential": MAPPING_SEQUENTIAL}
"""Intra-device mapping policies by name (types.MAPPING_*)."""


@dataclasses.dataclass(frozen=True)
class System:
    """Policy of one system; hardware and model come separately.

    Fields:
      name: system name.
      attention_on_pim: attention in the PIM tiers (False: on the GPUs).
      sparse: retrieval sparsity (select_fraction of the access model) vs dense.
      placement_policy, new_token_policy: PLACEMENT_* / NEW_TOKEN_* codes (types.py).
      tiers: names of the tiers that may hold KV.
      swap_budget: tokens each request may move per scheduling phase per step (0 = no
        online scheduling) [D].
      use_pamattention: PAMattention's per-device partial softmax and cross-tier merge
        (else a fixed FlashDecoding split with central reduction).
      mapping: intra-device mapping, a key of MAPPINGS: ``greedy`` (PAM, least activated),
        ``striped`` (AttAcc's layout), ``sequential`` (runs of Knobs.naive_run_tokens).
      migration_slowdown: 1 = PAM interface; 20 = CPU-side re-layout (PAM_SPEC §5 [D]).
    """

    name: str
    attention_on_pim: bool
    sparse: bool
    placement_policy: int
    new_token_policy: int
    tiers: tuple[str, ...] = ("hbm", "ddr", "ssd")
    swap_budget: int = 0
    use_pamattention: bool = False
    mapping: str = "striped"
    migration_slowdown: float = 20.0

    def __post_init__(self):
        if self.mapping not in MAPPINGS:
            raise UnknownNameError("mapping", self.mapping, MAPPINGS)
        for name in self.tiers:
            if name not in TIER_NAMES:
                raise UnknownNameError("tier", name, TIER_NAMES)
        if not isinstance(self.swap_budget, int) or self.swap_budget < 0:
            raise ConfigError(f"{self.name}.swap_budget", self.swap_budget,
                              "must be an integer >= 0 (tokens per request per phase)")


_PAM = System("pam", attention_on_pim=True, sparse=True,
              placement_policy=PLACEMENT_IMPORTANCE_RATIO,
              new_token_policy=NEW_TOKEN_HBM_DISPLACE, swap_budget=8,
              use_pamattention=True, mapping="greedy", migration_slowdown=1.0)
_LAYERED = System("l-pim", attention_on_pim=True, sparse=False,
                  placement_policy=PLACEMENT_FASTEST_FIRST,
                  new_token_policy=NEW_TOKEN_FASTEST_FREE)

SYSTEMS = {
    "vllm-offload": System("vllm-offload", attention_on_pim=False, sparse=False,
                           placement_policy=PLACEMENT_FASTEST_FIRST,
                           new_token_policy=NEW_TOKEN_FASTEST_FREE),
    "attacc": dataclasses.replace(_LAYERED, name="attacc", tiers=("hbm",)),
    "l-pim": _LAYERED,
    "ls-pim": dataclasses.replace(_LAYERED, name="ls-pim", sparse=True),
    "pam": _PAM,
    "pam-no-pamattention": dataclasses.replace(_PAM, name="pam-no-pamattention",
                                               use_pamattention=False),
    "pam-no-mapping": dataclasses.replace(_PAM, name="pam-no-mapping", mapping="striped"),
    "pam-no-scheduling": dataclasses.replace(_PAM, name="pam-no-scheduling", swap_budget=0),
}
"""Systems and ablations by name."""

MAIN_SYSTEMS = ("vllm-offload", "attacc", "l-pim", "ls-pim", "pam")


def get_system(name: str) -> System:
    """The System called ``name`` (a key of SYSTEMS); UnknownNameError otherwise."""
    if name not in SYSTEMS:
        raise UnknownNameError("system", name, SYSTEMS)
    return SYSTEMS[name]


TARGET_RULES = ("equal-time", "equal-time-oracle", "throughput")


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Modelling choices that are neither hardware nor system policy ([D], overridable).

    Fields:
      naive_run_tokens: consecutive tokens sharing a bank group under the sequential mapping.
      decode_split_tokens: tokens per FlashDecoding chunk without PAMattention ([E] vLLM's
        PagedAttention v2 partition size, 512).
      target_x, target_y: PAM's x:y:1 target; None = derived by ``target_rule``.
      target_rule: ``"equal-time"`` (default): x, y chosen once per (platform, model) so that
        the tiers' attention times are equal at a reference operating point (requests of
        ``calibration_context`` tokens, as many as fill the HBM tier), counting everything a
        tier costs per step (calibrate_targets), then held fixed for every workload, batch
        and SLO, as the publication does (PAM_SPEC §5 revised); ``"equal-time-oracle"``: the
        same calibration at each configuration's own batch (an oracle the publication does
        not have, for comparison only); ``"throughput"``: x, y = the tiers' effective PIM
        throughput ratios (the literal reading, which ignores labels and transfers).
      calibration_context: tokens of the reference request of the equal-time rules.
      prefill_token_budget: prompt tokens prefilled per step at most ([D] 8192, a common
        vLLM max_num_batched_tokens).
    """

    naive_run_tokens: int = 64
    decode_split_tokens: int = 512
    target_x: float | None = None
    target_y: float | None = None
    target_rule: str = "equal-time"
    calibration_context: int = 2048
    prefill_token_budget: int = 8192

    def __post_init__(self):
        if self.target_rule not in TARGET_RULES:
            raise UnknownNameError("target rule", self.target_rule, TARGET_RULES)
        for field in ("prefill_token_budget", "naive_run_tokens", "decode_split_tokens",
                      "calibration_context"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"knobs.{field}", value, "must be an integer >= 1")
        for field in ("target_x", "target_y"):
            value = getattr(self, field)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"knobs.{field}", value, "must be a finite number > 0")


def calibrate_targets(params: SimParams, access: AccessModel, *, context: int, batch: int,
                      seed: int = 0, grid: int = 128, max_ratio: float = 1e12
                      ) -> tuple[float, float]:
    """PAM's x:y:1 target: the split of a reference request over the tiers that makes their
    attention times equal, counting everything each tier costs per step.

    One request of ``context`` tokens is drawn from the access model (importance = attention
    mass, :func:`pamjax.locality.logits`) and its tokens ranked by importance; the selector
    attends the top ``select_fraction``. For every split of the ranking (HBM gets the top
    ``a`` tokens, DDR the next ``b``, SSD the rest) ``batch`` such requests make the counts
    of one decode step, and :func:`pamjax.costs.step_cost` (the engine's own cost model:
    attended KV and selection labels at each tier's GQA rate, Q broadcast, partials and
    top-k scores over each tier's real path, decode writes, per-layer round trips) gives its
    attention time. The split with the smallest attention time (the slowest tier's, which
    equalises the tiers it uses) sets x and y as its importance ratios. A tier the best
    split leaves empty gets no share: when the SSD is empty x is ``max_ratio`` and y is
    ``max_ratio x IS_DDR / IS_HBM`` (0 when DDR is empty too).
    Capacity is ignored here: placement spills downwards at run time when a tier is full.

    Args:
      params: SimParams of the system on its platform and model (targets ignored).
      access: AccessModel (the reference request's importance and selection).
      context: tokens of the reference request; batch: requests per step.
      seed: access-model draw; grid: candidate split points per tier.
      max_ratio: x when the best split leaves the SSD no token (y is then max_ratio x
        IS_DDR / IS_HBM).

    Returns:
      (x, y) floats.
    """
    rng = np.random.default_rng(seed)
    latent = access.sigma * rng.standard_normal(context)
    logit = logits(access, latent[None, :], np.array([context]), 1, xp=np)[0]
    mass = np.exp(logit - logit.max())
    mass = np.sort(mass / mass.sum())[::-1]
    cum = np.concatenate([[0.0], np.cumsum(mass)])
    selected = max(1, int(np.ceil(access.select_fraction * context))) \
        if float(params.select_fraction) < 1.0 else context
    cuts = np.unique(np.linspace(0, context, grid + 1).round().astype(int))
    a, b = (x.ravel() for x in np.meshgrid(cuts, cuts, indexing="ij"))
    keep = a + b <= context
    a, b = a[keep], b[keep]
    held = np.stack([a, b, context - a - b], -1).astype(np.float64)  # [K, T] tokens
    sel_h = np.minimum(a, selected)
    sel_d = np.clip(selected - a, 0, b)
    attended = np.stack([sel_h, sel_d, selected - sel_h - sel_d], -1).astype(np.float64)
    times = _split_attention_s(params, held, attended, float(batch), float(selected))
    best = int(np.argmin(times))
    best_a, best_b = int(a[best]), int(b[best])
    is_h = cum[best_a]
    is_d = cum[best_a + best_b] - is_h
    if best_a + best_b >= context:  # the SSD holds nothing
        return max_ratio, max_ratio * is_d / max(is_h, 1e-30)
    is_s = 1.0 - is_h - is_d
    return float(is_h / is_s), float(is_d / is_s)


# One jitted program for every calibration (a sensitivity study calibrates hundreds of
# perturbed platforms; a fresh jax.jit per call would retrace and recompile each time).
_split_step_cost = jax.jit(jax.vmap(step_cost, in_axes=(None, 0)))


def _split_attention_s(params, held, attended, batch: float, topk: float) -> np.ndarray:
    """Attention time (s) of one decode step of ``batch`` identical requests for each split
    (held, attended: [K, T] tokens per request), by costs.step_cost in float64. Bank
    groups are balanced (PAM's greedy mapping), every new token lands in HBM."""
    groups = np.asarray(params.bank_groups_per_device, np.float64)
    split = float(params.decode_split_tokens)
    uses = (held > 0).astype(np.float64)
    counts = StepCounts(
        decode_requests=np.full(len(held), batch),
        decode_context=batch * held.sum(-1),
        tier_tokens=batch * held,
        tier_selected=batch * attended,
        tier_busiest_bank_group=batch * attended / groups,
        tier_requests=batch * (attended > 0),
        tier_holders=batch * uses,
        tier_active_bank_groups=batch * np.minimum(attended, groups),
        tier_active_chunks=batch * np.minimum(np.ceil(held / split), attended),
        tier_topk_candidates=batch * np.minimum(held, topk),
        tier_decode_writes=np.broadcast_to([batch, 0.0, 0.0], held.shape),
        prefill_tokens=np.zeros(len(held)), prefill_pairs=np.zeros(len(held)),
        prefill_tier_tokens=np.zeros_like(held),
        migrated_tokens=np.zeros(held.shape + (3,)),
        sparse=np.full(len(held), float(float(params.select_fraction) < 1.0)),
    )
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64)
                           if jnp.asarray(v).dtype.kind == "f" else jnp.asarray(v), params)
        cost = _split_step_cost(p64, counts)
        return np.asarray(cost.attention_s, np.float64)


def pam_targets(params: SimParams, platform: Platform, model: Model, access: AccessModel,
                knobs: Knobs, batch: int) -> tuple[float, float]:
    """PAM's (x, y) for a configuration: explicit knobs, else the target rule.

    Args:
      params: SimParams of the system (targets ignored); platform, model, access, knobs:
        what it was built from; batch: the configuration's batch (the oracle rule only).

    Returns:
      (x, y).
    """
    if knobs.target_rule == "throughput":
        eff = [t.effective_gbps(model) for t in platform.tiers]
        x, y = eff[0] / eff[2], eff[1] / eff[2]
    else:
        context = knobs.calibration_context
        if knobs.target_rule == "equal-time":
            batch = reference_batch(platform, model, context)
        x, y = _targets_cached(params, access, context, int(batch))
    return (knobs.target_x if knobs.target_x is not None else x,
            knobs.target_y if knobs.target_y is not None else y)


def reference_batch(platform: Platform, model: Model, context: int) -> int:
    """Requests of ``context`` tokens whose KV fills the HBM tier: the reference operating
    point of the equal-time target rule (where the hierarchy starts to matter)."""
    hbm_tokens = tier_kv_capacity_bytes(platform, model)[0] / model.kv_bytes_per_token
    return max(1, int(hbm_tokens // context))


_TARGET_CACHE: dict = {}


def _targets_cached(params: SimParams, access: AccessModel, context: int, batch: int):
    # Calibration runs a vmapped cost model over ~8K splits; a sweep asks for the same
    # (params, access, context, batch) many times.
    key = (tuple(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(params)), access,
           context, batch)
    if key not in _TARGET_CACHE:
        _TARGET_CACHE[key] = calibrate_targets(params, access, context=context, batch=batch)
    return _TARGET_CACHE[key]


def hbm_kv_bytes(platform: Platform, model: Model) -> float:
    """HBM bytes left for KV: HBM x (1 - activation reserve) - weights (PAM_SPEC §2 [D]).

    Args:
      platform: hardware; model: its weight bytes count against HBM.

    Returns:
      bytes (negative when the weights do not fit).
    """
    hbm = platform.hbm.capacity_gb * 1e9
    return hbm * (1.0 - platform.gpu.activation_reserve) - model.weight_bytes


def tier_kv_capacity_bytes(platform: Platform, model: Model) -> np.ndarray:
    """KV bytes each tier can hold, f64 [3] in TIER_NAMES order (HBM net of weights).

    Raises:
      CapacityError: the model's weights do not fit HBM with the activation reserve.
    """
    hbm = hbm_kv_bytes(platform, model)
    if hbm <= 0:
        raise CapacityError(
            f"model {model.name} ({model.weight_bytes / 1e9:.0f} GB of weights) does not fit "
            f"{platform.hbm.capacity_gb:.0f} GB of HBM with a "
            f"{platform.gpu.activation_reserve:.0%} activation reserve")
    return np.array([hbm, platform.ddr.capacity_gb * 1e9, platform.ssd.capacity_gb * 1e9])


def kv_capacity_tokens(system: System | str, model: Model | str,
                       platform: Platform | None = None) -> float:
    """KV tokens the system's enabled tiers hold together (the most one request can use).

    Raises:
      UnknownNameError: unknown system or model. CapacityError: the weights do not fit HBM.
    """
    system = get_system(system) if isinstance(system, str) else system
    model = get_model(model) if isinstance(model, str) else model
    platform = platform or get_platform()
    capacity = tier_kv_capacity_bytes(platform, model)
    enabled = [name in system.tiers for name in TIER_NAMES]
    return float(capacity[enabled].sum() / model.kv_bytes_per_token)


def require_a_fitting_request(system: System | str, model: Model | str, workload,
                               platform: Platform | None = None) -> None:
    """Refuse a workload none of whose requests can ever fit the system's KV tiers (the
    engine would reject every one of them, after compiling a whole simulation).

    Args:
      system, model: names or objects; workload: a host Workload (prompt_tokens and
        output_tokens int [N], name); platform: hardware (default the preset).

    Raises:
      CapacityError: naming the workload, the smallest request's KV tokens and the capacity.
    """
    capacity = kv_capacity_tokens(system, model, platform)
    need = np.asarray(workload.prompt_tokens, np.int64) + workload.output_tokens - 1
    if need.min() > capacity:
        raise CapacityError(
            f"{workload.name}: none of its {need.size} request(s) fits "
            f"{getattr(system, 'name', system)}'s KV tiers: the smallest needs "
            f"{int(need.min()):,} tokens, {getattr(model, 'name', model)} on this hardware "
            f"holds {capacity:,.0f}")


def make_params(system: System | str, model: Model | str = "llama3-70b",
                platform: Platform | None = None, access: AccessModel | None = None,
                *, max_batch: int = 64, page_size: int = 1, knobs: Knobs | None = None
                ) -> SimParams:
    """Build the numeric parameter pytree for one configuration.

    Args:
      system: a System or its name.
      model: a Model or its name.
      platform: hardware (default the PAM DGX-H100 preset).
      access: access model (default calibrated AccessModel()).
      max_batch: concurrent requests allowed.
      page_size: tokens per KV unit (must match the EngineConfig).
      knobs: modelling choices (default Knobs()).

    Raises:
      UnknownNameError, ConfigError, CapacityError.
    """
    system = get_system(system) if isinstance(system, str) else system
    model = get_model(model) if isinstance(model, str) else model
    platform = platform or get_platform()
    access = access or AccessModel()
    knobs = knobs or Knobs()
    if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) \
            or max_batch < 1:
        raise ConfigError("max_batch", max_batch, "must be an integer >= 1")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ConfigError("page_size", page_size, "must be an integer >= 1")
    params = _params_without_targets(system, model, platform, access, knobs, int(max_batch),
                                     page_size)
    if system.placement_policy != PLACEMENT_IMPORTANCE_RATIO and system.swap_budget == 0:
        return params  # x:y is read only by PAM's placement and scheduling
    x, y = pam_targets(params, platform, model, access, knobs, int(max_batch))
    return params.replace(target_x=jnp.asarray(x, jnp.float32),
                          target_y=jnp.asarray(y, jnp.float32))


def _params_without_targets(system: System, model: Model, platform: Platform,
                            access: AccessModel, knobs: Knobs, max_batch: int,
                            page_size: int) -> SimParams:
    tiers = platform.tiers
    gpu = platform.gpu
    energy = platform.energy
    unit_bytes = model.kv_bytes_per_token * page_size
    capacity = np.minimum(tier_kv_capacity_bytes(platform, model) // unit_bytes, 2**31 - 1)
    gqa_group = model.q_heads // model.kv_heads
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    return SimParams(
        attention_on_pim=jnp.asarray(system.attention_on_pim),
        select_fraction=f32(access.select_fraction if system.sparse else 1.0),
        placement_policy=i32(system.placement_policy),
        new_token_policy=i32(system.new_token_policy),
        tier_enabled=jnp.asarray([t.name in system.tiers for t in tiers]),
        swap_budget=i32(system.swap_budget),
        target_x=f32(1.0),
        target_y=f32(1.0),
        ema_lambda=f32(access.ema_lambda),
        use_pamattention=jnp.asarray(system.use_pamattention),
        decode_split_tokens=i32(knobs.decode_split_tokens),
        mapping_policy=i32(MAPPINGS[system.mapping]),
        naive_run_units=i32(max(1, knobs.naive_run_tokens // page_size)),
        migration_slowdown=f32(system.migration_slowdown),
        max_batch=i32(max_batch),
        prefill_token_budget=i32(knobs.prefill_token_budget),
        sigma=f32(access.sigma),
        persistence=f32(access.persistence),
        sink_tokens=f32(access.sink_tokens),
        sink_bonus=f32(access.sink_bonus),
        recency_bonus=f32(access.recency_bonus),
        recency_tokens=f32(access.recency_tokens),
        capacity_units=i32(capacity),
        bank_groups_per_device=f32([t.bank_groups_per_device for t in tiers]),
        device_rate=f32([t.device_effective_gbps(model) * 1e9 for t in tiers]),
        bank_group_rate=f32([t.bank_group_gbps(model) * 1e9 for t in tiers]),
        device_internal_rate=f32([t.device.internal_gbps(t.kv_run_bytes) * 1e9
                                  for t in tiers]),
        read_passes=f32([query_passes(t.device.pu_buffer_bytes, gqa_group, model.head_dim)
                         for t in tiers]),
        num_devices=f32([t.num_devices for t in tiers]),
        link_rate=f32([t.link_total_gbps * 1e9 for t in tiers]),
        behind_pcie=f32([float(t.behind_pcie) for t in tiers]),
        link_latency=f32([t.link_latency_us * 1e-6 for t in tiers]),
        pim_read_pj=f32([t.pim_read_pj_per_bit for t in tiers]),
        host_read_pj=f32([t.host_read_pj_per_bit for t in tiers]),
        num_gpus=f32(gpu.num_gpus),
        tp=f32(gpu.tensor_parallel),
        pp=f32(gpu.pipeline_parallel),
        gpu_flops=f32(gpu.peak_tflops * 1e12 * gpu.gemm_efficiency),
        gpu_mem_rate=f32(gpu.hbm_tbps * 1e12 * gpu.stream_efficiency),
        nvlink_rate=f32(gpu.nvlink_gbps * 1e9),
        collective_rate=f32(gpu.collective_gbps * 1e9),
        collective_latency=f32(gpu.collective_latency_us * 1e-6),
        pcie_rate=f32(gpu.pcie_gbps * 1e9),
        gpu_link_latency=f32(gpu.link_latency_us * 1e-6),
        kernel_overhead=f32(gpu.kernel_overhead_us * 1e-6),
        layers=f32(model.layers),
        q_heads=f32(model.q_heads),
        kv_heads=f32(model.kv_heads),
        head_dim=f32(model.head_dim),
        hidden=f32(model.hidden),
        kv_bytes_per_token=f32(model.kv_bytes_per_token),
        fc_flops_per_token=f32(model.fc_flops_per_token),
        streamed_weight_bytes=f32(model.streamed_weight_bytes),
        routed_weight_bytes=f32(model.routed_expert_params * model.weight_bytes_per_value),
        expert_route_fraction=f32(model.experts_per_token / model.num_experts
                                  if model.is_moe else 0.0),
        gpu_pj_per_flop=f32(energy.gpu_pj_per_flop),
        gpu_hbm_read_pj=f32(energy.gpu_hbm_read),
        bank_group_read_pj=f32(energy.hbm_pim_bank_group_read),
        nvlink_pj=f32(energy.nvlink),
        pcie_pj=f32(energy.pcie),
        pim_pu_factor=f32(energy.pim_pu_factor),
        static_power_w=f32(platform.static_power_w),
    )


def max_bank_groups(platform: Platform | None = None) -> int:
    """G for EngineConfig: the largest bank-group count of any tier."""
    platform = platform or get_platform()
    return max(t.bank_groups_per_device for t in platform.tiers)
