"""Unit tests of pamjax.costs: each term of the step cost against hand arithmetic.

Every test builds StepCounts by hand (no engine), evaluates costs.step_cost in float64 and
compares with the formula written out here from the published figures (PAM_SPEC §2), then
changes one thing and checks the predicted effect (a counterfactual). The hand figures are
derived here, not read from the code: e.g. the HBM3 stack streams 1024 banks x 1 KB rows in
166 cycles of 1.3 GHz (8.212 TB/s) and its PUs are capped at 1.6 TFLOPS.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from pamjax import costs, systems
from pamjax.hardware import get_platform
from pamjax.models import get_model
from pamjax.types import DDR, ENERGY_COMPONENTS, HBM, SSD

# The parameters are float32 (make_params), so a hand figure matches to float32 precision.
REL = 1e-6
HBM_INTERNAL = 1024 * 1024 / (166 / 1.3e9)  # bytes/s per stack (1024 banks, full rows)
LINK_HBM = 40 * 665.6e9  # 40 stacks' interfaces
PCIE = 8 * 63e9  # the 8 GPUs' PCIe links
DIMMS = 40 * 25.6e9  # 40 DDR4-3200 channels


def params_for(system, model="llama3-70b", platform=None):
    params = systems.make_params(system, model, platform, max_batch=64)
    return jax.tree.map(lambda x: np.asarray(x, np.float64) if np.asarray(x).dtype.kind == "f"
                        else np.asarray(x), params)


def counts(**fields):
    base = costs.empty_counts()
    base = jax.tree.map(lambda x: np.zeros(x.shape), base)
    return base.replace(**{k: np.asarray(v, np.float64) for k, v in fields.items()})


def cost(params, c):
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, costs.step_cost(params, c))


def per_tier(hbm=0.0, ddr=0.0, ssd=0.0):
    return [hbm, ddr, ssd]


# --------------------------------------------------------------------------------- GPU side

def test_decode_fc_time_is_the_roofline_plus_collectives():
    p = params_for("attacc")
    b = 64.0
    t, pp = 4.0, 2.0
    micro = b / pp
    roofline = max(float(p.fc_flops_per_token) * micro / pp / (t * 989e12 * 0.7),
                   float(p.streamed_weight_bytes) / pp / (t * 3.35e12 * 0.85))
    act = micro * 8192 * 2.0
    allreduce = 2 * (t - 1) / t * act / 450e9 + 2 * (t - 1) * 2e-6
    per_micro = roofline + 80 / pp * (2 * allreduce + 5e-6)
    handoff = act / 450e9 + 2e-6
    expected = pp * per_micro + (pp - 1) * handoff
    with jax.enable_x64(True):
        assert float(costs.decode_fc_time(p, np.float64(b))) == pytest.approx(expected, rel=REL)
        assert float(costs.decode_fc_time(p, np.float64(0.0))) == 0.0


def test_tensor_parallelism_past_a_node_all_reduces_over_rdma():
    # 4 nodes: TP 16 spans them, so the all-reduce runs at 50 GB/s per GPU, not 450.
    scaled = get_platform().scaled(4)
    p = params_for("attacc", platform=scaled)
    assert float(p.collective_rate) == pytest.approx(50e9)
    over_nvlink = p.replace(collective_rate=np.float64(450e9),
                            collective_latency=np.float64(2e-6))
    with jax.enable_x64(True):
        slow = float(costs.decode_fc_time(p, np.float64(256.0)))
        fast = float(costs.decode_fc_time(over_nvlink, np.float64(256.0)))
    t, micro = 16.0, 128.0
    extra = 80 / 2 * 2 * 2 * (2 * (t - 1) / t * micro * 8192 * 2 * (1 / 50e9 - 1 / 450e9)
                              + 2 * (t - 1) * (5e-6 - 2e-6))
    assert slow - fast == pytest.approx(extra, rel=REL)


def test_prefill_pays_its_all_reduces_and_kv_writes():
    p = params_for("ls-pim")
    n = 8192.0
    c = counts(prefill_tokens=n, prefill_pairs=n * (n + 1) / 2,
               prefill_tier_tokens=per_tier(6000, 2192, 0), sparse=1.0)
    flops = float(p.fc_flops_per_token) * n + 4 * 80 * 64 * 128 * n * (n + 1) / 2
    compute = flops / (8 * 989e12 * 0.7)
    weights = float(p.streamed_weight_bytes) / (4 * 3.35e12 * 0.85)
    # Each of the 2 stages all-reduces all n tokens twice in each of its 40 layers (TP 4,
    # NVLink); the stages overlap on different micro-batches, as for the FLOPs.
    allreduce = 80 / 2 * 2 * (2 * 3 / 4 * n * 8192 * 2 / 450e9 + 2 * 3 * 2e-6)
    kv = 327680.0 * (1 + 1 / 16)  # K, V and the selection label
    write = max(6000 * kv / LINK_HBM, 2192 * kv / PCIE, 2192 * kv / DIMMS)
    expected = max(compute, weights) + allreduce + write + 80 * 5e-6
    assert float(cost(p, c).time_s) == pytest.approx(expected, rel=REL)
    # The all-reduces of an 8K-token prefill are a visible share of it (~36 ms against
    # ~210 ms of compute).
    assert 0.03 < allreduce < 0.04 and 0.2 < compute < 0.23


# ------------------------------------------------------------------------------ PIM devices

def test_an_fp8_kv_cache_halves_the_compute_bound_device_rate():
    # The SimParams rates systems.py builds: an FP8 KV cache does 2 g = 16 FLOPs per KV byte,
    # so the compute-bound tiers (HBM 1.6 TFLOPS, SSD 18 GFLOPS, and DDR's 204 GFLOPS, now
    # below its 8 passes) run at half their 16-bit compute bound; the bank groups' own rates
    # (no cap) do not change.
    base = get_model("llama3-70b")
    fp8 = dataclasses.replace(base, name="llama3-70b-fp8kv", kv_bytes_per_value=1)
    p16, p8 = params_for("attacc", base), params_for("attacc", fp8)
    np.testing.assert_allclose(p16.device_rate, [2e11, 128 * 1024 * 1.6e9 / 1072 / 8, 18e9 / 8],
                               rtol=REL)
    np.testing.assert_allclose(p8.device_rate, [1e11, 204e9 / 16, 18e9 / 16], rtol=REL)
    np.testing.assert_array_equal(p8.bank_group_rate, p16.bank_group_rate)


def test_gqa_scales_compute_bound_pim_time_by_the_group():
    # Two models with the same KV bytes per token (8 KV heads of 128 over 80 layers) but
    # g = 1 (8 query heads) and g = 8 (64): HBM-PIM is compute bound, so the same attended
    # bytes take 8x longer with g = 8.
    base = get_model("llama3-70b")
    mha = dataclasses.replace(base, name="mha-twin", q_heads=8)
    assert mha.kv_bytes_per_token == base.kv_bytes_per_token
    c = counts(decode_requests=64, tier_tokens=per_tier(64_000), tier_selected=per_tier(64_000),
               tier_busiest_bank_group=per_tier(64_000 / 256), tier_requests=per_tier(64),
               tier_holders=per_tier(64), tier_active_chunks=per_tier(64))
    device_s = []
    for model, rate in ((mha, min(HBM_INTERNAL, 1.6e12)), (base, min(HBM_INTERNAL / 4, 2e11))):
        p = params_for("attacc", model)
        assert float(p.device_rate[HBM]) == pytest.approx(rate, rel=1e-6)
        full, empty = cost(p, c), cost(p, counts(**_attention_free(c)))
        device_s.append(64_000 * 327680 / 40 / rate)
        # The device part of the tier time is the attended bytes per stack over its rate.
        assert float(full.tier_attention_s[HBM] - empty.tier_attention_s[HBM]) \
            == pytest.approx(device_s[-1], rel=1e-6)
    assert device_s[1] / device_s[0] == pytest.approx(8.0)


def _attention_free(c):
    """The same step with nothing attended (the link and round-trip part only)."""
    return {"decode_requests": c.decode_requests, "tier_tokens": np.zeros(3),
            "tier_requests": c.tier_requests, "tier_holders": c.tier_holders,
            "tier_active_chunks": c.tier_active_chunks}


def test_busiest_bank_group_at_its_own_rate_and_the_device_cap():
    p = params_for("attacc")  # LLaMA3-70B: 4 passes, bank group rate 8.212 TB/s / 4 / 256
    group_rate = HBM_INTERNAL / 4 / 256
    kv = 327680.0
    # Balanced load: the device cap decides (200 GB/s per stack).
    balanced = counts(tier_selected=per_tier(25_600), tier_busiest_bank_group=per_tier(100),
                      tier_holders=per_tier(1), tier_requests=per_tier(1),
                      tier_active_chunks=per_tier(1))
    # Up to ~5x imbalance costs nothing under the device-wide cap (200 GB/s vs 256 x 8 GB/s).
    skewed = balanced.replace(tier_busiest_bank_group=np.asarray(per_tier(500.0)))
    assert float(cost(p, skewed).attention_s) == pytest.approx(
        float(cost(p, balanced).attention_s), rel=REL)
    # 40x imbalance: the busiest bank group's own rate decides.
    hot = balanced.replace(tier_busiest_bank_group=np.asarray(per_tier(4000.0)))
    extra = 4000 * kv / 40 / group_rate - 25_600 * kv / 40 / 2e11
    assert float(cost(p, hot).attention_s - cost(p, balanced).attention_s) == pytest.approx(
        extra, rel=1e-6)


# ------------------------------------------------------------------------------------ paths

def test_ddr_attention_is_limited_by_pcie_not_by_the_dimms():
    # 2,000 requests hold KV on DDR and attend nothing there: Q out and partials back.
    p = params_for("l-pim")
    c = counts(decode_requests=2000, tier_tokens=per_tier(0, 2000), tier_holders=per_tier(0, 2000),
               tier_requests=per_tier(0, 2000), tier_active_chunks=per_tier(0, 2000))
    q = 80 * 64 * 128 * 2
    partial = 80 * 64 * 130 * 4
    path = 2000 * (q + partial) / PCIE  # 504 GB/s < 1024 GB/s of DIMM channels
    base = cost(p, c)
    assert float(base.tier_attention_s[DDR]) == pytest.approx(path + 2 * 80 * 2e-6, rel=REL)
    # Counterfactual: twice the DIMMs (channels) change nothing; twice the PCIe halves it.
    more_dimms = p.replace(link_rate=p.link_rate * np.array([1.0, 2.0, 1.0]))
    assert float(cost(more_dimms, c).tier_attention_s[DDR]) == pytest.approx(
        float(base.tier_attention_s[DDR]), rel=REL)
    wider_pcie = p.replace(pcie_rate=p.pcie_rate * 2)
    assert float(cost(wider_pcie, c).tier_attention_s[DDR]) == pytest.approx(
        path / 2 + 2 * 80 * 2e-6, rel=REL)


def test_ddr_and_ssd_share_pcie():
    p = params_for("l-pim")
    q = 80 * 64 * 128 * 2
    partial = 80 * 64 * 130 * 4
    ddr_only = counts(decode_requests=500, tier_holders=per_tier(0, 500),
                      tier_requests=per_tier(0, 500), tier_active_chunks=per_tier(0, 500))
    both = ddr_only.replace(tier_holders=np.asarray(per_tier(0, 500, 500)),
                            tier_requests=np.asarray(per_tier(0, 500, 500)),
                            tier_active_chunks=np.asarray(per_tier(0, 500, 500)))
    # The SSD's own NVMe links (8 x 14 GB/s) are busier than PCIe's shared 504 GB/s here,
    # but DDR now waits for PCIe to carry both tiers' bytes.
    assert float(cost(p, both).tier_attention_s[DDR]) == pytest.approx(
        1000 * (q + partial) / PCIE + 2 * 80 * 2e-6, rel=REL)
    assert float(cost(p, ddr_only).tier_attention_s[DDR]) == pytest.approx(
        500 * (q + partial) / PCIE + 2 * 80 * 2e-6, rel=REL)
    assert float(cost(p, both).tier_attention_s[SSD]) == pytest.approx(
        500 * (q + partial) / (8 * 14e9) + 2 * 80 * 10e-6, rel=REL)


def test_partials_without_pamattention_are_one_per_chunk():
    c = counts(decode_requests=10, tier_tokens=per_tier(0, 10_000), tier_selected=per_tier(0, 0),
               tier_holders=per_tier(0, 10), tier_requests=per_tier(0, 10),
               tier_active_chunks=per_tier(0, 200))
    pam, central = params_for("pam"), params_for("pam-no-pamattention")
    partial = 80 * 64 * 130 * 4
    diff = cost(central, c).tier_attention_s[DDR] - cost(pam, c).tier_attention_s[DDR]
    assert float(diff) == pytest.approx(190 * partial / PCIE, rel=REL)


def test_sparse_systems_pay_labels_topk_and_an_extra_round_trip():
    dense, sparse = params_for("l-pim"), params_for("ls-pim")
    c = counts(decode_requests=1, tier_tokens=per_tier(0, 4096), tier_selected=per_tier(0, 512),
               tier_busiest_bank_group=per_tier(0, 128), tier_holders=per_tier(0, 1),
               tier_requests=per_tier(0, 1), tier_active_chunks=per_tier(0, 8),
               tier_topk_candidates=per_tier(0, 512))
    ddr_rate = float(dense.device_rate[DDR])
    labels = 4096 * 327680 / 16
    with_labels = c.replace(sparse=np.float64(1.0))
    d = cost(sparse, with_labels).tier_attention_s[DDR] - cost(dense, c).tier_attention_s[DDR]
    topk = 512 * 80 * 8 * 8  # candidates x layers x KV heads x (f32 score + i32 index)
    # DDR is bound by its devices here (4 bank groups, balanced): labels over the device rate.
    expected = labels / 40 / ddr_rate + topk / PCIE + 2 * 80 * 2e-6
    assert float(d) == pytest.approx(expected, rel=1e-6)


def test_decode_writes_cost_every_system():
    p = params_for("l-pim")
    c = counts(decode_requests=100, tier_holders=per_tier(0, 100), tier_requests=per_tier(0, 100),
               tier_active_chunks=per_tier(0, 100))
    written = c.replace(tier_decode_writes=np.asarray(per_tier(0, 100)))
    kv = 327680.0
    d = cost(p, written).tier_attention_s[DDR] - cost(p, c).tier_attention_s[DDR]
    ddr_internal = float(p.device_internal_rate[DDR])
    assert float(d) == pytest.approx(100 * kv / PCIE + 100 * kv / (40 * ddr_internal), rel=REL)


# -------------------------------------------------------------------------------- migration

def test_migration_shares_the_links_of_its_path():
    p = params_for("pam")
    kv = 327680.0
    attend = counts(decode_requests=100, tier_holders=per_tier(100, 100),
                    tier_requests=per_tier(100, 100), tier_tokens=per_tier(1000, 1000))
    moved = np.zeros((3, 3))
    moved[DDR, HBM] = 1000  # HBM <-> DDR crosses PCIe
    moving = attend.replace(migrated_tokens=moved)
    d = cost(p, moving).tier_attention_s[DDR] - cost(p, attend).tier_attention_s[DDR]
    ddr_internal = float(p.device_internal_rate[DDR])
    assert float(d) == pytest.approx(1000 * kv / PCIE + 1000 * kv / (40 * ddr_internal),
                                     rel=REL)
    # DDR <-> SSD goes through the host: DIMM channels and NVMe, not the GPUs' PCIe.
    host = np.zeros((3, 3))
    host[SSD, DDR] = 1000
    ssd_only = counts(migrated_tokens=host)
    got = cost(p, ssd_only)
    ssd_internal = float(p.device_internal_rate[SSD])
    assert float(got.tier_attention_s[SSD]) == pytest.approx(
        1000 * kv / (8 * 14e9) + 1000 * kv / (8 * ssd_internal), rel=REL)
    # No decoding request holds KV there: no attention round trips for the SSD.
    # A CPU re-layout (slowdown 20) makes the link part 20x longer.
    cpu = p.replace(migration_slowdown=np.float64(20.0))
    d20 = cost(cpu, moving).tier_attention_s[DDR] - cost(cpu, attend).tier_attention_s[DDR]
    assert float(d20) == pytest.approx(20 * 1000 * kv / PCIE + 1000 * kv / (40 * ddr_internal),
                                       rel=REL)


# ----------------------------------------------------------------------------- GPU attention

def test_vllm_fetches_offloaded_kv_over_its_path_in_series():
    p = params_for("vllm-offload")
    c = counts(decode_requests=1, tier_tokens=per_tier(1000, 300, 100),
               tier_selected=per_tier(1000, 300, 100))
    got = cost(p, c)
    kv = 327680.0
    flops = 4 * 80 * 64 * 128 * 1400
    gpu = max(1000 * kv / (8 * 3.35e12 * 0.85), flops / (8 * 989e12 * 0.7))
    pcie = 400 * kv / PCIE  # DDR and SSD fetches share PCIe
    nvme = 100 * kv / (8 * 14e9)
    assert float(got.attention_s) == pytest.approx(gpu + max(pcie, nvme), rel=REL)


# ----------------------------------------------------------------------------------- energy

def test_static_power_is_charged_for_the_step_time():
    p = params_for("l-pim")
    c = counts(decode_requests=8, tier_holders=per_tier(8), tier_requests=per_tier(8),
               tier_active_chunks=per_tier(8), tier_tokens=per_tier(8000),
               tier_selected=per_tier(8000), tier_busiest_bank_group=per_tier(32))
    got = cost(p, c)
    static = got.energy_pj[ENERGY_COMPONENTS.index("static")]
    assert float(static) == pytest.approx(1760.0 * float(got.time_s) * 1e12, rel=REL)
    with jax.enable_x64(True):
        assert float(costs.static_energy_pj(p, np.float64(0.5))) == pytest.approx(880e12)


def test_pim_energy_counts_read_passes_and_gqa_arithmetic():
    c = counts(decode_requests=1, tier_tokens=per_tier(1000), tier_selected=per_tier(1000),
               tier_busiest_bank_group=per_tier(4), tier_holders=per_tier(1),
               tier_requests=per_tier(1), tier_active_chunks=per_tier(2))
    i = ENERGY_COMPONENTS.index("pim_attention")
    for model, passes, g in (("llama3-70b", 4, 8), ("opt-175b", 1, 1)):
        p = params_for("attacc", model)
        kv = float(p.kv_bytes_per_token)
        want = 8 * 1000 * kv * 0.55 * (passes + 3.0 * g)
        assert float(cost(p, c).energy_pj[i]) == pytest.approx(want, rel=REL)
    # An FP8 KV cache: 163,840 bytes per token (1 byte per element), each byte read 4 times
    # and worth 2 g = 16 FLOPs of PU arithmetic.
    fp8 = dataclasses.replace(get_model("llama3-70b"), kv_bytes_per_value=1)
    want = 8 * 1000 * 163840 * 0.55 * (4 + 3.0 * 16)
    assert float(cost(params_for("attacc", fp8), c).energy_pj[i]) == pytest.approx(want, rel=REL)


def test_migration_link_load_is_the_busiest_link_of_the_moves_alone():
    # The link-load feature of a learned policy (costs.migration_link_s), by hand: N tokens
    # HBM -> DDR load HBM's and DDR's own links and, crossing to the host side, the shared
    # PCIe; DDR -> SSD stays behind PCIe (both ends there), so only the devices' links.
    p = systems.make_params("pam", "llama3-70b", max_batch=64)
    n = 1000.0
    moved = n * float(p.kv_bytes_per_token) * float(p.migration_slowdown)
    rate = np.asarray(p.link_rate, np.float64)
    pcie = moved / (float(p.num_gpus) * float(p.pcie_rate))
    m = np.zeros((3, 3), np.float32)
    m[HBM, DDR] = n
    np.testing.assert_allclose(float(costs.migration_link_s(p, m)),
                               max(moved / rate[HBM], moved / rate[DDR], pcie), rtol=1e-5)
    m2 = np.zeros((3, 3), np.float32)
    m2[DDR, SSD] = n
    np.testing.assert_allclose(float(costs.migration_link_s(p, m2)),
                               max(moved / rate[DDR], moved / rate[SSD]), rtol=1e-5)
    np.testing.assert_allclose(float(costs.migration_link_s(p, 2 * m)),
                               2 * float(costs.migration_link_s(p, m)), rtol=1e-6)
    assert float(costs.migration_link_s(p, np.zeros((3, 3), np.float32))) == 0.0
