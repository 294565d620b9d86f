"""Derived hardware figures against hand arithmetic written out here (PAM_SPEC §2)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.hardware import (
    DDR4_3200_PIM_DIMM,
    HBM3_PIM_STACK,
    SSD_PIM,
    flops_per_kv_byte,
    get_platform,
    query_passes,
)
from pamjax.models import get_model


def test_hbm3_stack_organisation_and_clock():
    d = HBM3_PIM_STACK
    # 16 channels x 2 pseudo-channels x 2 ranks x 4 bank groups x 4 banks.
    assert d.banks == 16 * 2 * 2 * 4 * 4 == 1024
    assert d.bank_groups_per_device == 16 * 2 * 2 * 4 == 256
    # 1024 banks x 16384 rows x 1 KB = 16 GiB.
    assert d.capacity_gb == pytest.approx(1024 * 16384 * 1024 / 1e9)
    # 1024 pins x 5.2 Gb/s / 8 = 665.6 GB/s (the published external figure).
    assert d.external_gbps == pytest.approx(665.6)
    # Command clock 5.2 / 4 = 1.3 GHz, so tRCD = 19 cycles = 14.6 ns.
    assert d.clock_ghz == pytest.approx(1.3)
    assert d.tRCD / d.clock_ghz == pytest.approx(14.615, abs=1e-3)


def test_hbm3_bank_streaming_row_hits_and_misses():
    d = HBM3_PIM_STACK
    # Full 1 KB row: 32 columns of 32 B; open = max(tRAS 45, tRCD 19 + 32 x tCCD_L 4 = 147)
    # = 147 cycles, + tRP 19 = 166 cycles = 127.69 ns -> 1024 B / 127.69 ns = 8.019 GB/s.
    full_row = 1024 / (166 / 1.3)
    assert d.bank_stream_gbps(1024) == pytest.approx(full_row)
    # A 128 B run: 4 columns; open = max(45, 19 + 16) = 45, + 19 = 64 cycles (= tRC).
    short = 128 / (64 / 1.3)
    assert d.bank_stream_gbps(128) == pytest.approx(short)
    assert d.bank_stream_gbps(128) < d.bank_stream_gbps(1024)
    # 1.5 rows: one full row (166) + half a row (16 columns: max(45, 19+64) + 19 = 102).
    assert d.bank_stream_gbps(1536) == pytest.approx(1536 / ((166 + 102) / 1.3))
    # All 1024 banks in lock-step.
    assert d.internal_gbps() == pytest.approx(1024 * full_row)


def test_hbm3_effective_rate_is_the_power_cap():
    d = HBM3_PIM_STACK
    # PU peak: 1024 banks x 16 lanes x 2 FLOP x 0.666 GHz = 21,823 GFLOPS, capped at 1.6 TFLOPS;
    # MHA does one FLOP per KV byte, so 1600 GB/s < internal 8212 GB/s.
    assert d.pu_peak_gflops == pytest.approx(1024 * 16 * 2 * 0.666)
    assert d.effective_gbps() == pytest.approx(1600.0)


def test_gqa_divides_the_compute_bound_rate_by_the_group():
    # LLaMA3-70B: 64 query heads share 8 KV heads, g = 8 FLOPs per KV byte. The 512 B buffer
    # holds 2 heads of d = 128 (FP16), so the PU reads each KV byte ceil(8 / 2) = 4 times:
    # min(8212 / 4, 1600 / 8) = 200 GB/s, 1/8 of the MHA rate (PAM_SPEC §2 revised).
    d = HBM3_PIM_STACK
    assert query_passes(512, 8, 128) == 4 and query_passes(512, 1, 128) == 1
    internal = 1024 * 1024 / (166 / 1.3)
    assert d.effective_gbps(gqa_group=8, head_dim=128) == pytest.approx(min(internal / 4, 200))
    assert d.effective_gbps(gqa_group=8) == pytest.approx(d.effective_gbps() / 8)
    # Qwen2.5-32B, g = 5: 3 passes, compute bound 1600 / 5 = 320 GB/s.
    assert d.effective_gbps(gqa_group=5) == pytest.approx(320.0)
    # A bank group's own rate has no compute cap: internal / passes / 256 groups.
    assert d.bank_group_gbps(gqa_group=8) == pytest.approx(internal / 4 / 256)
    # DDR: a 128 B buffer holds less than one 256 B head: one pass per query head.
    assert query_passes(128, 8, 128) == 8
    ddr = DDR4_3200_PIM_DIMM
    assert ddr.effective_gbps(gqa_group=8) == pytest.approx(
        min(ddr.internal_gbps() / 8, 204.0 / 8))
    # A wider PU buffer removes the extra passes; the compute cap then decides alone.
    wide = dataclasses.replace(d, pu_buffer_bytes=4096)
    assert wide.effective_gbps(gqa_group=8) == pytest.approx(200.0)
    with pytest.raises(ConfigError, match="gqa_group"):
        d.effective_gbps(gqa_group=0)


def test_model_rates_per_tier():
    p = get_platform()
    llama, opt = get_model("llama3-70b"), get_model("opt-175b")
    # Per stack: LLaMA3-70B at most a quarter of OPT-175B's (here exactly an eighth).
    assert p.hbm.device_effective_gbps(llama) <= p.hbm.device_effective_gbps(opt) / 4
    assert p.hbm.device_effective_gbps(opt) == pytest.approx(1600.0)
    assert p.hbm.effective_gbps(llama) == pytest.approx(40 * 200.0)
    # The SSD controller's 18 GFLOPS cap over g = 8: 2.25 GB/s per SSD.
    assert p.ssd.device_effective_gbps(llama) == pytest.approx(18.0 / 8)


def test_an_fp8_kv_cache_halves_the_compute_bound_rate():
    # A K or V element serves g query heads with one multiply-add (2 FLOPs) each; an FP8
    # byte is a whole element, a 16-bit byte half of one: 2 g / w FLOPs per KV byte.
    assert flops_per_kv_byte(8, 2) == 8 and flops_per_kv_byte(8, 1) == 16
    assert flops_per_kv_byte(1, 2) == 1 and flops_per_kv_byte(5, 1) == 10
    with pytest.raises(ConfigError, match="gqa_group"):
        flops_per_kv_byte(0, 2)
    for width in (0, 1.0):
        with pytest.raises(ConfigError, match="kv_bytes_per_value"):
            flops_per_kv_byte(8, width)
    p = get_platform()
    llama = get_model("llama3-70b")
    fp8 = dataclasses.replace(llama, name="llama3-70b-fp8kv", kv_bytes_per_value=1)
    # HBM-PIM, g = 8, 4 passes over an internal 8212 GB/s (2053 GB/s): the 1.6 TFLOPS cap
    # binds at 1600 / 8 = 200 GB/s for 16-bit KV and 1600 / 16 = 100 GB/s for FP8.
    assert p.hbm.device_effective_gbps(llama) == pytest.approx(200.0)
    assert p.hbm.device_effective_gbps(fp8) == pytest.approx(100.0)
    assert p.hbm.effective_gbps(fp8) == pytest.approx(40 * 100.0)
    # SSD: 18 GFLOPS / 16 = 1.125 GB/s per SSD (16-bit: 2.25).
    assert p.ssd.device_effective_gbps(fp8) == pytest.approx(18.0 / 16)
    # DDR: 16-bit KV is bound by 8 passes over 195.6 GB/s (24.45 < 204 / 8 = 25.5); FP8's
    # compute bound 204 / 16 = 12.75 GB/s now binds first.
    ddr_internal = 128 * 1024 * 1.6 / 1072
    assert p.ddr.device_effective_gbps(llama) == pytest.approx(ddr_internal / 8)
    assert p.ddr.device_effective_gbps(fp8) == pytest.approx(204.0 / 16)
    # A bank group's own rate has no compute cap: the KV width does not change it.
    assert p.hbm.bank_group_gbps(fp8) == p.hbm.bank_group_gbps(llama)


def test_an_fp8_kv_cache_leaves_an_internal_bound_rate_alone():
    # tCCD_L = 256 cycles: a 1 KB row of 32 columns takes 19 + 32 x 256 + 19 = 8230 cycles at
    # 1.3 GHz, so 1024 banks stream 1024 x 1024 B / 6331 ns = 165.6 GB/s, 41.4 GB/s over 4
    # passes: below both compute bounds (200, 100), the rate is the same for either width.
    p = get_platform(overrides={"hbm.device.tCCD_L": 256})
    llama = get_model("llama3-70b")
    fp8 = dataclasses.replace(llama, kv_bytes_per_value=1)
    internal = 1024 * 1024 / (8230 / 1.3)
    assert p.hbm.device_effective_gbps(llama) == pytest.approx(internal / 4)
    assert p.hbm.device_effective_gbps(fp8) == pytest.approx(internal / 4)


def test_paths_and_static_power():
    p = get_platform()
    # DDR sits behind the host: 40 DIMM channels (1024 GB/s) but 8 x 63 GB/s of PCIe.
    assert p.pcie_gbps == pytest.approx(8 * 63.0)
    assert p.path_gbps(p.ddr) == pytest.approx(504.0)
    assert p.path_gbps(p.ssd) == pytest.approx(min(8 * 14.0, 504.0))
    assert p.path_gbps(p.hbm) == pytest.approx(40 * 665.6)
    # 8 GPUs x 75 W + 40 DIMMs x 3 W + 8 SSDs x 5 W + one node's 1 kW.
    assert p.static_power_w == pytest.approx(8 * 75 + 40 * 3 + 8 * 5 + 1000)
    # Tensor parallelism inside a node all-reduces over NVLink, across nodes over RDMA.
    assert p.gpu.collective_gbps == pytest.approx(450.0)
    assert p.scaled(2).gpu.collective_gbps == pytest.approx(450.0)  # TP 8: one node
    four = p.scaled(4)
    assert four.gpu.tensor_parallel == 16 and four.gpu.collective_gbps == pytest.approx(50.0)
    assert four.static_power_w == pytest.approx(4 * p.static_power_w)


def test_ddr4_dimm_figures():
    d = DDR4_3200_PIM_DIMM
    # 2 ranks x 8 chips x 2 bank groups x 4 banks = 128 banks; 4 bank-group units (chips of a
    # rank are in lock-step).
    assert d.banks == 128 and d.bank_groups_per_device == 4
    assert d.capacity_gb == pytest.approx(128 * 262144 * 1024 / 1e9)  # 32 GiB
    assert d.external_gbps == pytest.approx(64 * 3.2 / 8)  # 25.6 GB/s
    assert d.clock_ghz == pytest.approx(1.6)
    # Full 1 KB row per chip: 128 columns of 8 B; open = max(52, 24 + 128 x 8) = 1048,
    # + tRP 24 = 1072 cycles (>= tRC 76) = 670 ns -> 1.528 GB/s per bank.
    per_bank = 1024 / (1072 / 1.6)
    assert d.bank_stream_gbps(1024) == pytest.approx(per_bank)
    # A 64 B run: 8 columns; open = max(52, 24 + 64) = 88, + 24 = 112 cycles.
    assert d.bank_stream_gbps(64) == pytest.approx(64 / (112 / 1.6))
    internal = 128 * per_bank  # 195.6 GB/s
    assert d.internal_gbps() == pytest.approx(internal)
    # Compute cap 204 GFLOPS (PU peak 128 x 4 x 2 x 0.5 = 512) -> min(195.6, 204) = internal.
    assert d.pu_peak_gflops == pytest.approx(512.0)
    assert d.effective_gbps() == pytest.approx(min(internal, 204.0))


def test_ssd_figures():
    d = SSD_PIM
    # Die: 16 KB page / 30 us = 0.546 GB/s; 4 dies = 2.185 GB/s < bus 2400 MT/s x 1 B = 2.4.
    per_channel = min(4 * 16384 / 30e3, 2.4)
    assert d.channel_bus_gbps == pytest.approx(2.4)
    assert d.channel_gbps() == pytest.approx(per_channel)
    assert d.internal_gbps() == pytest.approx(8 * per_channel)  # 17.48 GB/s
    # 4 KB useful per page read: a quarter of the array bandwidth.
    assert d.channel_gbps(4096) == pytest.approx(4 * 4096 / 30e3)
    assert d.capacity_gb == pytest.approx(8 * 256)
    # Cap 18 GFLOPS (PU peak 64 x 16 x 2 x 1 GHz = 2048) -> min(17.48, 18) = internal.
    assert d.effective_gbps() == pytest.approx(min(8 * per_channel, 18.0))


def test_platform_tiers_and_capacity():
    p = get_platform()
    assert [t.name for t in p.tiers] == ["hbm", "ddr", "ssd"]
    assert p.hbm.capacity_gb == pytest.approx(40 * HBM3_PIM_STACK.capacity_gb)
    assert p.ddr.capacity_gb == pytest.approx(40 * DDR4_3200_PIM_DIMM.capacity_gb)
    assert p.ssd.capacity_gb == pytest.approx(8 * 8 * 256)  # PAM_SPEC [D]: 16 TB
    assert p.hbm.effective_gbps() == pytest.approx(40 * 1600.0)
    assert p.ssd.effective_gbps() == pytest.approx(8 * SSD_PIM.effective_gbps())
    # Throughput ordering that PAM's x:y:1 target follows.
    assert p.hbm.effective_gbps() > p.ddr.effective_gbps() > p.ssd.effective_gbps()


def test_overrides_propagate_to_derived_figures():
    p = get_platform(overrides={"ddr.num_devices": 80, "hbm.device.compute_cap_gflops": 800.0})
    assert p.ddr.capacity_gb == pytest.approx(2 * get_platform().ddr.capacity_gb)
    assert p.hbm.device_effective_gbps() == pytest.approx(800.0)
    slow = get_platform(overrides={"hbm.device.tCCD_L": 8})
    assert slow.hbm.device.internal_gbps() < HBM3_PIM_STACK.internal_gbps()


@pytest.mark.parametrize("path,value", [
    ("hbm.device.pin_gbps", 0.0), ("ddr.num_devices", -1), ("ssd.device.tR_us", -30.0),
    ("gpu.peak_tflops", float("nan")), ("hbm.link_gbps", 0), ("energy.nvlink", -1.0),
])
def test_invalid_values_name_field_and_value(path, value):
    with pytest.raises(ConfigError) as err:
        get_platform(overrides={path: value})
    field = path.split(".")[-1]
    assert field in str(err.value) and str(value) in str(err.value)


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="no-such-platform"):
        get_platform("no-such-platform")
    with pytest.raises(UnknownNameError, match="bogus"):
        get_platform(overrides={"hbm.device.bogus": 1})
    with pytest.raises(UnknownNameError):
        get_platform(overrides={"tpu.cores": 1})


def test_parallelism_must_cover_gpus():
    with pytest.raises(ConfigError, match="tensor_parallel"):
        get_platform(overrides={"gpu.tensor_parallel": 3})
    p = get_platform().with_parallelism(8, 1)
    assert p.gpu.num_gpus == 8 and p.gpu.pipeline_parallel == 1


def test_scaled_platform():
    p = get_platform().scaled(2)
    assert p.gpu.num_gpus == 16 and p.hbm.num_devices == 80 and p.ssd.num_devices == 16
    assert math.isclose(p.ddr.effective_gbps(), 2 * get_platform().ddr.effective_gbps())
    with pytest.raises(ConfigError):
        get_platform().scaled(0)
