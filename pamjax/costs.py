"""Time and energy of one serving step, from the counts the engine gathers (PAM_SPEC §2-3).

The engine reduces its [R, U] arrays to the small :class:`StepCounts`; everything physical
happens here, as plain arithmetic on SimParams, so the same formulas serve every system and
every vmapped design point. Sources of the coefficients are in hardware.py and models.py;
``docs/model.md`` writes every equation out with its parameters and sources.

Decode step (one token for each of the ``b`` decoding requests):

* **FC on the GPUs** under TP = t, PP = p: the batch is split into p micro-batches that flow
  through p stages of layers/p layers each. Per stage and micro-batch the time is the
  roofline ``max(FLOPs / (t x achievable FLOP/s), stage weight bytes / (t x achievable HBM
  bytes/s))`` plus two ring all-reduces per layer (``2 (t-1)/t x bytes / rate + 2 (t-1) x
  latency``, NVLink inside a node, RDMA once the TP group spans nodes) and a per-layer
  kernel overhead; the iteration takes p of those plus p-1 stage hand-offs. Every
  micro-batch re-reads its stage's weights, which is why PP scales worse than TP.
* **Attention in PIM** (tiers in parallel; a tier counts while it holds KV of a decoding
  request, is written or moves KV). A tier's time = its devices' time + its path's time +
  its round trips:

  - devices: max(busiest bank group's bytes / that bank group's own rate, a device's bytes
    / the device's effective rate): attended KV and the selection labels of every token it
    holds (sparse systems), at the GQA-aware rates of hardware.py, plus the KV it writes
    (decode tokens) and migrates at the device's internal rate;
  - path: the bytes crossing the tier's path (Q to every request holding KV there; partial
    results back: one per request with PAMattention, one per FlashDecoding chunk without;
    the local top-k label scores of sparse systems; the new tokens' K/V and labels; migrated
    KV) over each link on it: the tier's own device interfaces, and for DDR and SSD the
    GPUs' PCIe, which they share with each other (and with migration to and from HBM), so
    the path time is the busiest link's bytes / its rate; no free overlap;
  - round trips: two link latencies per layer (Q out, partials back), two more for the
    top-k gather of a sparse system.

  The reduction units merge bank-group partials inside each device, pipelined with the PUs
  (their time is hidden, their traffic costs bank-group read energy), for every PIM system.
* **Attention on the GPUs** (vLLM-offload): HBM-resident KV is read at the GPUs' achievable
  HBM rate (roofline with the attention FLOPs); DDR- and SSD-resident KV is first fetched
  over its path (the DIMM channels or NVMe links, and PCIe, shared by both), not overlapped.
* **Migration** of KV between tiers (PAM's swaps and displacements): moved bytes cross the
  links of the path between the two tiers (HBM<->DDR/SSD: PCIe; DDR<->SSD: the host, so
  only the DIMM channels and NVMe), times the path's slowdown (1 for the PAM interface, 20
  for a CPU re-layout), and are read and written at the devices' internal rates, sharing
  links and devices with the step's attention traffic.

Prefill (prefill-priority continuous batching: admitted prompts are processed in the same
iteration, before the decode work): FLOPs over all GPUs at the achievable rate, one pass of
the weights, two all-reduces per layer of the prompt activations (per pipeline stage), the
KV (and labels) written over each tier's path, kernel overhead.

Energy (pJ): GPU FLOPs, GPU HBM reads, PIM reads (times the read passes) plus PU arithmetic
(pim_pu_factor x read energy per FLOP per byte, 2 g / w FLOPs per KV byte for g query heads
per KV head and w bytes per element), reduction-unit traffic, every byte on a link,
migration, and static power: the platform's idle power for the step's time and any idle
clock jump (engine.py adds the idle part), so a slow system pays for its time.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from pamjax.types import DDR, ENERGY_COMPONENTS, HBM, NUM_TIERS, SSD, SimParams


@struct.dataclass
class StepCounts:
    """Per-step reductions of the engine state (all f32).

    decode_requests []: requests decoding this step.
    decode_context []: sum of their context lengths, tokens.
    tier_tokens [T]: tokens of decoding requests held on each tier.
    tier_selected [T]: attended tokens on each tier.
    tier_busiest_bank_group [T]: attended tokens in the busiest bank group of each tier
      (pages spread over bank groups, placement.spread_over_pages).
    tier_requests [T]: decoding requests with attended tokens on each tier.
    tier_holders [T]: decoding requests with any KV on each tier (Q goes to every tier that
      holds KV of the request: it scores the labels there even when it attends nothing).
    tier_active_bank_groups [T]: sum over decoding requests of bank groups holding attended
      tokens of that request (partials the reduction units merge inside each device).
    tier_active_chunks [T]: sum over decoding requests of the FlashDecoding chunks
      (``decode_split_tokens`` consecutive positions) with attended tokens on each tier:
      the partials that leave the tier without PAMattention.
    tier_topk_candidates [T]: sum over decoding requests of min(tokens on the tier, the
      request's top-k): the label scores a sparse system gathers from each tier.
    tier_decode_writes [T]: decode tokens whose K/V is written to each tier this step.
    prefill_tokens [], prefill_pairs []: sum of prompt lengths n and of n (n + 1) / 2.
    prefill_tier_tokens [T]: prompt tokens written to each tier.
    migrated_tokens [T, T]: tokens moved from tier i to tier j.
    sparse []: 1 when attention is sparse (selection-label reads happen), else 0.
    """

    decode_requests: jnp.ndarray
    decode_context: jnp.ndarray
    tier_tokens: jnp.ndarray
    tier_selected: jnp.ndarray
    tier_busiest_bank_group: jnp.ndarray
    tier_requests: jnp.ndarray
    tier_holders: jnp.ndarray
    tier_active_bank_groups: jnp.ndarray
    tier_active_chunks: jnp.ndarray
    tier_topk_candidates: jnp.ndarray
    tier_decode_writes: jnp.ndarray
    prefill_tokens: jnp.ndarray
    prefill_pairs: jnp.ndarray
    prefill_tier_tokens: jnp.ndarray
    migrated_tokens: jnp.ndarray
    sparse: jnp.ndarray


def empty_counts(shape=()) -> StepCounts:
    """StepCounts of nothing (every field zero, f32 with a leading ``shape``): the start of
    an engine's counts when it fills only some fields (the event leap)."""
    def zeros(*trailing):
        return jnp.zeros(tuple(shape) + trailing, jnp.float32)

    per_tier = ("tier_tokens", "tier_selected", "tier_busiest_bank_group", "tier_requests",
                "tier_holders", "tier_active_bank_groups", "tier_active_chunks",
                "tier_topk_candidates", "tier_decode_writes", "prefill_tier_tokens")
    return StepCounts(decode_requests=zeros(), decode_context=zeros(), prefill_tokens=zeros(),
                      prefill_pairs=zeros(), sparse=zeros(),
                      migrated_tokens=zeros(NUM_TIERS, NUM_TIERS),
                      **{name: zeros(NUM_TIERS) for name in per_tier})


@struct.dataclass
class StepCost:
    """Step time (s), attention time (s, migration sharing its links included), per-tier
    attention time (s, [T]), energy (pJ, [C], static power for the step's busy time)."""

    time_s: jnp.ndarray
    attention_s: jnp.ndarray
    tier_attention_s: jnp.ndarray
    energy_pj: jnp.ndarray


LABEL_FRACTION_OF_KV = 1.0 / 16.0  # Double Sparsity label = 1/8 of the key = 1/16 of K+V [D]
PARTIAL_BYTES_PER_HEAD_DIM = 4.0  # partial results (o, m, l) travel in float32
TOPK_BYTES_PER_CANDIDATE = 8.0  # a label score (f32) and its token index (i32)
BITS = 8.0


def allreduce_s(params: SimParams, tokens):
    """One ring all-reduce of ``tokens`` tokens' activations (16-bit, hidden wide) across
    the tensor-parallel group: 2 (t-1)/t x bytes / rate + 2 (t-1) x latency, s."""
    t = params.tp
    return 2.0 * (t - 1.0) / t * tokens * params.hidden * 2.0 / params.collective_rate \
        + 2.0 * (t - 1.0) * params.collective_latency


def streamed_weights(params: SimParams, tokens):
    """Weight bytes a pass of ``tokens`` tokens reads: every non-expert weight once, and of
    a mixture of experts' routed experts the fraction the tokens touch under uniform
    routing, ``1 - (1 - k / E) ** tokens`` (models.Model.streamed_weight_bytes_for_batch);
    every weight for a dense model."""
    untouched = (1.0 - params.expert_route_fraction) ** tokens
    return params.streamed_weight_bytes - params.routed_weight_bytes * untouched


def decode_fc_time(params: SimParams, batch):
    """GPU time of the FC layers for one decode iteration of ``batch`` requests, s."""
    t, p = params.tp, params.pp
    micro = batch / p
    flops = params.fc_flops_per_token * micro / p
    weight_bytes = streamed_weights(params, micro) / p
    roofline = jnp.maximum(flops / (t * params.gpu_flops), weight_bytes / (t * params.gpu_mem_rate))
    act_bytes = micro * params.hidden * 2.0
    stage_layers = params.layers / p
    per_micro = roofline + stage_layers * (2.0 * allreduce_s(params, micro)
                                           + params.kernel_overhead)
    handoff = act_bytes / params.nvlink_rate + params.gpu_link_latency
    return jnp.where(batch > 0, p * per_micro + (p - 1.0) * handoff, 0.0)


def path_times(params: SimParams, tier_bytes, moved_bytes):
    """Busy time of every link the step's transfers use, s.

    Args:
      params: SimParams.
      tier_bytes: f32 [T] bytes between the GPUs and each tier (both directions).
      moved_bytes: f32 [T, T] bytes migrated from tier i to tier j.

    Returns:
      f32 [T]: each tier's path time, the busiest link on its path. A link's bytes: the
      tier's own device interfaces carry its GPU traffic and every move touching it; the
      GPUs' PCIe carries the host-side tiers' GPU traffic and the moves between HBM and a
      host-side tier. Migration bytes count ``migration_slowdown`` times
      (a CPU re-layout is that much slower than the PAM interface).
    """
    behind = params.behind_pcie
    moved = moved_bytes * params.migration_slowdown
    touching = jnp.sum(moved, 0) + jnp.sum(moved, 1)  # into + out of each tier
    own_link = (tier_bytes + touching) / params.link_rate
    # A move crosses PCIe when exactly one end is behind it (HBM <-> DDR or SSD).
    crosses = behind[:, None] != behind[None, :]
    pcie_bytes = jnp.sum(behind * tier_bytes) + jnp.sum(jnp.where(crosses, moved, 0.0))
    pcie = pcie_bytes / (params.num_gpus * params.pcie_rate)
    return jnp.maximum(own_link, behind * pcie)


def migration_link_s(params: SimParams, migrated_tokens):
    """Busy time of the busiest link that ``migrated_tokens`` (f32 [T, T], tokens from tier
    i to tier j) alone would occupy, s (path_times without GPU traffic): the link load a
    learned placement policy sees (types.LifetimeView), the same function in the exact
    engine and the relaxation."""
    moved = jnp.asarray(migrated_tokens, jnp.float32) * params.kv_bytes_per_token
    return jnp.max(path_times(params, jnp.zeros(NUM_TIERS, jnp.float32), moved))


def attention_flops_per_token(params: SimParams):
    """FLOPs to attend one KV token for one query token, f32: a multiply-add (2 FLOPs) per
    element of its K and of its V for every query head of every layer, 4 L Hq D."""
    return 4.0 * params.layers * params.q_heads * params.head_dim


def prefill_time_and_flops(params: SimParams, counts: StepCounts):
    """GPU time (s) and FLOPs of one step's prefill: FC and causal-attention FLOPs of the
    step's prompt tokens on all GPUs (roofline with one weight read per TP group), two
    all-reduces per layer of the prompt activations, writing their KV (and labels) over
    each tier's path, and per-layer kernel overhead.

    Args:
      params: SimParams; counts: StepCounts (prefill_tokens, prefill_pairs,
        prefill_tier_tokens [T]).

    Returns:
      (time s, FLOPs), f32 scalars (0 when the step prefills nothing).
    """
    n = counts.prefill_tokens
    flops = params.fc_flops_per_token * n \
        + attention_flops_per_token(params) * counts.prefill_pairs
    compute = flops / (params.num_gpus * params.gpu_flops)
    weights = streamed_weights(params, n) / (params.tp * params.gpu_mem_rate)
    # Each pipeline stage all-reduces every prompt token's activations twice per layer of
    # its own; the stages work on different micro-batches at once (as the FLOPs above).
    allreduce = params.layers / params.pp * 2.0 * allreduce_s(params, n)
    write_bytes = counts.prefill_tier_tokens * params.kv_bytes_per_token \
        * (1.0 + counts.sparse * LABEL_FRACTION_OF_KV)
    link = path_times(params, write_bytes, jnp.zeros((NUM_TIERS, NUM_TIERS)))
    time = jnp.maximum(compute, weights) + allreduce + jnp.max(link) \
        + params.layers * params.kernel_overhead
    return jnp.where(n > 0, time, 0.0), flops


def step_cost(params: SimParams, counts: StepCounts, *, smooth_max=None,
              tier_in_use=None) -> StepCost:
    """Time and energy of one step. See the module docstring for the model.

    The two optional hooks exist for the differentiable relaxation (learn/relaxed.py), so
    that it shares every coefficient of this model instead of copying it; with both left at
    None the result is the exact cost model, bit for bit.

    Args:
      params: SimParams of the configuration.
      counts: StepCounts of the step.
      smooth_max: f32 [T] -> f32 [] replacing the max over tiers of PIM attention time (the
        step's critical path), e.g. a log-sum-exp; None = ``jnp.max``.
      tier_in_use: f32 [T] in [0, 1], a soft "the tier holds KV of a decoding request"
        indicator gating each tier's PIM time; None = exact (round trips where a decoding
        request holds KV, transfer and device time wherever bytes go).
    """
    kv = params.kv_bytes_per_token
    layers, heads, dim = params.layers, params.q_heads, params.head_dim
    on_pim = params.attention_on_pim
    sparse = counts.sparse
    moved_bytes = counts.migrated_tokens * kv  # [T, T] from -> to
    label_per_kv = sparse * LABEL_FRACTION_OF_KV

    # --- attention in PIM ------------------------------------------------------------------
    selected_bytes = counts.tier_selected * kv
    label_bytes = sparse * counts.tier_tokens * kv * LABEL_FRACTION_OF_KV
    devices = params.num_devices
    busiest = counts.tier_busiest_bank_group * kv / devices \
        + label_bytes / (devices * params.bank_groups_per_device)
    device_bytes = (selected_bytes + label_bytes) / devices
    compute = jnp.maximum(busiest / params.bank_group_rate, device_bytes / params.device_rate)
    write_bytes = counts.tier_decode_writes * kv * (1.0 + label_per_kv)
    moved_here = jnp.sum(moved_bytes, 0) + jnp.sum(moved_bytes, 1)
    device_io = (write_bytes + moved_here) / (devices * params.device_internal_rate)
    q_bytes = counts.tier_holders * layers * heads * dim * 2.0
    partial = layers * heads * (dim + 2.0) * PARTIAL_BYTES_PER_HEAD_DIM
    partials_out = jnp.where(params.use_pamattention, counts.tier_requests,
                             counts.tier_active_chunks) * partial
    topk_bytes = sparse * counts.tier_topk_candidates * layers * params.kv_heads \
        * TOPK_BYTES_PER_CANDIDATE
    pim_path_bytes = q_bytes + partials_out + topk_bytes + write_bytes
    pim_path = path_times(params, pim_path_bytes, moved_bytes)
    round_trips = (2.0 + 2.0 * sparse) * layers * params.link_latency
    if tier_in_use is None:
        # Round trips for the requests holding KV there; transfers wherever bytes go.
        pim_tier_time = jnp.where(counts.tier_holders > 0, round_trips, 0.0) \
            + compute + device_io + pim_path
    else:
        pim_tier_time = tier_in_use * (compute + device_io + pim_path + round_trips)

    # --- attention on the GPUs (offloaded KV fetched over its path) ------------------------
    gpus = params.num_gpus
    gpu_attn_flops = attention_flops_per_token(params) * jnp.sum(counts.tier_selected)
    hbm_read = selected_bytes[HBM] / (gpus * params.gpu_mem_rate)
    gpu_part = jnp.maximum(hbm_read, gpu_attn_flops / (gpus * params.gpu_flops))
    host_side = jnp.arange(NUM_TIERS) != HBM
    fetched = jnp.where(host_side, selected_bytes, 0.0)
    fetch_path = path_times(params, fetched + jnp.where(host_side, write_bytes, 0.0),
                            jnp.zeros((NUM_TIERS, NUM_TIERS)))
    gpu_tier_time = jnp.stack([gpu_part, fetch_path[DDR], fetch_path[SSD]])

    tier_time = jnp.where(on_pim, pim_tier_time, gpu_tier_time)
    attention = jnp.where(on_pim, (smooth_max or jnp.max)(tier_time),
                          gpu_part + jnp.max(fetch_path[1:]))

    fc = decode_fc_time(params, counts.decode_requests)
    prefill, prefill_flops = prefill_time_and_flops(params, counts)
    time = prefill + fc + attention

    energy = _energy(params, counts, time, on_pim, selected_bytes, label_bytes, write_bytes,
                     moved_bytes, q_bytes + partials_out + topk_bytes, partial, fetched,
                     gpu_attn_flops, prefill_flops)
    return StepCost(time_s=time, attention_s=attention, tier_attention_s=tier_time,
                    energy_pj=energy)


def _energy(params, counts, time, on_pim, selected_bytes, label_bytes, write_bytes,
            moved_bytes, pim_link_bytes, partial, fetched, gpu_attn_flops, prefill_flops):
    """Energy of the step per component (pJ, [C] in ENERGY_COMPONENTS order)."""
    b = counts.decode_requests
    layers = params.layers
    gpu_compute = params.gpu_pj_per_flop * (
        params.fc_flops_per_token * b + prefill_flops + jnp.where(on_pim, 0.0, gpu_attn_flops))
    weight_reads = jnp.where(b > 0, params.pp * streamed_weights(params, b / params.pp), 0.0) \
        + jnp.where(counts.prefill_tokens > 0, streamed_weights(params, counts.prefill_tokens),
                    0.0)
    gpu_memory = BITS * params.gpu_hbm_read_pj * (
        weight_reads + jnp.where(on_pim, 0.0, selected_bytes[HBM]))
    # PIM: each byte read once per pass over it, and the PUs do a token's attention FLOPs
    # over its KV bytes, 2 g / w FLOPs per KV byte (g for 16-bit KV, 2 g for FP8; PAM_SPEC §2:
    # PU arithmetic = pim_pu_factor x the read energy of the bytes processed).
    flops_per_byte = attention_flops_per_token(params) / params.kv_bytes_per_token
    pim_attention = jnp.where(on_pim, BITS * jnp.sum(
        (selected_bytes + label_bytes) * params.pim_read_pj
        * (params.read_passes + params.pim_pu_factor * flops_per_byte)), 0.0)
    reduction = jnp.where(on_pim, BITS * params.bank_group_read_pj * jnp.sum(
        counts.tier_active_bank_groups * partial), 0.0)
    link_pj = jnp.stack([params.nvlink_pj, params.pcie_pj, params.pcie_pj])
    t = params.tp
    allreduce_bytes = 2.0 * layers * 2.0 * (t - 1.0) / t * params.hidden * 2.0 \
        * (b + counts.prefill_tokens)
    prefill_bytes = counts.prefill_tier_tokens * params.kv_bytes_per_token \
        * (1.0 + counts.sparse * LABEL_FRACTION_OF_KV)
    transfer = BITS * (
        jnp.where(on_pim, jnp.sum(pim_link_bytes * link_pj), 0.0)
        + jnp.where(on_pim, 0.0, jnp.sum(fetched * params.host_read_pj))
        + jnp.sum((write_bytes + prefill_bytes) * (link_pj + params.pim_read_pj))
        + params.nvlink_pj * allreduce_bytes)
    pair_pj = params.pim_read_pj[:, None] + params.pim_read_pj[None, :] \
        + jnp.maximum(link_pj[:, None], link_pj[None, :])
    migration = BITS * jnp.sum(moved_bytes * pair_pj)
    static = params.static_power_w * time * 1e12
    parts = dict(gpu_compute=gpu_compute, gpu_memory=gpu_memory, pim_attention=pim_attention,
                 reduction=reduction, transfer=transfer, migration=migration, static=static)
    return jnp.stack([parts[name] for name in ENERGY_COMPONENTS])


def static_energy_pj(params: SimParams, seconds):
    """Static energy of ``seconds`` of simulated time (e.g. an idle clock jump), pJ."""
    return params.static_power_w * seconds * 1e12
