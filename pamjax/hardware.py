"""Hardware model of the PAM platform: PIM devices, tiers, the GPU host, links and energy.

Everything here is host-side configuration data (frozen dataclasses of Python numbers). The
figures PAM_SPEC §2 publishes are stored as they are published; everything that *follows*
from them (internal streaming rates, effective PIM attention throughput, capacities, external
bandwidth, the command clock) is derived by the methods below, so that an override of one
published figure propagates. Units are in the field names (``_gb`` = 1e9 bytes, ``_gbps`` =
1e9 bytes/s, ``_ghz``, ``_ns``, ``_us``, ``_pj_per_bit``); DRAM timings are in command-clock
cycles, as published.

Derivations (the tests write each one out by hand):

* DRAM command clock = pin rate / transfers per clock (HBM3: 5.2 Gb/s / 4 = 1.3 GHz, which
  makes the published tRCD = 19 cycles = 14.6 ns, tREFI = 5070 cycles = 3.9 us; DDR4-3200:
  3.2 GT/s / 2 = 1.6 GHz).
* A bank that streams ``run`` bytes opens ``ceil(run / row_bytes)`` rows; each row costs
  ``max(tRAS, tRCD + columns * tCCD_L) + tRP`` cycles (at least tRC), where ``columns`` is the
  number of column accesses of ``column_bytes`` the run needs in that row. Consecutive column
  reads of one bank are in one bank group, hence tCCD_L. A run shorter than a row is a row
  miss per run; a full-row run amortises the activation over the row (row-buffer hits).
* Internal rate = banks x per-bank rate (all banks stream in lock-step in PIM all-bank mode).
* Arithmetic intensity depends on the model (PAM_SPEC §2, revised). A KV head serves
  ``g = q_heads / kv_heads`` query heads, and the score and value GEMVs do 2 FLOPs (one
  multiply-add) per K or V element *per query head*: ``2 g / w`` FLOPs per KV byte for
  ``w = kv_bytes_per_value`` bytes per element (:func:`flops_per_kv_byte`; 16-bit KV: g, so
  1 for MHA such as OPT-175B and 8 for LLaMA3-70B; FP8 KV: 2 g). The PU's buffer holds
  ``floor(buffer / (head_dim x 2))`` query vectors (queries stay 16-bit; 512 B: 2 heads at
  d = 128; at least one head's worth is streamed when less fits), so a KV byte is read
  ``passes = ceil(g / heads held)`` times: effective PIM attention throughput, in KV
  bytes/s, = min(internal rate / passes, compute cap / FLOPs per KV byte)
  (:meth:`DramPimDevice.effective_gbps`). Selection labels are read the same way (a label
  has the KV's width).
* A bank group's own rate is the internal rate / passes / bank groups: under a device-wide
  (power) compute cap, a device's local-attention time is max(busiest bank group's bytes /
  its own rate, all its bytes / the device's effective rate) (PAM_SPEC §7, revised).
* SSD: a die reads a ``page_bytes`` page in tR; a channel moves at most
  ``channel_mts * channel_bus_bits / 8`` bytes/s; rate per channel = min(dies x useful bytes
  per page read / tR, channel bus); internal = channels x that.
* Capacity: DRAM = banks x rows per bank x row bytes; SSD = channels x GB per channel.

Refresh is not modelled (the publication gives tREFI but no tRFC for HBM3); nor is tFAW
(all-bank PIM activates every bank with one command, so the four-activate window constrains
commands, not data). Both are stated here so a reader does not look for them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.types import TIER_NAMES


def _validate_positive(obj, prefix: str, allow_zero: tuple[str, ...] = ()) -> None:
    """Raise ConfigError for any numeric field that is not a finite positive number."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = f"{prefix}.{f.name}" if prefix else f.name
        if not math.isfinite(value):
            raise ConfigError(name, value, "must be a finite number")
        if f.name in allow_zero:
            if value < 0:
                raise ConfigError(name, value, "must be >= 0")
        elif value <= 0:
            raise ConfigError(name, value, "must be > 0")


def _replace_checked(obj, prefix: str, changes: Mapping[str, Any]):
    """dataclasses.replace that names an unknown field instead of raising TypeError."""
    names = {f.name for f in dataclasses.fields(obj)}
    for key in changes:
        if key not in names:
            raise UnknownNameError(f"field of {prefix}", key, sorted(names))
    return dataclasses.replace(obj, **changes)


@dataclasses.dataclass(frozen=True)
class DramPimDevice:
    """One DRAM device with near-bank processing units (an HBM3 stack or a DDR4 DIMM).

    Organisation fields multiply to the bank count. ``chips_per_rank`` chips of a rank work
    in lock-step on one bus (1 for HBM, whose pseudo-channel is one die's interface).
    ``column_bytes`` and ``row_bytes`` are per bank of one chip.
    """

    name: str
    channels: int  # independent channels per device
    pseudo_channels: int  # pseudo-channels per channel (1 for DDR)
    ranks: int  # ranks (HBM3 stack IDs) per pseudo-channel
    chips_per_rank: int  # chips in lock-step per rank
    bank_groups: int  # bank groups per chip
    banks_per_group: int
    rows_per_bank: int
    row_bytes: int  # DRAM page per bank per chip, bytes
    column_bytes: int  # bytes one column access delivers per bank per chip
    bus_bits: int  # external data pins of the device
    pin_gbps: float  # external data rate per pin, Gb/s
    transfers_per_clock: int  # data transfers per command-clock cycle (HBM3 4, DDR4 2)
    tRCD: int  # cycles, activate to read
    tRP: int  # cycles, precharge
    tRAS: int  # cycles, activate to precharge (minimum)
    tRC: int  # cycles, activate to activate same bank (0 = tRAS + tRP)
    tCCD_S: int  # cycles, column to column, different bank group
    tCCD_L: int  # cycles, column to column, same bank group
    tBL: int  # cycles, burst
    pu_clock_ghz: float  # near-bank processing unit clock
    pu_lanes: int  # FP16 lanes per PU (one PU per bank per chip)
    pu_buffer_bytes: int
    compute_cap_gflops: float  # power-limited PIM compute per device (PAM_SPEC §2)
    reduction_units: int  # RUs per device (per bank group / logic die / central buffer)

    def __post_init__(self):
        _validate_positive(self, self.name, allow_zero=("tRC",))

    # -- organisation ----------------------------------------------------------------------
    @property
    def banks(self) -> int:
        """Banks per device, counting each chip of a rank separately (each has a PU)."""
        return (self.channels * self.pseudo_channels * self.ranks * self.chips_per_rank
                * self.bank_groups * self.banks_per_group)

    @property
    def bank_groups_per_device(self) -> int:
        """Independent bank groups per device (lock-step chips of a rank count once).

        This is the granularity of PAM's intra-device mapping: a token placed on a device
        sits in one of these bank groups, and the device's attention time is bound by the
        busiest of them.
        """
        return self.channels * self.pseudo_channels * self.ranks * self.bank_groups

    @property
    def capacity_gb(self) -> float:
        """Device capacity in GB (1e9 bytes), from banks x rows x row size."""
        return self.banks * self.rows_per_bank * self.row_bytes / 1e9

    @property
    def clock_ghz(self) -> float:
        """Command clock = pin data rate / transfers per clock."""
        return self.pin_gbps / self.transfers_per_clock

    @property
    def external_gbps(self) -> float:
        """External (host-visible) bandwidth in GB/s = pins x rate / 8."""
        return self.bus_bits * self.pin_gbps / 8

    # -- internal streaming ----------------------------------------------------------------
    def bank_stream_gbps(self, run_bytes: float) -> float:
        """Rate (GB/s) at which one bank of one chip delivers a run of ``run_bytes``.

        Args:
          run_bytes: contiguous bytes read per visit to this bank (per chip): a full row
            gives row-buffer hits, a short run pays a row activation per run.

        Returns:
          GB/s (1e9 bytes/s) of useful data, activation and precharge included.
        """
        if run_bytes <= 0:
            raise ConfigError("run_bytes", run_bytes, "must be > 0")
        full_rows, tail = divmod(run_bytes, self.row_bytes)
        cycles = full_rows * self._row_cycles(self.row_bytes)
        if tail:
            cycles += self._row_cycles(tail)
        return run_bytes / (cycles / self.clock_ghz)  # bytes per ns == GB/s

    def _row_cycles(self, bytes_in_row: float) -> float:
        columns = math.ceil(bytes_in_row / self.column_bytes)
        open_time = max(self.tRAS, self.tRCD + columns * self.tCCD_L)
        return max(open_time + self.tRP, self.tRC)

    def internal_gbps(self, run_bytes: float | None = None) -> float:
        """All banks streaming in lock-step (PIM all-bank mode).

        Args:
          run_bytes: contiguous bytes per bank visit per chip; ``None`` = one full row.

        Returns:
          Device-internal rate, GB/s = banks x :meth:`bank_stream_gbps`.
        """
        return self.banks * self.bank_stream_gbps(run_bytes or self.row_bytes)

    @property
    def pu_peak_gflops(self) -> float:
        """Raw PU arithmetic (one FMA = 2 FLOPs per lane per cycle) before the power cap."""
        return self.banks * self.pu_lanes * 2 * self.pu_clock_ghz

    def effective_gbps(self, run_bytes: float | None = None, *, gqa_group: int = 1,
                       head_dim: int = 128, kv_bytes_per_value: int = 2) -> float:
        """Effective PIM attention throughput in KV GB/s (see the module docstring).

        Args:
          run_bytes: contiguous KV bytes per bank visit per chip; ``None`` = one full row.
          gqa_group: query heads per KV head, g.
          head_dim: elements per head (sets how many query vectors the PU buffer holds).
          kv_bytes_per_value: bytes per K or V element, w (2: 16-bit, 1: FP8).

        Returns:
          min(internal rate / passes, min(compute cap, raw PU peak) / (2 g / w)), GB/s.
        """
        return _effective_gbps(self, run_bytes, gqa_group, head_dim, kv_bytes_per_value)

    def bank_group_gbps(self, run_bytes: float | None = None, *, gqa_group: int = 1,
                        head_dim: int = 128) -> float:
        """One bank group's own KV rate, GB/s = internal rate / passes / bank groups (no
        compute cap: the cap is device-wide)."""
        return self.internal_gbps(run_bytes) / query_passes(
            self.pu_buffer_bytes, gqa_group, head_dim) / self.bank_groups_per_device


@dataclasses.dataclass(frozen=True)
class SsdPimDevice:
    """One SSD with PIM units in its controller (channel-interleaved layout)."""

    name: str
    channels: int
    dies_per_channel: int
    page_bytes: int  # NAND page read unit
    tR_us: float  # page read latency (array to page register), microseconds
    channel_mts: float  # channel bus transfers, MT/s
    channel_bus_bits: int  # channel bus width (ONFI: 8)
    channel_capacity_gb: float
    pu_count: int
    pu_clock_ghz: float
    pu_lanes: int
    compute_cap_gflops: float
    reduction_units: int
    host_link_gbps: float  # NVMe link per direction, GB/s ([E] PCIe Gen5 x4)
    pu_buffer_bytes: int = 65536  # [D] controller SRAM per PU: every query head fits

    def __post_init__(self):
        _validate_positive(self, self.name)

    @property
    def bank_groups_per_device(self) -> int:
        """Mapping granularity inside an SSD: its channels (the "bank groups" of an SSD)."""
        return self.channels

    @property
    def capacity_gb(self) -> float:
        """Device capacity in GB (1e9 bytes) = channels x GB per channel."""
        return self.channels * self.channel_capacity_gb

    @property
    def channel_bus_gbps(self) -> float:
        """Peak rate of one channel bus, GB/s = MT/s x bus bits / 8 / 1000."""
        return self.channel_mts * self.channel_bus_bits / 8 / 1e3

    def channel_gbps(self, run_bytes: float | None = None) -> float:
        """Useful GB/s of one channel: dies reading pages in parallel, capped by the bus.

        Args:
          run_bytes: useful contiguous bytes per page read (default a full page); a page
            read always costs tR, so short runs waste array bandwidth.

        Returns:
          GB/s of useful data: min(dies x useful bytes / tR, channel bus).
        """
        useful = min(run_bytes or self.page_bytes, self.page_bytes)
        array_rate = self.dies_per_channel * useful / (self.tR_us * 1e3)  # bytes/ns
        return min(array_rate, self.channel_bus_gbps)

    def internal_gbps(self, run_bytes: float | None = None) -> float:
        """All channels reading in parallel, GB/s = channels x :meth:`channel_gbps`.

        Args:
          run_bytes: useful contiguous bytes per page read; ``None`` = a full page.
        """
        return self.channels * self.channel_gbps(run_bytes)

    @property
    def pu_peak_gflops(self) -> float:
        """Raw controller-PU arithmetic, GFLOP/s (one FMA = 2 FLOPs per lane per cycle)."""
        return self.pu_count * self.pu_lanes * 2 * self.pu_clock_ghz

    def effective_gbps(self, run_bytes: float | None = None, *, gqa_group: int = 1,
                       head_dim: int = 128, kv_bytes_per_value: int = 2) -> float:
        """Effective PIM attention throughput in KV GB/s, as for
        :meth:`DramPimDevice.effective_gbps` (``run_bytes``: useful bytes per page read)."""
        return _effective_gbps(self, run_bytes, gqa_group, head_dim, kv_bytes_per_value)

    def bank_group_gbps(self, run_bytes: float | None = None, *, gqa_group: int = 1,
                        head_dim: int = 128) -> float:
        """One channel's own KV rate, GB/s = internal rate / passes / channels."""
        return self.internal_gbps(run_bytes) / query_passes(
            self.pu_buffer_bytes, gqa_group, head_dim) / self.bank_groups_per_device


def query_passes(buffer_bytes: int, gqa_group: int, head_dim: int,
                 value_bytes: int = 2) -> int:
    """Passes a PU makes over each KV byte to serve the ``gqa_group`` query heads sharing it.

    The PU's buffer holds ``floor(buffer_bytes / (head_dim x value_bytes))`` query vectors
    (at least one: a head longer than the buffer is streamed in slices, each KV element still
    read once per head). PAM_SPEC §2: 512 B holds 2 FP16 heads of d = 128.

    Args:
      buffer_bytes: PU buffer, bytes; gqa_group: query heads per KV head (>= 1);
      head_dim: elements per head; value_bytes: bytes per element (FP16: 2).

    Returns:
      ceil(gqa_group / heads held), an integer >= 1.
    """
    held = max(1, buffer_bytes // (head_dim * value_bytes))
    return -(-gqa_group // held)


def flops_per_kv_byte(gqa_group: int, kv_bytes_per_value: int = 2) -> float:
    """PU FLOPs per KV byte read: a K or V element serves ``gqa_group`` query heads with one
    multiply-add (2 FLOPs) each, and a byte holds ``1 / kv_bytes_per_value`` elements.

    Args:
      gqa_group: query heads per KV head, g (integer >= 1).
      kv_bytes_per_value: bytes per K or V element, w (integer >= 1; 2 for 16-bit, 1 for FP8).

    Returns:
      2 g / w (g for a 16-bit KV cache, 2 g for FP8).

    Raises:
      ConfigError: either argument is not an integer >= 1.
    """
    for field, value in (("gqa_group", gqa_group), ("kv_bytes_per_value", kv_bytes_per_value)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(field, value, "must be an integer >= 1")
    return 2 * gqa_group / kv_bytes_per_value


def _effective_gbps(device, run_bytes, gqa_group: int, head_dim: int,
                    kv_bytes_per_value: int) -> float:
    intensity = flops_per_kv_byte(gqa_group, kv_bytes_per_value)
    passes = query_passes(device.pu_buffer_bytes, gqa_group, head_dim)
    compute_bound = min(device.compute_cap_gflops, device.pu_peak_gflops) / intensity
    return min(device.internal_gbps(run_bytes) / passes, compute_bound)


@dataclasses.dataclass(frozen=True)
class Tier:
    """A memory tier: ``num_devices`` identical devices and their path to the GPUs.

    A token's KV is interleaved over all devices of its tier (tensor- and pipeline-parallel
    slices), and inside every device it sits in one bank group; see placement.py.

    Paths (PAM_SPEC §2, revised): every byte between the GPUs and a tier crosses the tier's
    own device interfaces (``link_gbps`` each: an HBM stack's interface to its GPU, a DIMM's
    DDR channel, an SSD's NVMe link) and, for a tier that sits behind the host
    (``behind_pcie``: DDR and SSD), the GPUs' PCIe links too, which the host-side tiers
    share (Platform.pcie_gbps).
    """

    name: str
    device: DramPimDevice | SsdPimDevice
    num_devices: int
    link_gbps: float  # per device, per direction: the device's own interface
    link_latency_us: float  # one transfer's fixed latency (Q broadcast, partials, migration)
    pim_read_pj_per_bit: float  # device-internal read for PIM attention
    host_read_pj_per_bit: float  # reading this tier's KV out to a GPU (incl. I/O)
    kv_run_bytes: float  # contiguous KV bytes per bank/page visit (layout parameter)
    behind_pcie: bool = False  # reached from the GPUs through the host's PCIe

    def __post_init__(self):
        _validate_positive(self, self.name)

    @property
    def capacity_gb(self) -> float:
        """Tier capacity in GB (1e9 bytes) = devices x device capacity."""
        return self.num_devices * self.device.capacity_gb

    @property
    def bank_groups_per_device(self) -> int:
        """Bank groups (or SSD channels) per device; see the device classes."""
        return self.device.bank_groups_per_device

    def device_effective_gbps(self, model=None) -> float:
        """One device's effective PIM attention throughput at this tier's KV run, GB/s.

        Args:
          model: anything with ``q_heads``, ``kv_heads``, ``head_dim`` and
            ``kv_bytes_per_value`` (a models.Model); None = multi-head attention (g = 1) at
            d = 128 with a 16-bit KV cache.
        """
        kv_bytes = 2 if model is None else model.kv_bytes_per_value
        return self.device.effective_gbps(self.kv_run_bytes, **_attention_shape(model),
                                          kv_bytes_per_value=kv_bytes)

    def effective_gbps(self, model=None) -> float:
        """Effective PIM attention throughput of the whole tier, GB/s."""
        return self.num_devices * self.device_effective_gbps(model)

    def bank_group_gbps(self, model=None) -> float:
        """One bank group's own KV rate at this tier's KV run, GB/s."""
        return self.device.bank_group_gbps(self.kv_run_bytes, **_attention_shape(model))

    @property
    def link_total_gbps(self) -> float:
        """The tier's device interfaces together, per direction, GB/s."""
        return self.num_devices * self.link_gbps


def _attention_shape(model) -> dict:
    if model is None:
        return {"gqa_group": 1, "head_dim": 128}
    return {"gqa_group": model.q_heads // model.kv_heads, "head_dim": model.head_dim}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """The GPU host: ``num_gpus`` H100s with tensor x pipeline parallelism [E, D]."""

    name: str
    num_gpus: int
    tensor_parallel: int
    pipeline_parallel: int
    peak_tflops: float  # dense BF16 per GPU [E]
    hbm_tbps: float  # HBM3 bandwidth per GPU [E]
    gemm_efficiency: float  # achievable fraction of peak FLOPs for large GEMMs [D]
    stream_efficiency: float  # achievable fraction of HBM bandwidth for streaming [D]
    nvlink_gbps: float  # per GPU, per direction [D]
    pcie_gbps: float  # per GPU, per direction [D]
    link_latency_us: float  # per collective / transfer step [D]
    kernel_overhead_us: float  # fixed launch/synchronisation cost per layer [D]
    activation_reserve: float  # fraction of GPU HBM kept for activations [D]
    gpus_per_node: int = 8  # GPUs sharing one NVLink domain [E] DGX H100
    rdma_gbps: float = 50.0  # per GPU, per direction, between nodes [E] 400 Gb/s NICs
    rdma_latency_us: float = 5.0  # per collective step between nodes [D]

    @property
    def nodes(self) -> int:
        """Nodes the GPUs span (ceil(num_gpus / gpus_per_node))."""
        return -(-self.num_gpus // self.gpus_per_node)

    @property
    def collective_gbps(self) -> float:
        """Per-GPU rate of a tensor-parallel all-reduce: NVLink inside one node, RDMA (the
        slowest link of a ring that leaves the node) once the TP group spans nodes."""
        return self.nvlink_gbps if self.tensor_parallel <= self.gpus_per_node else \
            self.rdma_gbps

    @property
    def collective_latency_us(self) -> float:
        """Per-step latency of a tensor-parallel all-reduce (NVLink or RDMA, as above)."""
        return self.link_latency_us if self.tensor_parallel <= self.gpus_per_node else \
            self.rdma_latency_us

    def __post_init__(self):
        _validate_positive(self, self.name)
        if self.tensor_parallel * self.pipeline_parallel != self.num_gpus:
            raise ConfigError(
                f"{self.name}.tensor_parallel*pipeline_parallel",
                (self.tensor_parallel, self.pipeline_parallel),
                f"must multiply to num_gpus={self.num_gpus}")
        for field in ("gemm_efficiency", "stream_efficiency", "activation_reserve"):
            if getattr(self, field) > 1:
                raise ConfigError(f"{self.name}.{field}", getattr(self, field), "must be <= 1")


@dataclasses.dataclass(frozen=True)
class Energy:
    """Energy coefficients, pJ per bit unless noted (PAM_SPEC §2 energy table)."""

    gpu_hbm_read: float = 3.6  # [E] FGDRAM-derived table used by AttAcc
    hbm_pim_bank_read: float = 0.55  # [E] same table
    hbm_pim_bank_group_read: float = 1.56  # [E] same table: RU reduction traffic
    nvlink: float = 1.3  # [E] GPU<->GPU / GPU<->PIM link
    pim_pu_factor: float = 3.0  # [P] PU arithmetic = factor x the device's read energy
    ddr_host_read: float = 20.0  # [D] DDR4 read incl. I/O
    ddr_pim_read: float = 2.0  # [D] near-bank DDR read
    ssd_nand_read: float = 30.0  # [D] NAND array read
    ssd_to_host: float = 10.0  # [D] NVMe/PCIe transfer, on top of the NAND read
    pcie: float = 10.0  # [D] host<->GPU PCIe transfer; same figure as the NVMe link share
    gpu_pj_per_flop: float = 0.5  # [D] pJ per FLOP
    # Static power, W, charged for every simulated second ([D] datasheet idle figures).
    gpu_idle_w: float = 75.0  # per GPU
    dimm_idle_w: float = 3.0  # per DDR DIMM
    ssd_idle_w: float = 5.0  # per SSD
    node_other_w: float = 1000.0  # per node: CPUs, NICs, fans

    def __post_init__(self):
        _validate_positive(self, "energy")


@dataclasses.dataclass(frozen=True)
class Platform:
    """A whole PAM host: GPUs, the three tiers (in TIER_NAMES order) and energy."""

    name: str
    gpu: Gpu
    hbm: Tier
    ddr: Tier
    ssd: Tier
    energy: Energy

    @property
    def tiers(self) -> tuple[Tier, Tier, Tier]:
        """(hbm, ddr, ssd): the tiers in TIER_NAMES order, the order of every [T] array."""
        return (self.hbm, self.ddr, self.ssd)

    @property
    def pcie_gbps(self) -> float:
        """The GPUs' PCIe links together, per direction, GB/s: what every byte between the
        GPUs and the host-side tiers (DDR, SSD) shares."""
        return self.gpu.num_gpus * self.gpu.pcie_gbps

    def path_gbps(self, tier: Tier) -> float:
        """Rate of the path between the GPUs and ``tier`` when it carries nothing else, GB/s:
        the tier's device interfaces, and the GPUs' PCIe for a tier behind the host."""
        return min(tier.link_total_gbps, self.pcie_gbps) if tier.behind_pcie \
            else tier.link_total_gbps

    @property
    def static_power_w(self) -> float:
        """Idle power of the whole platform, W: GPUs, DIMMs, SSDs and the rest of each node
        (PAM_SPEC §2 revised, [D]). The same for every system on this host."""
        e = self.energy
        return (self.gpu.num_gpus * e.gpu_idle_w + self.ddr.num_devices * e.dimm_idle_w
                + self.ssd.num_devices * e.ssd_idle_w + self.gpu.nodes * e.node_other_w)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Platform:
        """Return a copy with dotted fields replaced, e.g. ``{"ddr.num_devices": 80}``.

        Accepted paths: ``gpu.F``, ``energy.F``, ``<tier>.F`` and ``<tier>.device.F``.
        Overrides apply one at a time, in order, and each intermediate platform must be valid
        (so a new GPU count needs :meth:`with_parallelism`, or a platform file from
        :mod:`pamjax.config_files`, which applies a section's fields together).

        Args:
          overrides: dotted field path -> new value, in the field's unit.

        Returns:
          A new Platform; ``self`` is unchanged.

        Raises:
          UnknownNameError: an unknown path or field.
          ConfigError: an invalid value.
        """
        platform = self
        for path, value in overrides.items():
            parts = path.split(".")
            head = parts[0]
            if head not in ("gpu", "energy", *TIER_NAMES) or len(parts) not in (2, 3):
                raise UnknownNameError(
                    "hardware field", path, ["gpu.<f>", "energy.<f>", "<tier>.<f>",
                                             "<tier>.device.<f>"])
            part = getattr(platform, head)
            if len(parts) == 3:
                if parts[1] != "device" or head not in TIER_NAMES:
                    raise UnknownNameError("hardware field", path, ["<tier>.device.<f>"])
                device = _replace_checked(part.device, f"{head}.device", {parts[2]: value})
                part = dataclasses.replace(part, device=device)
            else:
                part = _replace_checked(part, head, {parts[1]: value})
            platform = dataclasses.replace(platform, **{head: part})
        return platform

    def scaled(self, factor: int) -> Platform:
        """The same node replicated ``factor`` times: GPUs and every tier's devices.

        Args:
          factor: integer >= 1; the extra GPUs join tensor parallelism.

        Returns:
          A new Platform with ``factor`` x the GPUs, tensor-parallel degree and devices of
          every tier.
        """
        if not isinstance(factor, int) or factor < 1:
            raise ConfigError("scale factor", factor, "must be an integer >= 1")
        gpu = dataclasses.replace(self.gpu, num_gpus=self.gpu.num_gpus * factor,
                                  tensor_parallel=self.gpu.tensor_parallel * factor)
        return dataclasses.replace(self, gpu=gpu).with_overrides(
            {f"{t}.num_devices": getattr(self, t).num_devices * factor for t in TIER_NAMES})

    def with_parallelism(self, tensor_parallel: int, pipeline_parallel: int) -> Platform:
        """The same hardware with another TP x PP split (GPU count follows).

        Args:
          tensor_parallel, pipeline_parallel: degrees, integers >= 1.

        Returns:
          A new Platform with ``num_gpus = tensor_parallel * pipeline_parallel``.
        """
        return dataclasses.replace(self, gpu=dataclasses.replace(
            self.gpu, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
            num_gpus=tensor_parallel * pipeline_parallel))


# ------------------------------------------------------------------------------------------
# Presets (PAM_SPEC §2). Published figures as published; organisation details the publication
# leaves implicit are marked [D] with the standard they come from.
# ------------------------------------------------------------------------------------------

HBM3_PIM_STACK = DramPimDevice(
    name="hbm3-pim-stack",
    channels=16, pseudo_channels=2, ranks=2, chips_per_rank=1,
    bank_groups=4, banks_per_group=4,
    rows_per_bank=16384,  # [D] HBM3 16 GB stack: 16 MB/bank at 1 KB rows
    row_bytes=1024,  # [D] HBM3 page per pseudo-channel bank
    column_bytes=32,  # [D] 32-bit pseudo-channel x BL8
    bus_bits=1024, pin_gbps=5.2, transfers_per_clock=4,
    tRCD=19, tRP=19, tRAS=45, tRC=0, tCCD_S=2, tCCD_L=4, tBL=4,
    pu_clock_ghz=0.666, pu_lanes=16, pu_buffer_bytes=512,
    compute_cap_gflops=1600.0, reduction_units=128,
)

DDR4_3200_PIM_DIMM = DramPimDevice(
    name="ddr4-3200-pim-dimm",
    channels=1, pseudo_channels=1, ranks=2, chips_per_rank=8,
    bank_groups=2, banks_per_group=4,
    rows_per_bank=262144,  # [D] 2 GB x8 chip, 8 banks: 256 MB/bank at 1 KB rows
    row_bytes=1024,  # [D] x8 DDR4 page
    column_bytes=8,  # [D] x8 chip x BL8
    bus_bits=64, pin_gbps=3.2, transfers_per_clock=2,
    tRCD=24, tRP=24, tRAS=52, tRC=76, tCCD_S=4, tCCD_L=8, tBL=4,  # tRAS [D] = tRC - tRP
    pu_clock_ghz=0.5, pu_lanes=4, pu_buffer_bytes=128,
    compute_cap_gflops=204.0, reduction_units=4,
)

SSD_PIM = SsdPimDevice(
    name="ssd-pim",
    channels=8, dies_per_channel=4, page_bytes=16384, tR_us=30.0,
    channel_mts=2400.0, channel_bus_bits=8, channel_capacity_gb=256.0,
    pu_count=64, pu_clock_ghz=1.0, pu_lanes=16, compute_cap_gflops=18.0,
    reduction_units=8, host_link_gbps=14.0,
)

H100_DGX = Gpu(
    name="gpu", num_gpus=8, tensor_parallel=4, pipeline_parallel=2,
    peak_tflops=989.0, hbm_tbps=3.35, gemm_efficiency=0.7, stream_efficiency=0.85,
    nvlink_gbps=450.0, pcie_gbps=63.0, link_latency_us=2.0, kernel_overhead_us=5.0,
    activation_reserve=0.10,
)


def _pam_dgx_h100() -> Platform:
    energy = Energy()
    return Platform(
        name="pam-dgx-h100",
        gpu=H100_DGX,
        # 5 stacks per GPU; the link is the stack's own interface to its GPU.
        hbm=Tier("hbm", HBM3_PIM_STACK, num_devices=40,
                 link_gbps=HBM3_PIM_STACK.external_gbps, link_latency_us=0.5,
                 pim_read_pj_per_bit=energy.hbm_pim_bank_read,
                 host_read_pj_per_bit=energy.gpu_hbm_read, kv_run_bytes=1024),
        ddr=Tier("ddr", DDR4_3200_PIM_DIMM, num_devices=40,
                 link_gbps=DDR4_3200_PIM_DIMM.external_gbps, link_latency_us=2.0,
                 pim_read_pj_per_bit=energy.ddr_pim_read,
                 host_read_pj_per_bit=energy.ddr_host_read + energy.pcie, kv_run_bytes=1024,
                 behind_pcie=True),
        ssd=Tier("ssd", SSD_PIM, num_devices=8,
                 link_gbps=SSD_PIM.host_link_gbps, link_latency_us=10.0,
                 pim_read_pj_per_bit=energy.ssd_nand_read,
                 host_read_pj_per_bit=energy.ssd_nand_read + energy.ssd_to_host,
                 kv_run_bytes=16384, behind_pcie=True),
        energy=energy,
    )


PLATFORMS = {"pam-dgx-h100": _pam_dgx_h100}
"""Platform presets by name (functions, so each call gets a fresh value)."""


def get_platform(name: str = "pam-dgx-h100", overrides: Mapping[str, Any] | None = None
                 ) -> Platform:
    """Look up a platform preset and apply dotted-field overrides.

    Args:
      name: preset name (see ``PLATFORMS``).
      overrides: e.g. ``{"ddr.num_devices": 80, "gpu.gemm_efficiency": 0.6}``.

    Returns:
      A fresh :class:`Platform`.

    Raises:
      UnknownNameError: unknown preset or field.
      ConfigError: a value that is zero, negative or not finite.
    """
    if name not in PLATFORMS:
        raise UnknownNameError("platform", name, PLATFORMS)
    platform = PLATFORMS[name]()
    return platform.with_overrides(overrides) if overrides else platform
