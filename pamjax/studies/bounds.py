"""Closed-form physical bounds on serving throughput, written independently of the engine.

Every simulated throughput is held against these bounds (tests/test_bounds.py): a result
above its bound is a simulator bug. The model uses only the hardware, model and system
presets and the workload's mean lengths; it shares no code with costs.py, engine.py or
placement.py, and it is derived from PAM_SPEC §2-§7, not from the engine's formulas.

Notation (units in brackets):

* ``b`` concurrent decoding requests; ``p``, ``o`` mean prompt and output length [tokens];
  ``c`` mean context of a decoding request [tokens], by default ``p + o / 2`` (a request
  decodes at contexts ``p + 1 .. p + o - 1``; weighting requests by their decode tokens only
  raises the mean, by Jensen, when lengths are independent).
* ``N = b c`` KV tokens held; ``f`` the selector's fraction (1 for dense systems);
  ``S = f N`` attended tokens; ``k`` KV bytes per token; ``lam`` label bytes read per held
  token over ``k`` (sparse systems: the selector scores every token from a label of 1/8 of
  its key, PAM_SPEC §5, so ``lam = 1/16``; dense systems read no labels).
* ``G`` GPUs, ``t`` tensor-parallel degree, ``pp = G / t`` pipeline stages;
  ``phi`` achievable FLOP/s per GPU = peak x ``compute_fraction`` (default the platform's
  large-GEMM efficiency, 0.7: no kernel sustains peak, so a bound at 1.0 is looser but
  assumption-free); ``beta`` achievable HBM bytes/s per GPU = peak x ``bandwidth_fraction``
  (default the streaming efficiency, 0.85).
* ``F`` FC FLOPs per token and ``W`` weight bytes streamed per decode iteration (models.py);
  ``r_i`` tier i's effective PIM attention rate [KV bytes/s], derived here from the
  published organisation, timings and compute caps (:func:`pim_tier_rates`, its own short
  formula, not hardware.py's: a test compares the two): ``devices x min(internal / passes,
  cap w / (2 g))`` with ``g`` query heads per KV head, ``w`` bytes per K or V element
  (``2 g / w`` FLOPs per KV byte: g for 16-bit KV, 2 g for FP8) and ``passes`` the
  reads of each KV byte a PU buffer of ``B`` bytes needs, ``ceil(g / max(1, B / 2d))``;
  ``C_i`` tier i's KV capacity [tokens] (systems.py).

Lower bounds on the time of one decode iteration (one token for each of ``b`` requests):

* GPU compute: ``b F / (G phi)``; every FC FLOP runs on some GPU.
* GPU HBM (weights): ``W / (t beta)``. A GPU holds ``W / (t pp)`` bytes and reads them once
  per micro-batch that passes its stage. With ``m`` micro-batches a GPU reads ``m`` times,
  and since a micro-batch visits the ``pp`` stages in order the iteration spans at least
  ``pp`` stage passes, so it takes at least ``max(m, pp) W / (t pp beta) >= W / (t beta)``
  (the same holds for pipelines that interleave iterations). A mixture of experts reads
  only the experts a micro-batch's tokens reach, ``W(b / m)``
  (Model.streamed_weight_bytes_for_batch, uniform routing); W is concave in the tokens,
  so ``max(m, pp) W(b / m) / (t pp beta) >= W(b / pp) / (t beta)`` for every m, the bound
  used. Compute and weight reads of the FC kernels overlap at best: the FC stage takes at
  least the larger of the two.
* Attention in PIM: the tiers work in parallel, and a tier reads its attended KV plus the
  labels of every token it holds, at ``r_i`` at best (an unbalanced bank group is only
  slower). For any set Q of enabled tiers at most ``C_out = sum of C_i outside Q`` tokens
  sit outside Q, so Q reads at least ``k ((S - C_out)+ + lam (N - C_out)+)`` bytes at
  ``sum_Q r_i``, and attention takes at least the largest of these over Q. Q = all tiers is
  the ideal placement (every tier finishing together); Q = {i} is what capacity forces onto
  tier i alone.
* Attention on the GPUs (vLLM-offload): KV in GPU HBM is read at ``G beta`` in a roofline
  with the attention FLOPs ``4 L Hq D S / (G phi)``; offloaded KV crosses its tier's device
  links and the GPUs' PCIe, which DDR and SSD share, before the GPUs can use it (fetch,
  then compute): at least the busiest of those links' bytes over its rate. Filling the
  fastest tiers first minimises it.
* Migration: a workload that moves ``mu`` tokens between tiers per decode token needs
  ``b mu k slowdown / rho`` with ``rho`` the slower link of the fastest pair of enabled
  tiers (PAM_SPEC §5 [D]); migration overlaps attention at best.

* Offered load (open-loop arrivals, traces): a run whose requests arrive over ``span``
  seconds and ask for ``O`` output tokens in all lasts at least ``span``, so it serves at
  most ``O / span`` tokens/s (resource ``arrivals``): a system that keeps up with its trace
  is bound by the trace, not by the hardware.

Composition. Each layer's attention waits for its Q/K/V projections and the output
projection waits for attention (PAM_SPEC §3), and neither PAM nor the baselines interleave
sub-batches, so ``T_iter(b) >= max(FC compute, weights) + max(attention, migration)``.
Prefill runs on the same GPUs, once per request: at least ``P(p) / (G phi)`` with
``P(n) = F n + 4 L Hq D n (n + 1) / 2`` (P is convex, so the mean prompt under-states the
mean prefill work). A request yields ``o`` tokens, one from prefill and ``o - 1`` from
decode iterations, so the time per output token is at least

    tau(b) = P(p) / (G phi o) + (1 - 1 / o) T_iter(b) / b,

and ``1 / tau(b)`` bounds output tokens/s (``prefill=False`` drops the prefill term and the
``1 - 1/o`` factor: decode iterations alone). Each resource's own terms, alone, give the
throughput it would allow with everything else free (``Bound.per_resource``); the binding
resource is the one allowing least, i.e. the largest share of ``tau``. The smallest
per-resource value is itself a bound for a system that overlapped every stage perfectly.

Batch. Admission reserves a request's whole KV, ``p + o - 1`` tokens (the last output token
is never fed back), so at most ``floor(sum C_i / (p + o - 1))`` requests run at once: exact
for equal lengths, and for mixed lengths the running set is length-biased, so the mean
under-states what a running request holds. Under a per-token latency SLO every request's
TPOT is at least ``T_iter`` at the running batch, so the batch must satisfy
``T_iter(b) <= SLO``. ``T_iter`` is nondecreasing in ``b`` but ``b / T_iter`` need not be
(KV spilling to a slower tier), so the bound is the largest ``1 / tau(b')`` over feasible
``b' <= min(batch, capacity, SLO)``.

Left out, on purpose (they are the engine's slack against the bound): link and collective
latencies, kernel launch overhead, all-reduces and pipeline hand-offs (decode and prefill),
Q, partial-result and top-k traffic, decode KV writes, bank-group imbalance, page-granular
selection, non-ideal placement, migration the workload does not declare, prefill weight
streaming and KV writes, and prefill steps stalling decode.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.hardware import TIER_NAMES, Platform, get_platform
from pamjax.locality import AccessModel
from pamjax.models import Model, get_model
from pamjax.systems import System, get_system, tier_kv_capacity_bytes
from pamjax.workload import DATASETS, DatasetStats, Workload

LABEL_FRACTION_OF_KEY = 1.0 / 8.0
"""Selection-label bytes per key byte (Double Sparsity, PAM_SPEC §5 [D])."""

RESOURCES = ("gpu_compute", "gpu_hbm", "pcie", "pim_hbm", "pim_ddr", "pim_ssd", "pim_tiers",
             "migration", "arrivals")
"""Resource names of ``Bound.per_resource``, in tie-break order for the binding resource.

gpu_compute: FC (and GPU attention) FLOPs plus amortised prefill FLOPs; gpu_hbm: weights plus
GPU-read KV; pcie: offloaded KV fetched to the GPUs; pim_<tier>: the KV work capacity forces
onto that tier alone; pim_tiers: all enabled PIM tiers sharing the attention work (ideal
placement, capacity-aware); migration: declared tier-to-tier moves; arrivals: the output
tokens per second a trace or an open-loop arrival process offers.
"""

_EXHAUSTIVE = 1 << 12  # batches searched one by one; above, a geometric grid
_GRID_RATIO = 1.0 + 2.0**-12  # its step: the max over b is found to within this factor
_TIE = 1e-12  # relative: the smallest batch within this of the best rate reaches the bound


@dataclasses.dataclass(frozen=True)
class Bound:
    """Upper bound on output tokens/s for one system, model and workload.

    Fields:
      system, model: names.
      tokens_per_s: the bound, output tokens/s (0 when no batch is feasible).
      binding_resource: the resource allowing the fewest tokens/s at ``batch`` (see
        RESOURCES); when no batch is feasible, the limit that rules every batch out.
      per_resource: {resource: tokens/s that resource alone allows at ``batch``}, for the
        resources the system uses (math.inf where nothing is forced onto it).
      batch: concurrent requests at which the bound is reached.
      max_batch: largest feasible concurrency (given batch, KV capacity and SLO).
      batch_limit: what sets ``max_batch``: "batch", "kv_capacity" or "slo".
      capacity_batch: most requests the enabled tiers' KV capacity holds at once.
      slo_batch: largest batch <= min(batch, capacity_batch) whose iteration lower bound
        meets the SLO; None without an SLO.
      iteration_s: lower bound on one decode iteration at ``batch``, s.
    """

    system: str
    model: str
    tokens_per_s: float
    binding_resource: str
    per_resource: dict[str, float]
    batch: int
    max_batch: int
    batch_limit: str
    capacity_batch: int
    slo_batch: int | None
    iteration_s: float


class ClaimCheck(NamedTuple):
    """Verdict of :func:`check_claim`: attainable, a one-line explanation, A's binding
    resource."""

    attainable: bool
    explanation: str
    binding_resource: str


def pim_tier_rates(platform: Platform, model: Model) -> np.ndarray:
    """Effective PIM attention rate of each tier, KV bytes/s, f64 [3] (TIER_NAMES order).

    Derived here, independently of hardware.py's methods, from the published figures: a
    DRAM bank streams a full row of ``row`` bytes in ``max(tRAS + tRP, tRCD + ceil(row /
    column) tCCD_L + tRP, tRC)`` command-clock cycles (clock = pin rate / transfers per
    clock) and every bank of the device streams at once; an SSD reads ``dies x page``
    bytes per tR on each channel, at most the channel bus. A PU buffer holds
    ``max(1, buffer // (2 head_dim))`` FP16 query vectors, so serving the ``g = Hq / Hkv``
    query heads of a KV head reads each KV byte ``ceil(g / held)`` times. Each K or V
    element gets one multiply-add (2 FLOPs) per query head and a byte holds ``1 / w`` of
    an element (``w = kv_bytes_per_value``), so the compute cap (the power-limited figure,
    or the PUs' raw peak if lower) processes ``cap w / (2 g)`` KV bytes/s.
    Rate = devices x min(internal / passes, cap w / (2 g)).
    """
    g = model.q_heads // model.kv_heads
    w = model.kv_bytes_per_value
    rates = []
    for tier in platform.tiers:
        d = tier.device
        if hasattr(d, "row_bytes"):
            banks = (d.channels * d.pseudo_channels * d.ranks * d.chips_per_rank
                     * d.bank_groups * d.banks_per_group)
            cycles = max(d.tRAS + d.tRP, d.tRCD + math.ceil(d.row_bytes / d.column_bytes)
                         * d.tCCD_L + d.tRP, d.tRC)
            internal = banks * d.row_bytes * (d.pin_gbps / d.transfers_per_clock) * 1e9 / cycles
            peak = banks * d.pu_lanes * 2 * d.pu_clock_ghz * 1e9
        else:
            internal = d.channels * min(d.dies_per_channel * d.page_bytes / (d.tR_us * 1e-6),
                                        d.channel_mts * 1e6 * d.channel_bus_bits / 8)
            peak = d.pu_count * d.pu_lanes * 2 * d.pu_clock_ghz * 1e9
        passes = math.ceil(g / max(1, d.pu_buffer_bytes // (2 * model.head_dim)))
        cap = min(d.compute_cap_gflops * 1e9, peak)
        rates.append(tier.num_devices * min(internal / passes, cap * w / (2 * g)))
    return np.array(rates)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """Everything the closed forms need, in SI units (bytes, s, FLOP)."""

    system: System
    model: Model
    on_pim: bool
    tiers: tuple[int, ...]  # enabled tier indices, TIER_NAMES order
    capacity: np.ndarray  # [3] KV tokens per tier (0 where disabled)
    pim_rate: np.ndarray  # [3] effective PIM attention bytes/s per tier
    link_rate: np.ndarray  # [3] bytes/s of each tier's device links (HBM: all GPUs' HBM)
    pcie_rate: float  # bytes/s of the GPUs' PCIe links together
    kv: float  # bytes per token
    select: float  # attended fraction f
    label: float  # label bytes per held token / kv (lam)
    weight_rate: float  # t beta: the rate one copy of the weights is streamed at, bytes/s
    stages: int  # pp
    fc_s_per_token: float  # F / (G phi)
    attn_s_per_token: float  # attention FLOPs per attended token / (G phi)
    prefill_s: float  # P(p) / (G phi), per request
    migration_s_per_token: float  # per decode token
    mean_prompt: float
    mean_output: float
    mean_context: float | np.ndarray  # tokens; an array broadcasts with the batches
    prefill: bool


def _setup(system, model, *, mean_prompt, mean_output, mean_context=None, platform=None,
           access=None, compute_fraction=None, bandwidth_fraction=None,
           migrated_tokens_per_decode_token=0.0,
           label_fraction_of_key=LABEL_FRACTION_OF_KEY, prefill=True) -> _Setup:
    system = get_system(system) if isinstance(system, str) else system
    model = get_model(model) if isinstance(model, str) else model
    platform = platform or get_platform()
    access = access or AccessModel()
    gpu = platform.gpu
    compute_fraction = gpu.gemm_efficiency if compute_fraction is None else compute_fraction
    bandwidth_fraction = gpu.stream_efficiency if bandwidth_fraction is None \
        else bandwidth_fraction
    for name, value in (("compute_fraction", compute_fraction),
                        ("bandwidth_fraction", bandwidth_fraction)):
        if not 0 < value <= 1:
            raise ConfigError(name, value, "must be in (0, 1]")
    for name, value in (("mean_prompt", mean_prompt), ("mean_output", mean_output)):
        if not (math.isfinite(value) and value >= 1):
            raise ConfigError(name, value, "must be a finite number >= 1")
    mean_context = mean_prompt + mean_output / 2 if mean_context is None else mean_context
    if not np.all(np.isfinite(mean_context) & (np.asarray(mean_context) > 0)):
        raise ConfigError("mean_context", mean_context, "must be finite and > 0")
    if not (math.isfinite(migrated_tokens_per_decode_token)
            and migrated_tokens_per_decode_token >= 0):
        raise ConfigError("migrated_tokens_per_decode_token",
                          migrated_tokens_per_decode_token, "must be finite and >= 0")
    if not 0 <= label_fraction_of_key <= 1:
        raise ConfigError("label_fraction_of_key", label_fraction_of_key, "must be in [0, 1]")

    kv = float(model.kv_bytes_per_token)
    tiers = tuple(i for i, name in enumerate(TIER_NAMES) if name in system.tiers)
    enabled = np.array([i in tiers for i in range(len(TIER_NAMES))])
    capacity = np.where(enabled, tier_kv_capacity_bytes(platform, model) / kv, 0.0)
    links = np.array([t.link_total_gbps * 1e9 for t in platform.tiers])
    gpu_flops = gpu.num_gpus * gpu.peak_tflops * 1e12 * compute_fraction
    gpu_mem = gpu.hbm_tbps * 1e12 * bandwidth_fraction
    pairs = [min(links[i], links[j]) for i, j in itertools.combinations(tiers, 2)]
    links[0] = gpu.num_gpus * gpu_mem  # a GPU-side reader gets HBM at every GPU's rate
    migration = 0.0
    if pairs and migrated_tokens_per_decode_token > 0:
        migration = migrated_tokens_per_decode_token * kv * system.migration_slowdown \
            / max(pairs)
    sparse = system.sparse and access.select_fraction < 1
    return _Setup(
        system=system, model=model, on_pim=system.attention_on_pim, tiers=tiers,
        capacity=capacity,
        pim_rate=pim_tier_rates(platform, model), link_rate=links,
        pcie_rate=gpu.num_gpus * gpu.pcie_gbps * 1e9, kv=kv,
        select=access.select_fraction if sparse else 1.0,
        label=model.key_bytes_per_token * label_fraction_of_key / kv if sparse else 0.0,
        weight_rate=gpu.tensor_parallel * gpu_mem, stages=gpu.pipeline_parallel,
        fc_s_per_token=model.fc_flops_per_token / gpu_flops,
        attn_s_per_token=model.attention_flops(1.0) / gpu_flops,
        prefill_s=model.prefill_flops(mean_prompt) / gpu_flops,
        migration_s_per_token=migration,
        mean_prompt=float(mean_prompt), mean_output=float(mean_output),
        mean_context=mean_context, prefill=prefill)


def _iteration_terms(s: _Setup, b: np.ndarray) -> dict[str, np.ndarray]:
    """Lower-bound times (s) of one decode iteration of ``b`` requests, by term.

    Returns fc_compute, weights, attn_flops (GPU attention), kv_hbm (GPU-read KV), fetch
    (offloaded KV), pim_<tier> (capacity-forced work per tier), pim_tiers (best placement)
    and migration, each shaped like ``b``.
    """
    held = b * s.mean_context
    attended = s.select * held
    zero = np.zeros_like(held)
    # The weights an iteration of b tokens streams at least (module docstring): W(b / pp),
    # every weight for a dense model.
    weights = s.model.streamed_weight_bytes_for_batch(b / s.stages) / s.weight_rate
    terms = {"fc_compute": b * s.fc_s_per_token, "weights": np.broadcast_to(weights,
                                                                               held.shape),
             "migration": b * s.migration_s_per_token}
    if s.on_pim:
        slowest = zero
        for size in range(1, len(s.tiers) + 1):
            for group in itertools.combinations(s.tiers, size):
                outside = sum(s.capacity[i] for i in s.tiers if i not in group)
                work = s.kv * (np.maximum(attended - outside, 0.0)
                               + s.label * np.maximum(held - outside, 0.0))
                time = work / sum(s.pim_rate[i] for i in group)
                slowest = np.maximum(slowest, time)
                if size == 1:
                    terms[f"pim_{TIER_NAMES[group[0]]}"] = time
        terms["pim_tiers"] = slowest
        terms.update(attn_flops=zero, kv_hbm=zero, fetch=zero)
        return terms
    # GPU attention: fill the fastest tiers first (HBM, then the host-side tiers, DDR
    # before SSD), held tokens and attended tokens alike: the HBM part is read in place and
    # the rest fetched over the busiest of the links it crosses.
    fetched = {}
    held_before = attended_before = zero
    for rank, i in enumerate(s.tiers):
        last = rank == len(s.tiers) - 1
        n = held - held_before if last else np.clip(held - held_before, 0.0, s.capacity[i])
        a = np.clip(attended - attended_before, 0.0, n)
        fetched[i] = s.kv * (a + s.label * n)
        held_before, attended_before = held_before + n, attended_before + a
    kv_hbm = fetched.get(0, zero) / s.link_rate[0]
    host = [i for i in s.tiers if i != 0]
    fetch = zero
    if host:
        fetch = sum(fetched[i] for i in host) / s.pcie_rate
        for i in host:
            fetch = np.maximum(fetch, fetched[i] / s.link_rate[i])
    terms.update(attn_flops=attended * s.attn_s_per_token, kv_hbm=kv_hbm, fetch=fetch,
                 pim_tiers=zero)
    return terms


def _iteration_s(terms: Mapping[str, np.ndarray]) -> np.ndarray:
    """Serial composition: FC roofline, then attention (overlapping declared migration)."""
    fc = np.maximum(terms["fc_compute"], terms["weights"])
    attention = np.maximum(terms["kv_hbm"], terms["attn_flops"]) + terms["fetch"] \
        + terms["pim_tiers"]
    return fc + np.maximum(attention, terms["migration"])


def _per_token(s: _Setup, b, iteration_s):
    """Time per output token (s) from a per-iteration time, prefill amortised if enabled."""
    if not s.prefill:
        return iteration_s / b
    return s.prefill_s / s.mean_output + (1.0 - 1.0 / s.mean_output) * iteration_s / b


def _resource_times(s: _Setup, b, terms) -> dict[str, Any]:
    """Per output token time (s) each resource alone needs (RESOURCES names)."""
    times = {"gpu_compute": terms["fc_compute"] + terms["attn_flops"],
             "gpu_hbm": terms["weights"] + terms["kv_hbm"]}
    if s.on_pim:
        times.update({f"pim_{TIER_NAMES[i]}": terms[f"pim_{TIER_NAMES[i]}"] for i in s.tiers})
        times["pim_tiers"] = terms["pim_tiers"]
    elif len(s.tiers) > 1:
        times["pcie"] = terms["fetch"]
    if s.migration_s_per_token > 0 and len(s.tiers) > 1:
        times["migration"] = terms["migration"]
    scale = (1.0 - 1.0 / s.mean_output) / b if s.prefill else 1.0 / b
    result = {name: time * scale for name, time in times.items()}
    if s.prefill:
        result["gpu_compute"] = result["gpu_compute"] + s.prefill_s / s.mean_output
    return result


def _batch_grid(limit: int) -> np.ndarray:
    """Every batch up to 2**12, then a geometric grid (ratio 1 + 2**-12) up to ``limit``.

    Between grid points b_k < b < b_(k+1), T_iter(b) >= T_iter(b_k), so the throughput at b
    is at most b / b_k <= 1 + 2**-12 times that at b_k: the grid maximum is the bound to
    within 0.025% (exactly, for batches up to 4096).
    """
    exact = np.arange(1, min(limit, _EXHAUSTIVE) + 1, dtype=np.float64)
    if limit <= _EXHAUSTIVE:
        return exact
    steps = math.ceil(math.log(limit / _EXHAUSTIVE) / math.log(_GRID_RATIO))
    geometric = np.floor(_EXHAUSTIVE * _GRID_RATIO ** np.arange(1, steps + 1))
    return np.unique(np.concatenate([exact, np.minimum(geometric, limit), [limit]]))


def capacity_batch(system, model, *, mean_prompt: float, mean_output: float,
                   platform: Platform | None = None) -> int:
    """Most requests whose whole KV (prompt + output - 1 tokens) the enabled tiers hold.

    Args:
      system: a System or its name; model: a Model or its name.
      mean_prompt, mean_output: mean request lengths, tokens.
      platform: hardware (default the PAM DGX-H100 preset).

    Raises:
      UnknownNameError, ConfigError, CapacityError (weights do not fit HBM).
    """
    return _capacity_batch(_setup(system, model, mean_prompt=mean_prompt,
                                  mean_output=mean_output, platform=platform))


def _capacity_batch(s: _Setup) -> int:
    return int(np.floor(np.sum(s.capacity) / (s.mean_prompt + s.mean_output - 1.0)))


def throughput_curve(system, model, batches, *, mean_prompt: float, mean_output: float,
                     mean_context=None, platform: Platform | None = None,
                     access: AccessModel | None = None, compute_fraction: float | None = None,
                     bandwidth_fraction: float | None = None,
                     migrated_tokens_per_decode_token: float = 0.0,
                     label_fraction_of_key: float = LABEL_FRACTION_OF_KEY,
                     prefill: bool = True) -> np.ndarray:
    """Throughput bound at exactly ``batches`` concurrent requests, ignoring capacity and SLO.

    This is ``1 / tau(b)`` of the module docstring, elementwise; :func:`bound` maximises it
    over the feasible batches.

    Args:
      system, model: names or objects.
      batches: concurrent decoding requests, array-like of numbers >= 1.
      mean_prompt, mean_output: mean request lengths, tokens.
      mean_context: mean context of a decoding request, tokens (scalar, or broadcasting with
        ``batches``); default ``mean_prompt + mean_output / 2``.
      platform, access: hardware and access model (defaults: presets).
      compute_fraction, bandwidth_fraction: achievable fractions of GPU peak FLOP/s and HBM
        bandwidth (defaults: the platform's gemm_efficiency and stream_efficiency).
      migrated_tokens_per_decode_token: tokens moved between tiers per decode token.
      label_fraction_of_key: selection-label bytes per key byte for sparse systems.
      prefill: amortise prefill per output token (compare with whole-run throughput);
        False: decode iterations only (compare with decode-only throughput).

    Returns:
      f64 array shaped like ``batches`` (broadcast with ``mean_context``), tokens/s.
    """
    s = _setup(system, model, mean_prompt=mean_prompt, mean_output=mean_output,
               mean_context=mean_context, platform=platform, access=access,
               compute_fraction=compute_fraction, bandwidth_fraction=bandwidth_fraction,
               migrated_tokens_per_decode_token=migrated_tokens_per_decode_token,
               label_fraction_of_key=label_fraction_of_key, prefill=prefill)
    b = np.asarray(batches, np.float64)
    if not np.all(b >= 1):
        raise ConfigError("batches", batches, "must be >= 1")
    b = np.broadcast_to(b, np.broadcast_shapes(b.shape, np.shape(s.mean_context)))
    return 1.0 / _per_token(s, b, _iteration_s(_iteration_terms(s, b)))


def bound(system, model, *, mean_prompt: float, mean_output: float,
          mean_context: float | None = None, batch: int | None = None,
          slo_ms: float | None = None, platform: Platform | None = None,
          access: AccessModel | None = None, compute_fraction: float | None = None,
          bandwidth_fraction: float | None = None,
          migrated_tokens_per_decode_token: float = 0.0,
          label_fraction_of_key: float = LABEL_FRACTION_OF_KEY, prefill: bool = True,
          exact_batch: bool = False) -> Bound:
    """Upper bound on output tokens/s, its binding resource and the batch that reaches it.

    Args:
      system: a System or its name; model: a Model or its name.
      mean_prompt, mean_output: mean request lengths, tokens.
      mean_context: mean context of a decoding request, tokens (default
        ``mean_prompt + mean_output / 2``, the steady-state mean).
      batch: most concurrent requests (the engine's max_batch); None searches every batch
        up to the KV capacity.
      slo_ms: per-output-token latency SLO, ms; None for none.
      platform, access: hardware and access model (defaults: presets).
      compute_fraction, bandwidth_fraction: achievable fractions of GPU peak FLOP/s and HBM
        bandwidth (defaults: the platform's gemm_efficiency and stream_efficiency; pass 1.0
        for a bound at peak).
      migrated_tokens_per_decode_token: tokens the system moves between tiers per decode
        token (migration is a policy choice, so none is assumed by default).
      label_fraction_of_key: selection-label bytes per key byte for sparse systems.
      prefill: amortise prefill per output token (compare with whole-run throughput);
        False: decode iterations only (compare with decode-only throughput).
      exact_batch: evaluate at exactly ``max_batch`` concurrent requests, for a run known
        to keep that many decoding (equal-length requests after admission). By default the
        bound holds for any run whose concurrency never exceeds ``batch``: the best batch
        up to it.

    Returns:
      Bound.

    Raises:
      UnknownNameError: unknown system or model.
      ConfigError: a statistic or parameter out of range.
      CapacityError: the model's weights do not fit GPU HBM.
    """
    if batch is not None and (not isinstance(batch, (int, np.integer)) or batch < 1):
        raise ConfigError("batch", batch, "must be an integer >= 1 or None")
    if slo_ms is not None and not (math.isfinite(slo_ms) and slo_ms > 0):
        raise ConfigError("slo_ms", slo_ms, "must be a finite number > 0")
    if mean_context is not None and np.ndim(mean_context):
        raise ConfigError("mean_context", mean_context, "must be a scalar")
    s = _setup(system, model, mean_prompt=mean_prompt, mean_output=mean_output,
               mean_context=mean_context, platform=platform, access=access,
               compute_fraction=compute_fraction, bandwidth_fraction=bandwidth_fraction,
               migrated_tokens_per_decode_token=migrated_tokens_per_decode_token,
               label_fraction_of_key=label_fraction_of_key, prefill=prefill)
    capacity = _capacity_batch(s)
    limit = capacity if batch is None else min(int(batch), capacity)
    limit_name = "kv_capacity" if batch is None or capacity < batch else "batch"
    grid = _batch_grid(limit) if limit > 0 else np.zeros(0)
    iteration = _iteration_s(_iteration_terms(s, grid))
    slo_batch = None
    if slo_ms is not None:
        meets = iteration <= slo_ms * 1e-3
        slo_batch = int(grid[meets][-1]) if meets.any() else 0
        if slo_batch < limit:
            limit, limit_name = slo_batch, "slo"
            grid, iteration = grid[meets], iteration[meets]
    common = dict(system=s.system.name, model=s.model.name, max_batch=limit,
                  batch_limit=limit_name, capacity_batch=capacity, slo_batch=slo_batch)
    if limit == 0:
        return Bound(tokens_per_s=0.0, binding_resource=limit_name, per_resource={},
                     batch=0, iteration_s=0.0, **common)
    if exact_batch:
        grid, iteration = grid[-1:], iteration[-1:]
    rates = 1.0 / _per_token(s, grid, iteration)
    # Past the FC roofline's knee the rate is flat; report the smallest batch reaching it.
    best = int(np.argmax(rates >= rates.max() * (1.0 - _TIE)))
    b = grid[best:best + 1]
    per_resource = {
        key: float(1.0 / time[0]) if time[0] > 0 else math.inf
        for key, time in _resource_times(s, b, _iteration_terms(s, b)).items()}
    binding = min(per_resource, key=lambda key: (per_resource[key], RESOURCES.index(key)))
    return Bound(tokens_per_s=float(rates[best]), binding_resource=binding,
                 per_resource={k: per_resource[k] for k in RESOURCES if k in per_resource},
                 batch=int(b[0]), iteration_s=float(iteration[best]), **common)


def check_claim(system_a, system_b, ratio: float, *, b_tokens_per_s: float, model,
                mean_prompt: float, mean_output: float, **kwargs) -> ClaimCheck:
    """Is "A serves ``ratio`` times the output tokens/s of B" physically attainable?

    A claim names B's throughput (simulated or measured) as its reference; no closed form
    gives a defensible lower bound on B, so the reference is an input. The claim is
    unattainable when A's upper bound is below ``ratio x b_tokens_per_s``: A would have to
    beat physics. An attainable verdict only means the bound does not rule the claim out.
    B's own bound is reported too: a reference above it is itself impossible.

    Args:
      system_a, system_b: Systems or names.
      ratio: claimed throughput of A over B (> 0).
      b_tokens_per_s: B's throughput the claim is relative to, tokens/s (> 0).
      model, mean_prompt, mean_output: as for :func:`bound`.
      **kwargs: further :func:`bound` arguments (batch, slo_ms, platform, ...), applied to
        both systems.

    Returns:
      ClaimCheck(attainable, explanation, binding_resource of A).
    """
    for field, value in (("ratio", ratio), ("b_tokens_per_s", b_tokens_per_s)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(field, value, "must be a finite number > 0")
    stats = dict(model=model, mean_prompt=mean_prompt, mean_output=mean_output, **kwargs)
    a, b = bound(system_a, **stats), bound(system_b, **stats)
    needed = ratio * b_tokens_per_s
    attainable = a.tokens_per_s >= needed
    most = a.tokens_per_s / b_tokens_per_s
    explanation = (
        f"{a.system} at {ratio:.3g}x {b.system} needs {needed:,.0f} tokens/s; "
        f"{a.system}'s bound is {a.tokens_per_s:,.0f} tokens/s ({a.binding_resource} at "
        f"batch {a.batch}, batch limited by {a.batch_limit}), so at most {most:.3g}x")
    if b_tokens_per_s > b.tokens_per_s:
        explanation += (f"; the reference {b_tokens_per_s:,.0f} tokens/s exceeds "
                        f"{b.system}'s own bound {b.tokens_per_s:,.0f}")
    return ClaimCheck(attainable=attainable, explanation=explanation,
                      binding_resource=a.binding_resource)


def workload_means(workload) -> tuple[float, float]:
    """(mean prompt, mean output) in tokens of a Workload, DatasetStats, dataset name or
    mapping with ``mean_prompt`` and ``mean_output``."""
    if isinstance(workload, str):
        if workload not in DATASETS:
            raise UnknownNameError("workload", workload, DATASETS)
        workload = DATASETS[workload]
    if isinstance(workload, Workload):
        return workload.mean_prompt, workload.mean_output
    if isinstance(workload, DatasetStats):
        return float(workload.prompt_mean), float(workload.output_mean)
    if isinstance(workload, Mapping):
        return float(workload["mean_prompt"]), float(workload["mean_output"])
    raise ConfigError("workload", workload, "need a Workload, DatasetStats, dataset name or "
                      "mapping with mean_prompt and mean_output")


def bounds_table(systems: Iterable, model, workload, slo_ms: float | None = None, *,
                 batch: int | None = None, **kwargs) -> list[dict]:
    """One printable row per system: the bound, its binding resource and every resource.

    Args:
      systems: Systems or names.
      model: a Model or its name.
      workload: Workload, DatasetStats, dataset name or mapping (see workload_means).
      slo_ms, batch: as for :func:`bound`.
      **kwargs: further :func:`bound` arguments.

    Returns:
      dicts with system, model, batch, max_batch, batch_limit, capacity_batch, slo_batch,
      bound_tokens_per_s, binding_resource, iteration_ms and ``<resource>_tokens_per_s``
      for every name in RESOURCES (None where the system does not use the resource).
    """
    mean_prompt, mean_output = workload_means(workload)
    rows = []
    for system in systems:
        b = bound(system, model, mean_prompt=mean_prompt, mean_output=mean_output,
                  batch=batch, slo_ms=slo_ms, **kwargs)
        row = {"system": b.system, "model": b.model, "batch": b.batch,
               "max_batch": b.max_batch, "batch_limit": b.batch_limit,
               "capacity_batch": b.capacity_batch, "slo_batch": b.slo_batch,
               "bound_tokens_per_s": b.tokens_per_s, "binding_resource": b.binding_resource,
               "iteration_ms": b.iteration_s * 1e3}
        row.update({f"{r}_tokens_per_s": b.per_resource.get(r) for r in RESOURCES})
        rows.append(row)
    return rows


def run_bound(system, model, *, prompts, outputs, concurrency: int, prefill: bool = True,
              platform: Platform | None = None, mean_context: float | None = None,
              offered_tokens_per_s: float | None = None, **kwargs) -> Bound:
    """Upper bound on the throughput of one simulated run, from the requests it served.

    A run that prefilled the requests with lengths ``prompts``/``outputs`` and never had more
    than ``concurrency`` of them running cannot beat this, whatever their mix:

    * decode: with ``mean_context`` (a run that measured the mean context of its decoding
      requests, e.g. a steady-state window), the best ``b' <= concurrency`` at that context
      (a step's time is convex in its requests' context, so the mean context under-states
      the mean step time); without it, a step with ``b' <= concurrency`` requests holds at
      least one output token per request beyond its prompt, so its mean context is at
      least ``1 +`` the mean of the ``b'`` smallest prompts, and the bound is the best
      ``b'`` at that context. Capacity and SLO play no part: the run's own concurrency
      obeyed them.
    * whole run (``prefill=True``): at most ``sum(outputs)`` tokens come from
      ``len(prompts)`` prefills costing at least ``P(mean prompt)`` each (P is convex), so
      the prefill share per output token is at least the steady state's at the mean lengths.
    * offered load: a run fed by arrivals cannot serve more than they offer
      (``offered_tokens_per_s``, resource ``arrivals``).

    Args:
      system, model: names or objects.
      prompts, outputs: int [n] lengths of the requests the run admitted, tokens (n >= 1).
      concurrency: the run's largest number of requests running at once (>= 1).
      prefill: bound whole-run throughput (True) or decode-only throughput (False).
      platform: hardware (default the preset).
      mean_context: measured mean context of the decoding requests, tokens, or None.
      offered_tokens_per_s: output tokens the arrivals offer per second (total output
        tokens / the span of the arrivals), or None for a closed loop.
      **kwargs: further :func:`throughput_curve` arguments (access, compute_fraction, ...).

    Returns:
      Bound at the best batch ``b' <= concurrency`` (``batch_limit`` = "run", or
      "arrivals" when the offered load binds; ``capacity_batch`` from the mean lengths,
      ``slo_batch`` None).
    """
    prompts = np.asarray(prompts, np.float64)
    outputs = np.asarray(outputs, np.float64)
    if prompts.ndim != 1 or prompts.size == 0 or prompts.shape != outputs.shape:
        raise ConfigError("prompts", prompts.shape, "need equal-length 1-D arrays of the "
                          "admitted requests' prompt and output lengths (n >= 1)")
    if not isinstance(concurrency, (int, np.integer)) or concurrency < 1:
        raise ConfigError("concurrency", concurrency, "must be an integer >= 1")
    if offered_tokens_per_s is not None and not offered_tokens_per_s > 0:
        raise ConfigError("offered_tokens_per_s", offered_tokens_per_s, "must be > 0")
    if mean_context is None:
        batches = np.arange(1, min(int(concurrency), prompts.size) + 1, dtype=np.float64)
        context = 1.0 + np.cumsum(np.sort(prompts))[:batches.size] / batches
    else:
        batches = np.arange(1, int(concurrency) + 1, dtype=np.float64)
        context = np.full(batches.shape, float(mean_context))
    stats = dict(mean_prompt=float(prompts.mean()), mean_output=float(outputs.mean()),
                 platform=platform, prefill=prefill, **kwargs)
    rates = throughput_curve(system, model, batches, mean_context=context, **stats)
    best = int(np.argmax(rates >= rates.max() * (1.0 - _TIE)))
    s = _setup(system, model, mean_context=context[best], **stats)
    b = batches[best:best + 1]
    per_resource = {key: float(1.0 / time[0]) if time[0] > 0 else math.inf
                    for key, time in _resource_times(s, b, _iteration_terms(s, b)).items()}
    tokens_per_s, limit = float(rates[best]), "run"
    if offered_tokens_per_s is not None:
        per_resource["arrivals"] = float(offered_tokens_per_s)
        if offered_tokens_per_s < tokens_per_s:
            tokens_per_s, limit = float(offered_tokens_per_s), "arrivals"
    binding = min(per_resource, key=lambda key: (per_resource[key], RESOURCES.index(key)))
    return Bound(system=s.system.name, model=s.model.name, tokens_per_s=tokens_per_s,
                 binding_resource=binding,
                 per_resource={k: per_resource[k] for k in RESOURCES if k in per_resource},
                 batch=int(b[0]), max_batch=int(concurrency), batch_limit=limit,
                 capacity_batch=_capacity_batch(s), slo_batch=None,
                 iteration_s=float(_iteration_s(_iteration_terms(s, b))[0]))


def window_bound(system, model, *, prefilled_prompts, decode_tokens: int, concurrency: int,
                 mean_context: float, platform: Platform | None = None,
                 mean_output: float = 1.0, **kwargs) -> Bound:
    """Upper bound on a measured window's throughput (every token over the window's time).

    The window produced ``decode_tokens`` by decode iterations, each at least T_iter(b') /
    b' at its mean context for the best ``b' <= concurrency`` (:func:`run_bound` with
    ``prefill=False``), and prefilled ``prefilled_prompts`` (one first token each), each at
    least ``P(p) / (G phi)`` on the GPUs the decode iterations also need, in series with
    them (prefill priority). So its tokens per second are at most (decode tokens + prompts)
    / (their sum of those times): exact per prompt, with no assumption about how the
    window's prefills relate to its outputs.

    Args:
      system, model: names or objects.
      prefilled_prompts: int [k] prompt lengths of the requests prefilled in the window.
      decode_tokens: tokens decode iterations produced in the window (>= 1).
      concurrency: the window's largest number of requests running at once.
      mean_context: the decoding requests' mean context in the window, tokens.
      platform: hardware; mean_output: unused by the decode part (>= 1);
      **kwargs: further :func:`throughput_curve` arguments.

    Returns:
      Bound (``batch_limit`` "run"): the decode part's binding resource, or
      ``gpu_compute`` when the prefills alone would take longer than the decode tokens.
    """
    prompts = np.asarray(prefilled_prompts, np.float64)
    if decode_tokens < 1:
        raise ConfigError("decode_tokens", decode_tokens, "must be >= 1")
    decode = run_bound(system, model, prompts=np.ones(1), outputs=np.full(1, mean_output),
                       concurrency=concurrency, prefill=False, platform=platform,
                       mean_context=mean_context, **kwargs)
    s = _setup(system, model, mean_prompt=1.0, mean_output=max(mean_output, 1.0),
               mean_context=mean_context, platform=platform, **kwargs)
    seconds_per_flop = s.fc_s_per_token / s.model.fc_flops_per_token  # 1 / (G phi)
    prefill_s = seconds_per_flop * sum(s.model.prefill_flops(float(n)) for n in prompts)
    decode_s = decode_tokens / decode.tokens_per_s
    tokens = decode_tokens + prompts.size
    per_resource = {key: tokens / (decode_tokens / rate) if rate < math.inf else math.inf
                    for key, rate in decode.per_resource.items()}
    compute = decode_tokens / decode.per_resource.get("gpu_compute", math.inf) + prefill_s
    per_resource["gpu_compute"] = tokens / compute if compute > 0 else math.inf
    binding = min(per_resource, key=lambda key: (per_resource[key], RESOURCES.index(key)))
    return dataclasses.replace(decode, tokens_per_s=tokens / (decode_s + prefill_s),
                               binding_resource=binding, per_resource=per_resource)


def offered_load(workload) -> float | None:
    """Output tokens per second a workload's arrivals offer: all its output tokens over
    the span from the first arrival to the last (None when they all arrive at once: a
    closed loop or an offline queue offers whatever the system can take)."""
    span = float(workload.arrival_s[-1] - workload.arrival_s[0])
    return float(np.sum(workload.output_tokens)) / span if span > 0 else None


def bound_columns(system, model, tokens_per_s: float, *, prompts, outputs, concurrency: int,
                  prefill: bool = True, prefix: str = "", **kwargs) -> dict:
    """Columns that set a simulated result beside its bound (:func:`run_bound`).

    Args:
      system, model: names or objects.
      tokens_per_s: the simulated throughput (whole-run with ``prefill=True``, decode-only
        with ``prefill=False``).
      prompts, outputs, concurrency, prefill, **kwargs: as for :func:`run_bound`.
      prefix: prepended to the column names (e.g. "decode_").

    Returns:
      {prefix + "bound_tokens_per_s", prefix + "binding_resource", prefix + "efficiency"}:
      efficiency = tokens_per_s / bound (NaN when the bound is 0).
    """
    b = run_bound(system, model, prompts=prompts, outputs=outputs, concurrency=concurrency,
                  prefill=prefill, **kwargs)
    efficiency = tokens_per_s / b.tokens_per_s if b.tokens_per_s > 0 else math.nan
    return {f"{prefix}bound_tokens_per_s": b.tokens_per_s,
            f"{prefix}binding_resource": b.binding_resource,
            f"{prefix}efficiency": efficiency}


def ratio_ceiling(system_a, *, b_tokens_per_s: float, model, mean_prompt: float,
                  mean_output: float, **kwargs) -> float:
    """The largest A/B throughput ratio physics leaves open: A's :func:`bound` over B's
    throughput ``b_tokens_per_s`` (simulated or measured). A claimed ratio above it is
    unattainable (:func:`check_claim`); studies.sensitivity's what-would-it-take search
    asks where, as one assumption moves, this ceiling first reaches a claimed ratio.

    Args:
      system_a: a System or name; b_tokens_per_s: B's throughput, tokens/s (> 0).
      model, mean_prompt, mean_output, **kwargs: as for :func:`bound`.

    Returns:
      A's bound / ``b_tokens_per_s``.
    """
    if not (math.isfinite(b_tokens_per_s) and b_tokens_per_s > 0):
        raise ConfigError("b_tokens_per_s", b_tokens_per_s, "must be a finite number > 0")
    a = bound(system_a, model, mean_prompt=mean_prompt, mean_output=mean_output, **kwargs)
    return a.tokens_per_s / b_tokens_per_s
