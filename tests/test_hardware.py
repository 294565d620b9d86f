"""Derived hardware figures against hand arithmetic written out here (PAM_SPEC §2)."""

from __future__ import annotations

import math

import pytest

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.hardware import DDR4_3200_PIM_DIMM, HBM3_PIM_STACK, SSD_PIM, get_platform


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
    # one FLOP per KV byte, so 1600 GB/s < internal 8212 GB/s.
    assert d.pu_peak_gflops == pytest.approx(1024 * 16 * 2 * 0.666)
    assert d.effective_gbps() == pytest.approx(1600.0)


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
    assert p.hbm.effective_gbps == pytest.approx(40 * 1600.0)
    assert p.ssd.effective_gbps == pytest.approx(8 * SSD_PIM.effective_gbps())
    # Throughput ordering that PAM's x:y:1 target follows.
    assert p.hbm.effective_gbps > p.ddr.effective_gbps > p.ssd.effective_gbps


def test_overrides_propagate_to_derived_figures():
    p = get_platform(overrides={"ddr.num_devices": 80, "hbm.device.compute_cap_gflops": 800.0})
    assert p.ddr.capacity_gb == pytest.approx(2 * get_platform().ddr.capacity_gb)
    assert p.hbm.device_effective_gbps == pytest.approx(800.0)
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
    assert math.isclose(p.ddr.effective_gbps, 2 * get_platform().ddr.effective_gbps)
    with pytest.raises(ConfigError):
        get_platform().scaled(0)
