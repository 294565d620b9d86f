"""The systems PAM is compared with (PAM_SPEC §7), as parameter sets of one engine.

* ``vllm-offload``: GPU only. PagedAttention/FlashDecoding on the GPUs over the whole context
  (dense). KV fills GPU HBM first, then is offloaded to host DDR, then SSD, and offloaded KV
  is fetched over PCIe every time it is attended. No migration.
* ``attacc``: GPU + HBM-PIM. FC layers on the GPUs, dense attention in HBM-PIM. KV lives in
  HBM only, so the batch is capacity-bound: a request that would not fit waits, and a batch
  whose KV exceeds HBM (net of weights and the activation reserve) is out of memory.
  AttAcc reduces partial results inside each stack (its buffer-die accumulators), which is
  the engine's device-local reduction; with a single tier nothing crosses devices.
* ``l-pim``: layered PIM in HBM, DDR and SSD; KV fills the fastest tier first; dense attention
  in every tier; no PAMattention (partials of every bank group are merged centrally), no PAM
  KV management (sequential bank-group fill, no scheduling).
* ``ls-pim``: l-pim plus the same retrieval sparsity as PAM (1/8 of the tokens per step),
  static placement.
* ``pam``: sparsity, locality-aware importance-ratio placement at prefill, new tokens to HBM,
  PAMattention (device-local reduction), greedy least-activated bank-group mapping, and
  online x:y:1 scheduling through the PAM interface.
* Ablations: ``pam-no-pamattention`` (central reduction), ``pam-no-mapping`` (sequential
  bank-group fill), ``pam-no-scheduling`` (swap budget 0; the prefill placement is kept).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from pamjax.costs import LABEL_FRACTION_OF_KV
from pamjax.errors import CapacityError, ConfigError, UnknownNameError
from pamjax.hardware import TIER_NAMES, Platform, get_platform
from pamjax.locality import AccessModel, logits
from pamjax.models import Model, get_model
from pamjax.types import (
    NEW_TOKEN_FASTEST_FREE,
    NEW_TOKEN_HBM_DISPLACE,
    PLACEMENT_FASTEST_FIRST,
    PLACEMENT_IMPORTANCE_RATIO,
    SimParams,
)


@dataclasses.dataclass(frozen=True)
class System:
    """Policy of one system; hardware and model come separately.

    Fields:
      name: system name.
      attention_on_pim: attention in the PIM tiers (False: on the GPUs).
      sparse: retrieval sparsity (select_fraction of the access model) vs dense.
      placement_policy, new_token_policy: PLACEMENT_* / NEW_TOKEN_* codes (types.py).
      tiers: names of the tiers that may hold KV.
      swap_budget: swaps per request per scheduling phase per step (0 = no scheduling).
      use_pamattention: device-local two-level reduction.
      greedy_mapping: least-activated bank-group mapping (else sequential fill).
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
    greedy_mapping: bool = False
    migration_slowdown: float = 20.0


_PAM = System("pam", attention_on_pim=True, sparse=True,
              placement_policy=PLACEMENT_IMPORTANCE_RATIO,
              new_token_policy=NEW_TOKEN_HBM_DISPLACE, swap_budget=8,
              use_pamattention=True, greedy_mapping=True, migration_slowdown=1.0)

SYSTEMS = {
    "vllm-offload": System("vllm-offload", attention_on_pim=False, sparse=False,
                           placement_policy=PLACEMENT_FASTEST_FIRST,
                           new_token_policy=NEW_TOKEN_FASTEST_FREE),
    "attacc": System("attacc", attention_on_pim=True, sparse=False,
                     placement_policy=PLACEMENT_FASTEST_FIRST,
                     new_token_policy=NEW_TOKEN_FASTEST_FREE, tiers=("hbm",),
                     use_pamattention=True),
    "l-pim": System("l-pim", attention_on_pim=True, sparse=False,
                    placement_policy=PLACEMENT_FASTEST_FIRST,
                    new_token_policy=NEW_TOKEN_FASTEST_FREE),
    "ls-pim": System("ls-pim", attention_on_pim=True, sparse=True,
                     placement_policy=PLACEMENT_FASTEST_FIRST,
                     new_token_policy=NEW_TOKEN_FASTEST_FREE),
    "pam": _PAM,
    "pam-no-pamattention": dataclasses.replace(_PAM, name="pam-no-pamattention",
                                               use_pamattention=False),
    "pam-no-mapping": dataclasses.replace(_PAM, name="pam-no-mapping", greedy_mapping=False),
    "pam-no-scheduling": dataclasses.replace(_PAM, name="pam-no-scheduling", swap_budget=0),
}
"""Systems and ablations by name."""

MAIN_SYSTEMS = ("vllm-offload", "attacc", "l-pim", "ls-pim", "pam")


def get_system(name: str) -> System:
    """The System called ``name`` (a key of SYSTEMS); UnknownNameError otherwise."""
    if name not in SYSTEMS:
        raise UnknownNameError("system", name, SYSTEMS)
    return SYSTEMS[name]


@dataclasses.dataclass(frozen=True)
class Knobs:
    """Modelling choices that are neither hardware nor system policy ([D], overridable).

    Fields:
      naive_run_tokens: consecutive tokens sharing a bank group under sequential fill.
      migration_overlap: fraction of a step's attention time that can hide migration.
      target_x, target_y: PAM's x:y:1 target; None = derived by ``target_rule``.
      target_rule: ``"equal-time"`` (default): the split that equalises expected attention
        time per tier at the configuration's batch, selection-label reads and per-layer
        round trips included (scheduler.calibrate_targets, the intent of PAM_SPEC §5 [D]);
        ``"throughput"``: x, y = ratios of the tiers' effective PIM throughput (the literal
        reading, which ignores both).
      calibration_context: tokens of the request used by the equal-time calibration.
      prefill_token_budget: prompt tokens prefilled per step at most ([D] 8192, a common
        vLLM max_num_batched_tokens).
    """

    naive_run_tokens: int = 64
    migration_overlap: float = 0.9
    target_x: float | None = None
    target_y: float | None = None
    target_rule: str = "equal-time"
    calibration_context: int = 1024
    prefill_token_budget: int = 8192

    def __post_init__(self):
        if self.target_rule not in TARGET_RULES:
            raise UnknownNameError("target rule", self.target_rule, TARGET_RULES)
        if self.prefill_token_budget < 1:
            raise ConfigError("knobs.prefill_token_budget", self.prefill_token_budget,
                              "must be >= 1")
        if self.naive_run_tokens < 1:
            raise ConfigError("knobs.naive_run_tokens", self.naive_run_tokens, "must be >= 1")
        if not 0 <= self.migration_overlap <= 1:
            raise ConfigError("knobs.migration_overlap", self.migration_overlap,
                              "must be in [0, 1]")
        for field in ("target_x", "target_y"):
            value = getattr(self, field)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ConfigError(f"knobs.{field}", value, "must be a finite number > 0")


TARGET_RULES = ("equal-time", "throughput")


def calibrate_targets(tier_rates, access, *, context: int = 1024, label_fraction: float,
                      kv_bytes_per_token: float = 1.0, batch: int = 1,
                      tier_fixed_s=(0.0, 0.0, 0.0), seed: int = 0, grid: int = 256,
                      max_ratio: float = 1e12):
    """PAM's offline x:y:1 target chosen so that expected attention time per tier is equal.

    PAM_SPEC §5 [D] asks for x, y that equalise the expected attention time of the tiers.
    A tier's time per step is a fixed cost when it holds any KV (``tier_fixed_s``: the Q and
    partial-result round trips of every layer) plus ``batch`` x (selected KV bytes +
    selection-label bytes of every token it holds) / its effective PIM rate, so
    throughput-proportional importance shares alone do not equalise it: label reads scale
    with the token *count* a tier holds. This draws one request of ``context`` tokens from
    the access model (importance = attention mass), ranks its tokens by importance, assumes
    the selector attends the top ``select_fraction``, and searches the split (HBM gets the
    top ``a`` tokens, DDR the next ``b``, SSD the rest) that minimises the largest tier time
    (which equalises the times of the tiers it uses); x and y are the importance ratios of
    that split. A tier the best split leaves empty gets no importance share: x (and y when
    DDR is empty too) is then ``max_ratio``. Capacity is ignored here: when a tier is full,
    placement spills downwards at run time.

    Args:
      tier_rates: effective PIM bytes/s per tier [T].
      access: AccessModel.
      context: tokens of the calibration request.
      label_fraction: label bytes per KV byte read for every held token (costs.py).
      kv_bytes_per_token: KV bytes of one token (all layers).
      batch: requests per step the split is optimised for.
      tier_fixed_s: seconds per step a tier costs as soon as it holds KV [T].
      grid: candidate split points per tier (resolution of the search).
      max_ratio: x (and y) when the best split leaves the SSD (and DDR) no token.

    Returns:
      (x, y) floats.
    """
    rng = np.random.default_rng(seed)
    latent = access.sigma * rng.standard_normal(context)
    logit = logits(access, latent[None, :], np.array([context]), 1, xp=np)[0]
    mass = np.exp(logit - logit.max())
    mass = np.sort(mass / mass.sum())[::-1]
    cum = np.concatenate([[0.0], np.cumsum(mass)])
    selected = max(1, int(np.ceil(access.select_fraction * context)))
    cuts = np.unique(np.linspace(0, context, grid + 1).round().astype(int))
    a, b = np.meshgrid(cuts, cuts, indexing="ij")
    valid = a + b <= context
    c = np.clip(context - a - b, 0, None)
    sel_h = np.minimum(a, selected)
    sel_d = np.clip(selected - a, 0, b)
    sel_s = selected - sel_h - sel_d
    rates = np.asarray(tier_rates, np.float64)
    scale = batch * kv_bytes_per_token
    fixed = np.asarray(tier_fixed_s, np.float64)
    times = np.stack([fixed[t] * (n > 0) + scale * (sel + label_fraction * n) / rates[t]
                      for t, (sel, n) in enumerate(((sel_h, a), (sel_d, b), (sel_s, c)))])
    worst = np.where(valid, times.max(0), np.inf)
    i, j = np.unravel_index(np.argmin(worst), worst.shape)
    best_a, best_b = int(a[i, j]), int(b[i, j])
    is_h = cum[best_a]
    is_d = cum[best_a + best_b] - is_h
    if best_a + best_b >= context:  # the SSD holds nothing
        return max_ratio, max_ratio * is_d / max(is_h, 1e-30)
    is_s = 1.0 - is_h - is_d
    return float(is_h / is_s), float(is_d / is_s)


@functools.lru_cache(maxsize=256)
def _equal_time_targets(rates: tuple, access: AccessModel, context: int, kv_bytes: float,
                        batch: int, fixed: tuple):
    return calibrate_targets(rates, access, context=context,
                             label_fraction=LABEL_FRACTION_OF_KV, kv_bytes_per_token=kv_bytes,
                             batch=batch, tier_fixed_s=fixed)


def pam_targets(platform: Platform, model: Model, access: AccessModel, knobs: Knobs,
                batch: int) -> tuple[float, float]:
    """PAM's (x, y) for a platform, model and batch: explicit knobs, else the target rule.

    The equal-time rule counts each tier's per-step round trips (two link latencies per
    layer) as the fixed cost of using it, so at small batches the slower tiers stay empty
    unless capacity forces KV there.
    """
    eff = tuple(t.effective_gbps * 1e9 for t in platform.tiers)
    if knobs.target_rule == "throughput":
        x, y = eff[0] / eff[2], eff[1] / eff[2]
    else:
        fixed = tuple(2.0 * model.layers * t.link_latency_us * 1e-6 for t in platform.tiers)
        x, y = _equal_time_targets(eff, access, knobs.calibration_context,
                                   float(model.kv_bytes_per_token), int(batch), fixed)
    return (knobs.target_x if knobs.target_x is not None else x,
            knobs.target_y if knobs.target_y is not None else y)


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
    if not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
        raise ConfigError("max_batch", max_batch, "must be an integer >= 1")
    if not isinstance(page_size, int) or page_size < 1:
        raise ConfigError("page_size", page_size, "must be an integer >= 1")
    for name in system.tiers:
        if name not in ("hbm", "ddr", "ssd"):
            raise UnknownNameError("tier", name, ("hbm", "ddr", "ssd"))

    tiers = platform.tiers
    gpu = platform.gpu
    energy = platform.energy
    unit_bytes = model.kv_bytes_per_token * page_size
    capacity = np.minimum(tier_kv_capacity_bytes(platform, model) // unit_bytes, 2**31 - 1)
    target_x, target_y = pam_targets(platform, model, access, knobs, int(max_batch))
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    return SimParams(
        attention_on_pim=jnp.asarray(system.attention_on_pim),
        select_fraction=f32(access.select_fraction if system.sparse else 1.0),
        placement_policy=i32(system.placement_policy),
        new_token_policy=i32(system.new_token_policy),
        tier_enabled=jnp.asarray([t.name in system.tiers for t in tiers]),
        swap_budget=i32(system.swap_budget),
        target_x=f32(target_x),
        target_y=f32(target_y),
        ema_lambda=f32(access.ema_lambda),
        use_pamattention=jnp.asarray(system.use_pamattention),
        greedy_mapping=jnp.asarray(system.greedy_mapping),
        naive_run_units=i32(max(1, knobs.naive_run_tokens // page_size)),
        migration_slowdown=f32(system.migration_slowdown),
        migration_overlap=f32(knobs.migration_overlap),
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
        device_rate=f32([t.device_effective_gbps * 1e9 for t in tiers]),
        num_devices=f32([t.num_devices for t in tiers]),
        link_rate=f32([t.link_total_gbps * 1e9 for t in tiers]),
        link_latency=f32([t.link_latency_us * 1e-6 for t in tiers]),
        pim_read_pj=f32([t.pim_read_pj_per_bit for t in tiers]),
        host_read_pj=f32([t.host_read_pj_per_bit for t in tiers]),
        num_gpus=f32(gpu.num_gpus),
        tp=f32(gpu.tensor_parallel),
        pp=f32(gpu.pipeline_parallel),
        gpu_flops=f32(gpu.peak_tflops * 1e12 * gpu.gemm_efficiency),
        gpu_mem_rate=f32(gpu.hbm_tbps * 1e12 * gpu.stream_efficiency),
        nvlink_rate=f32(gpu.nvlink_gbps * 1e9),
        pcie_rate=f32(gpu.pcie_gbps * 1e9),
        gpu_link_latency=f32(gpu.link_latency_us * 1e-6),
        kernel_overhead=f32(gpu.kernel_overhead_us * 1e-6),
        layers=f32(model.layers),
        q_heads=f32(model.q_heads),
        head_dim=f32(model.head_dim),
        hidden=f32(model.hidden),
        kv_bytes_per_token=f32(model.kv_bytes_per_token),
        fc_flops_per_token=f32(model.fc_flops_per_token),
        streamed_weight_bytes=f32(model.streamed_weight_bytes),
        gpu_pj_per_flop=f32(energy.gpu_pj_per_flop),
        gpu_hbm_read_pj=f32(energy.gpu_hbm_read),
        bank_group_read_pj=f32(energy.hbm_pim_bank_group_read),
        nvlink_pj=f32(energy.nvlink),
        pcie_pj=f32(energy.pcie),
        pim_pu_factor=f32(energy.pim_pu_factor),
    )


def max_bank_groups(platform: Platform | None = None) -> int:
    """G for EngineConfig: the largest bank-group count of any tier."""
    platform = platform or get_platform()
    return max(t.bank_groups_per_device for t in platform.tiers)
