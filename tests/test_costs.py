"""Unit tests of pamjax.costs: each term of the step cost against hand arithmetic.

Every test builds StepCounts by hand (no engine), evaluates costs.step_cost in float64 and
compares with the formula written out here from the parameters, then changes one input and
checks the predicted effect (a counterfactual).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pamjax import costs, systems
from pamjax.types import DDR, ENERGY_COMPONENTS, HBM, SSD


def params_for(system, model="llama3-70b"):
    params = systems.make_params(system, model, max_batch=64)
    return jax.tree.map(lambda x: np.asarray(x, np.float64) if np.asarray(x).dtype.kind == "f"
                        else np.asarray(x), params)


def counts(**fields):
    base = {f: np.zeros(()) for f in ("decode_requests", "decode_context", "prefill_tokens",
                                      "prefill_pairs", "sparse")}
    base.update({f: np.zeros(3) for f in ("tier_tokens", "tier_selected",
                                           "tier_busiest_bank_group", "tier_requests",
                                           "tier_holders", "tier_active_bank_groups",
                                           "prefill_tier_tokens")})
    base["migrated_tokens"] = np.zeros((3, 3))
    base.update({k: np.asarray(v, np.float64) for k, v in fields.items()})
    return costs.StepCounts(**base)


def cost(params, c):
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, costs.step_cost(params, c))


def test_decode_fc_time_is_the_roofline_plus_collectives():
    p = params_for("attacc")
    b = 64.0
    t, pp = float(p.tp), float(p.pp)
    micro = b / pp
    roofline = max(float(p.fc_flops_per_token) * micro / pp / (t * float(p.gpu_flops)),
                   float(p.streamed_weight_bytes) / pp / (t * float(p.gpu_mem_rate)))
    act = micro * float(p.hidden) * 2.0
    allreduce = 2 * (t - 1) / t * act / float(p.nvlink_rate) \
        + 2 * (t - 1) * float(p.gpu_link_latency)
    per_micro = roofline + float(p.layers) / pp * (2 * allreduce + float(p.kernel_overhead))
    handoff = act / float(p.nvlink_rate) + float(p.gpu_link_latency)
    expected = pp * per_micro + (pp - 1) * handoff
    with jax.enable_x64(True):
        got = float(costs.decode_fc_time(p, np.float64(b)))
    assert got == pytest.approx(expected, rel=1e-12)
    with jax.enable_x64(True):
        assert float(costs.decode_fc_time(p, np.float64(0.0))) == 0.0


def test_pim_tier_time_is_the_busiest_bank_group_plus_its_link():
    # Dense attention on one tier: 1000 tokens selected, the busiest bank group 10 of them
    # per device (after interleaving over the devices), one request holding KV on HBM.
    p = params_for("attacc")
    kv = float(p.kv_bytes_per_token)
    c = counts(decode_requests=1, decode_context=1000, tier_tokens=[1000, 0, 0],
               tier_selected=[1000, 0, 0], tier_busiest_bank_group=[10 * 40, 0, 0],
               tier_requests=[1, 0, 0], tier_holders=[1, 0, 0],
               tier_active_bank_groups=[100, 0, 0])
    layers, heads, dim = float(p.layers), float(p.q_heads), float(p.head_dim)
    bank_group_rate = float(p.device_rate[HBM]) / float(p.bank_groups_per_device[HBM])
    compute = 10 * 40 * kv / float(p.num_devices[HBM]) / bank_group_rate
    q = layers * heads * dim * 2.0
    partial = layers * heads * (dim + 2.0) * costs.PARTIAL_BYTES_PER_HEAD_DIM
    link = (q + partial) / float(p.link_rate[HBM]) + 2 * layers * float(p.link_latency[HBM])
    got = cost(p, c)
    assert float(got.tier_attention_s[HBM]) == pytest.approx(compute + link, rel=1e-12)
    assert float(got.tier_attention_s[DDR]) == float(got.tier_attention_s[SSD]) == 0.0
    assert float(got.attention_s) == pytest.approx(compute + link, rel=1e-12)
    # Counterfactual: central reduction sends one partial per active bank group (100).
    central = cost(p.replace(use_pamattention=np.asarray(False)), c)
    extra = 99 * partial / float(p.link_rate[HBM])
    assert float(central.attention_s) == pytest.approx(compute + link + extra, rel=1e-12)


def test_pim_tiers_run_in_parallel_gpu_tiers_in_series():
    c = counts(decode_requests=1, decode_context=300, tier_tokens=[100, 100, 100],
               tier_selected=[100, 100, 100], tier_busiest_bank_group=[1, 1, 1],
               tier_requests=[1, 1, 1], tier_holders=[1, 1, 1],
               tier_active_bank_groups=[1, 1, 1])
    pim = cost(params_for("l-pim"), c)
    assert float(pim.attention_s) == pytest.approx(float(np.max(pim.tier_attention_s)))
    gpu = cost(params_for("vllm-offload"), c)
    assert float(gpu.attention_s) == pytest.approx(float(np.sum(gpu.tier_attention_s)))
    # vLLM fetches offloaded KV over the slower of the tier's link and the GPUs' PCIe.
    p = params_for("vllm-offload")
    fetch = 100 * float(p.kv_bytes_per_token) / min(float(p.link_rate[SSD]),
                                                      float(p.num_gpus) * float(p.pcie_rate))
    assert float(gpu.tier_attention_s[SSD]) == pytest.approx(fetch, rel=1e-12)


def test_migration_is_exposed_beyond_the_overlap():
    p = params_for("pam")
    moved = np.zeros((3, 3))
    moved[SSD, DDR] = 1000
    c = counts(migrated_tokens=moved)
    rate = min(float(p.link_rate[SSD]), float(p.link_rate[DDR]))
    migration = 1000 * float(p.kv_bytes_per_token) / rate * float(p.migration_slowdown)
    got = cost(p, c)
    # No decode, no attention: the whole migration is exposed.
    assert float(got.time_s) == pytest.approx(migration, rel=1e-12)
    # The energy of the move: both devices' reads plus the slower link's transfer.
    pair_pj = float(p.pim_read_pj[SSD]) + float(p.pim_read_pj[DDR]) + float(p.pcie_pj)
    migration_pj = got.energy_pj[ENERGY_COMPONENTS.index("migration")]
    assert float(migration_pj) == pytest.approx(
        8 * 1000 * float(p.kv_bytes_per_token) * pair_pj, rel=1e-12)


def test_prefill_time_is_compute_or_weights_plus_kv_write():
    p = params_for("ls-pim")
    n = 2000.0
    c = counts(prefill_tokens=n, prefill_pairs=n * (n + 1) / 2,
               prefill_tier_tokens=[1500, 500, 0])
    flops = float(p.fc_flops_per_token) * n \
        + 4 * float(p.layers) * float(p.q_heads) * float(p.head_dim) * n * (n + 1) / 2
    compute = flops / (float(p.num_gpus) * float(p.gpu_flops))
    weights = float(p.streamed_weight_bytes) / (float(p.tp) * float(p.gpu_mem_rate))
    kv = float(p.kv_bytes_per_token)
    write = max(1500 * kv / float(p.link_rate[HBM]), 500 * kv / float(p.link_rate[DDR]))
    expected = max(compute, weights) + write + float(p.layers) * float(p.kernel_overhead)
    assert float(cost(p, c).time_s) == pytest.approx(expected, rel=1e-12)
