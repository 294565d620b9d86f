"""Time and energy of one serving step, from the counts the engine gathers (PAM_SPEC §2-3).

The engine reduces its [R, U] arrays to the small :class:`StepCounts`; everything physical
happens here, as plain arithmetic on SimParams, so the same formulas serve every system and
every vmapped design point. Sources of the coefficients are in hardware.py and models.py.

Decode step (one token for each of the ``b`` decoding requests):

* FC on the GPUs under TP = t, PP = p: the batch is split into p micro-batches that flow
  through p stages of layers/p layers each. Per stage and micro-batch the time is the
  roofline ``max(FLOPs / (t x achievable FLOP/s), stage weight bytes / (t x achievable
  HBM bytes/s))`` plus two ring all-reduces per layer over NVLink
  (``2 (t-1)/t x bytes / rate + 2 (t-1) x latency``) and a per-layer kernel overhead; the
  iteration takes p of those plus p-1 stage hand-offs. Every micro-batch re-reads its stage's
  weights, which is why PP scales worse than TP for memory-bound decode.
* Attention in PIM (per tier, tiers in parallel, then the serial GPU part): the tier's time
  is the busiest bank group's bytes (its selected KV plus its share of the selection-label
  reads) over the bank group's share of the device's effective rate, plus sending Q to the
  tier (for every request holding KV there) and getting partial results back over its link,
  plus two link latencies per layer; a tier holding no KV of a decoding request is idle.
  With PAMattention the reduction units merge partials inside each device, pipelined with
  the PUs (their time is hidden; their traffic costs bank-group read energy) and one partial
  per request, layer and head leaves the tier. Without it, every active bank group's partial
  leaves the tier and is merged on the GPU.
* Attention on the GPUs (vLLM-offload): HBM-resident KV is read at the GPUs' achievable HBM
  rate (roofline with the attention FLOPs); DDR- and SSD-resident KV is first fetched over
  PCIe (the slower of the tier's links and the GPUs' PCIe), not overlapped.
* Migration: moved bytes over the slower link of each tier pair, times the slowdown of the
  path (1 for the PAM interface, 20 for a CPU re-layout); only the part that does not fit
  under ``migration_overlap`` x attention time is exposed.

Prefill (prefill-priority continuous batching: admitted prompts are processed in the same
iteration, before the decode work): FLOPs over all GPUs at the achievable rate, one pass of
the weights, the KV written to each tier over its link (tiers in parallel), kernel overhead.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from pamjax.types import SimParams


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
      tokens of that request (partials produced per device).
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

    return StepCounts(
        decode_requests=zeros(), decode_context=zeros(), tier_tokens=zeros(3),
        tier_selected=zeros(3), tier_busiest_bank_group=zeros(3), tier_requests=zeros(3),
        tier_holders=zeros(3), tier_active_bank_groups=zeros(3), prefill_tokens=zeros(),
        prefill_pairs=zeros(), prefill_tier_tokens=zeros(3), migrated_tokens=zeros(3, 3),
        sparse=zeros())


@struct.dataclass
class StepCost:
    """Step time (s), attention time (s), per-tier attention time (s, [T]), energy (pJ, [C])."""

    time_s: jnp.ndarray
    attention_s: jnp.ndarray
    tier_attention_s: jnp.ndarray
    energy_pj: jnp.ndarray


LABEL_FRACTION_OF_KV = 1.0 / 16.0  # Double Sparsity label = 1/8 of the key = 1/16 of K+V [D]
PARTIAL_BYTES_PER_HEAD_DIM = 4.0  # partial results (o, m, l) travel in float32


def decode_fc_time(params: SimParams, batch):
    """GPU time of the FC layers for one decode iteration of ``batch`` requests, s."""
    t, p = params.tp, params.pp
    micro = batch / p
    flops = params.fc_flops_per_token * micro / p
    weight_bytes = params.streamed_weight_bytes / p
    roofline = jnp.maximum(flops / (t * params.gpu_flops), weight_bytes / (t * params.gpu_mem_rate))
    act_bytes = micro * params.hidden * 2.0
    allreduce = 2.0 * (t - 1.0) / t * act_bytes / params.nvlink_rate \
        + 2.0 * (t - 1.0) * params.gpu_link_latency
    stage_layers = params.layers / p
    per_micro = roofline + stage_layers * (2.0 * allreduce + params.kernel_overhead)
    handoff = act_bytes / params.nvlink_rate + params.gpu_link_latency
    return jnp.where(batch > 0, p * per_micro + (p - 1.0) * handoff, 0.0)


def prefill_time_and_flops(params: SimParams, counts: StepCounts):
    """GPU time (s) and FLOPs of one step's prefill: FC and causal-attention FLOPs of the
    step's prompt tokens on all GPUs (roofline with one weight read per TP group), plus
    writing their KV to the busiest tier's link and per-layer kernel overhead.

    Args:
      params: SimParams; counts: StepCounts (prefill_tokens, prefill_pairs,
        prefill_tier_tokens [T]).

    Returns:
      (time s, FLOPs), f32 scalars (0 when the step prefills nothing).
    """
    flops = params.fc_flops_per_token * counts.prefill_tokens \
        + 4.0 * params.layers * params.q_heads * params.head_dim * counts.prefill_pairs
    compute = flops / (params.num_gpus * params.gpu_flops)
    weights = params.streamed_weight_bytes / (params.tp * params.gpu_mem_rate)
    kv_write = jnp.max(counts.prefill_tier_tokens * params.kv_bytes_per_token / params.link_rate)
    time = jnp.maximum(compute, weights) + kv_write + params.layers * params.kernel_overhead
    return jnp.where(counts.prefill_tokens > 0, time, 0.0), flops


def step_cost(params: SimParams, counts: StepCounts, *, smooth_max=None,
              tier_in_use=None) -> StepCost:
    """Time and energy of one step. See the module docstring for the model.

    The two optional hooks exist for the differentiable relaxation (relaxed.py), so that it
    shares every coefficient of this model instead of copying it; with both left at None
    the result is the exact cost model, bit for bit.

    Args:
      params: SimParams of the configuration.
      counts: StepCounts of the step.
      smooth_max: f32 [T] -> f32 [] replacing the max over tiers of PIM attention time (the
        step's critical path), e.g. a log-sum-exp; None = ``jnp.max``.
      tier_in_use: f32 [T] in [0, 1], a soft "the tier holds KV of a decoding request"
        indicator gating each tier's PIM time; None = ``counts.tier_holders > 0``.
    """
    kv = params.kv_bytes_per_token
    bits = 8.0
    layers, heads, dim = params.layers, params.q_heads, params.head_dim
    on_pim = params.attention_on_pim

    # --- attention in PIM ------------------------------------------------------------------
    selected_bytes = counts.tier_selected * kv
    label_bytes = counts.sparse * counts.tier_tokens * kv * LABEL_FRACTION_OF_KV
    bank_group_rate = params.device_rate / params.bank_groups_per_device
    busiest_bytes = counts.tier_busiest_bank_group * kv / params.num_devices \
        + label_bytes / (params.num_devices * params.bank_groups_per_device)
    compute = busiest_bytes / bank_group_rate
    q_bytes = counts.tier_holders * layers * heads * dim * 2.0
    partial = layers * heads * (dim + 2.0) * PARTIAL_BYTES_PER_HEAD_DIM
    partials_out = jnp.where(params.use_pamattention, counts.tier_requests,
                             counts.tier_active_bank_groups) * partial
    if tier_in_use is None:
        link = (q_bytes + partials_out) / params.link_rate \
            + jnp.where(counts.tier_holders > 0, 2.0 * layers * params.link_latency, 0.0)
        pim_tier_time = jnp.where(counts.tier_holders > 0, compute + link, 0.0)
    else:
        link = (q_bytes + partials_out) / params.link_rate + 2.0 * layers * params.link_latency
        pim_tier_time = tier_in_use * (compute + link)

    # --- attention on the GPUs (offloaded KV fetched over PCIe) ----------------------------
    gpus = params.num_gpus
    gpu_attn_flops = 4.0 * layers * heads * dim * jnp.sum(counts.tier_selected)
    hbm_read = selected_bytes[0] / (gpus * params.gpu_mem_rate)
    fetch_rate = jnp.minimum(params.link_rate, gpus * params.pcie_rate)
    fetch = selected_bytes / fetch_rate
    gpu_tier_time = jnp.stack([
        jnp.maximum(hbm_read, gpu_attn_flops / (gpus * params.gpu_flops)), fetch[1], fetch[2]])

    tier_time = jnp.where(on_pim, pim_tier_time, gpu_tier_time)
    attention = jnp.where(on_pim, (smooth_max or jnp.max)(tier_time), jnp.sum(tier_time))

    # --- migration -------------------------------------------------------------------------
    moved_bytes = counts.migrated_tokens * kv  # [T, T] from -> to
    pair_rate = jnp.minimum(params.link_rate[:, None], params.link_rate[None, :])
    migration = jnp.sum(moved_bytes / pair_rate) * params.migration_slowdown
    migration_exposed = jnp.maximum(migration - params.migration_overlap * attention, 0.0)

    fc = decode_fc_time(params, counts.decode_requests)
    prefill, prefill_flops = prefill_time_and_flops(params, counts)
    time = prefill + fc + attention + migration_exposed

    # --- energy (pJ) -------------------------------------------------------------------------
    b = counts.decode_requests
    decode_flops = params.fc_flops_per_token * b
    gpu_compute = params.gpu_pj_per_flop * (
        decode_flops + prefill_flops + jnp.where(on_pim, 0.0, gpu_attn_flops))
    weight_reads = jnp.where(b > 0, params.pp * params.streamed_weight_bytes, 0.0) \
        + jnp.where(counts.prefill_tokens > 0, params.streamed_weight_bytes, 0.0)
    gpu_memory = bits * params.gpu_hbm_read_pj * (
        weight_reads + jnp.where(on_pim, 0.0, selected_bytes[0]))
    pim_attention = jnp.where(on_pim, bits * jnp.sum(
        (selected_bytes + label_bytes) * params.pim_read_pj * (1.0 + params.pim_pu_factor)), 0.0)
    reduction = jnp.where(on_pim, bits * params.bank_group_read_pj * jnp.sum(
        counts.tier_active_bank_groups * partial), 0.0)
    link_pj = jnp.stack([params.nvlink_pj, params.pcie_pj, params.pcie_pj])
    allreduce_bytes = jnp.where(
        b > 0, 2.0 * layers * 2.0 * (params.tp - 1.0) / params.tp * b * params.hidden * 2.0, 0.0)
    transfer = bits * (
        jnp.where(on_pim, jnp.sum((q_bytes + partials_out) * link_pj), 0.0)
        + jnp.where(on_pim, 0.0, jnp.sum(selected_bytes[1:] * params.host_read_pj[1:]))
        + params.nvlink_pj * allreduce_bytes
        + jnp.sum(counts.prefill_tier_tokens * kv * link_pj))
    pair_pj = params.pim_read_pj[:, None] + params.pim_read_pj[None, :] \
        + jnp.maximum(link_pj[:, None], link_pj[None, :])
    migration_pj = bits * jnp.sum(moved_bytes * pair_pj)
    energy = jnp.stack([gpu_compute, gpu_memory, pim_attention, reduction, transfer,
                        migration_pj])
    return StepCost(time_s=time, attention_s=attention, tier_attention_s=tier_time, energy_pj=energy)
