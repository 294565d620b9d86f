"""What each conclusion hinges on: the [D] assumptions, their ranges, and vectorized
sensitivity analysis of a comparison (issue 18).

Every figure PAM_SPEC tags [D] (a pamjax default where the publication is silent) is a row of
:data:`PARAMETERS`: its nominal value, a plausible engineering range (low, high) and the
reason for that range. Ranges come from datasheets and the engineering literature, never
from a result.

A perturbed configuration is built the way a user's override builds it, so derived
quantities follow (:func:`configure`):

* ``platform``: ``Platform.with_overrides({name: value})``; capacities, PIM rates, paths and
  static power are derived from it by systems.make_params. An energy figure that the preset
  copies into a tier's field when it builds the platform (DDR/SSD read energies, the PCIe
  share) also sets that tier field (``follows``), as a platform file that changes the energy
  table would; without that the override would change nothing.
* ``access``: ``dataclasses.replace(AccessModel, ...)``; ``knobs``: ``Knobs`` likewise;
  ``system``: the field of every compared System that uses it (the swap budget of the
  systems that schedule online), as a ``--system-file`` with ``base`` would.
* PAM's x:y:1 target is *recalibrated* for every configuration (systems.pam_targets with
  the configuration's platform, access model and knobs), as it is for a user's override.

Evaluation (:func:`evaluate`): every (sample, system, batch) is one SimParams; identical
ones are simulated once (a one-at-a-time step of a parameter system B does not read leaves
B unchanged). They run at steady state (studies.study.run_steady) as vmapped batches of
``width`` configurations, every batch one call of the same compiled program, and the rows
are the study's own (studies.study.point_row). The metric of a sample is A/B throughput
(``ratio``), A/B energy per output token (``energy``) or A's throughput (``throughput``),
at ``--batch N`` or at each system's peak under ``--slo-ms`` over a batch grid.

Methods (SALib, an optional extra): Morris elementary effects (screening; mu_star and sigma
in metric units per *whole documented range* of the parameter, the sampling space being the
unit cube mapped onto [low, high], log-scaled where the range spans a factor) and Sobol
indices (S1, ST; mu_star and sigma from the radial one-at-a-time pairs of the Saltelli
design).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from pamjax.errors import ConfigError, PamjaxError, UnknownNameError
from pamjax.hardware import Platform, get_platform
from pamjax.locality import AccessModel
from pamjax.models import Model
from pamjax.progress import Progress
from pamjax.simulation import choose_page_size, make_config
from pamjax.studies.study import (
    POOL_REQUESTS,
    UNIT_BUDGET,
    SweepPoint,
    point_row,
    run_steady,
    slot_classes,
    steady_requests,
)
from pamjax.systems import Knobs, System, get_system, make_params, max_bank_groups
from pamjax.workload import Workload, steady_state, synthetic

KINDS = ("platform", "access", "knobs", "system")


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One [D] assumption and its documented range.

    Fields:
      name: dotted name: a Platform override path (``gpu.pcie_gbps``), ``access.<field>``,
        ``knobs.<field>`` or ``system.<field>``.
      kind: how it reaches the engine (KINDS; see the module docstring).
      nominal, low, high: the default and the plausible range, in ``unit``.
      unit: the unit of the three values.
      reason: where the range comes from.
      integer: the field takes integers (sampled values are rounded).
      log: sample on a log scale (the range spans a factor rather than an offset).
      limits: (lo, hi) the field's valid values, for searches beyond the range.
      follows: names of tier fields the preset derives from this energy figure and that
        follow it (see :func:`configure`).
    """

    name: str
    kind: str
    nominal: float
    low: float
    high: float
    unit: str
    reason: str
    integer: bool = False
    log: bool = False
    limits: tuple[float, float] = (0.0, math.inf)
    follows: tuple[str, ...] = ()

    def value(self, u):
        """Map unit-cube coordinates ``u`` (array in [0, 1]) onto [low, high]."""
        u = np.asarray(u, np.float64)
        if self.log:
            v = self.low * (self.high / self.low) ** u
        else:
            v = self.low + u * (self.high - self.low)
        return np.round(v) if self.integer else v

    @property
    def field(self) -> str:
        """The name without its ``access.``/``knobs.``/``system.`` prefix."""
        return self.name.split(".", 1)[1] if self.kind != "platform" else self.name


def _p(name, kind, nominal, low, high, unit, reason, **kw) -> Parameter:
    return Parameter(name, kind, float(nominal), float(low), float(high), unit, reason, **kw)


PARAMETERS: tuple[Parameter, ...] = (
    # GPU host (PAM_SPEC §2: achievable fractions, links, latencies, reserve) ---------------
    _p("gpu.gemm_efficiency", "platform", 0.7, 0.5, 0.85, "fraction of peak",
       "large BF16 GEMMs on H100 sustain ~50-85% of dense peak (MLPerf/vendor GEMM "
       "benchmarks); small decode batches sit at the low end", limits=(0.05, 1.0)),
    _p("gpu.stream_efficiency", "platform", 0.85, 0.7, 0.95, "fraction of peak",
       "streaming HBM3 reads reach ~70-95% of the 3.35 TB/s peak (STREAM-like kernels)",
       limits=(0.05, 1.0)),
    _p("gpu.nvlink_gbps", "platform", 450, 300, 450, "GB/s per GPU per direction",
       "NVLink4 peak is 450 GB/s each way; all-reduces achieve ~2/3 of it (NCCL busbw)",
       limits=(10, 2000)),
    _p("gpu.pcie_gbps", "platform", 63, 32, 63, "GB/s per GPU per direction",
       "PCIe Gen4 x16 (32 GB/s) to Gen5 x16 peak (63 GB/s); a shared switch lowers it",
       limits=(1, 1000), log=True),
    _p("gpu.link_latency_us", "platform", 2.0, 1.0, 5.0, "us",
       "NCCL small-message all-reduce step latency inside a node: ~1-5 us", log=True,
       limits=(0.01, 1000)),
    _p("gpu.kernel_overhead_us", "platform", 5.0, 2.0, 10.0, "us per layer",
       "kernel launch and synchronisation per layer: ~2 us with CUDA graphs, ~10 us "
       "without", log=True, limits=(0.01, 1000)),
    _p("gpu.activation_reserve", "platform", 0.10, 0.05, 0.20, "fraction of HBM",
       "vLLM's gpu_memory_utilization 0.8-0.95 leaves 5-20% of HBM outside the KV cache",
       limits=(0.01, 0.9)),
    # Tier links and layouts ----------------------------------------------------------------
    _p("hbm.link_latency_us", "platform", 0.5, 0.2, 1.0, "us",
       "an on-package HBM-PIM command round trip: sub-microsecond", log=True,
       limits=(0.001, 1000)),
    _p("ddr.link_latency_us", "platform", 2.0, 1.0, 5.0, "us",
       "a host DDR access through PCIe and the memory controller: ~1-5 us", log=True,
       limits=(0.01, 1000)),
    _p("ssd.link_latency_us", "platform", 10.0, 5.0, 20.0, "us",
       "an NVMe command round trip (submission to completion) is ~5-20 us", log=True,
       limits=(0.1, 10000)),
    _p("hbm.kv_run_bytes", "platform", 1024, 256, 1024, "bytes per bank visit",
       "KV contiguous per bank: a full 1 KB HBM3 row (nominal) down to a 256 B fragment of "
       "a paged layout", log=True, limits=(32, 1024)),
    _p("ddr.kv_run_bytes", "platform", 1024, 256, 1024, "bytes per bank visit",
       "as for HBM: a full 1 KB DDR4 x8 page down to a 256 B fragment", log=True,
       limits=(8, 1024)),
    _p("ssd.num_devices", "platform", 8, 4, 16, "SSDs",
       "the publication says 8 TB (4 SSDs of 8 x 256 GB channels) in its text and 64 "
       "channels x 256 GB in its table; 16 doubles the nominal", integer=True, log=True,
       limits=(1, 64)),
    _p("ssd.device.pu_buffer_bytes", "platform", 65536, 512, 65536, "bytes per PU",
       "controller SRAM per PU is unpublished: from an HBM-PIM-sized 512 B buffer (more "
       "passes over the KV) to 64 KB", integer=True, log=True, limits=(256, 1 << 20)),
    # Energy (PAM_SPEC §2 table, [D] rows) and static power ---------------------------------
    _p("energy.ddr_host_read", "platform", 20.0, 10.0, 40.0, "pJ/bit",
       "DDR4 read incl. I/O: ~10-40 pJ/bit in the DRAM energy literature", log=True,
       follows=("ddr.host_read_pj_per_bit",), limits=(0.1, 1000)),
    _p("energy.ddr_pim_read", "platform", 2.0, 1.0, 4.0, "pJ/bit",
       "near-bank DDR4 read (no I/O): ~1-4 pJ/bit (UPMEM/AiM-class estimates)", log=True,
       follows=("ddr.pim_read_pj_per_bit",), limits=(0.01, 100)),
    _p("energy.ssd_nand_read", "platform", 30.0, 15.0, 60.0, "pJ/bit",
       "NAND array read: ~15-60 pJ/bit across TLC generations", log=True,
       follows=("ssd.pim_read_pj_per_bit", "ssd.host_read_pj_per_bit"), limits=(0.1, 1000)),
    _p("energy.ssd_to_host", "platform", 10.0, 5.0, 20.0, "pJ/bit",
       "NVMe/PCIe transfer energy: ~5-20 pJ/bit (SerDes plus controller)", log=True,
       follows=("ssd.host_read_pj_per_bit",), limits=(0.1, 1000)),
    _p("energy.pcie", "platform", 10.0, 5.0, 20.0, "pJ/bit",
       "PCIe Gen5 link energy: ~5-20 pJ/bit end to end", log=True,
       follows=("ddr.host_read_pj_per_bit",), limits=(0.1, 1000)),
    _p("energy.gpu_pj_per_flop", "platform", 0.5, 0.3, 1.0, "pJ/FLOP",
       "H100 at ~700 W and ~700 dense TFLOPS is ~1 pJ/FLOP board-level; 0.3 is the core "
       "arithmetic alone", log=True, limits=(0.01, 100)),
    _p("energy.gpu_idle_w", "platform", 75.0, 50.0, 100.0, "W per GPU",
       "H100 SXM idle board power: ~50-100 W (nvidia-smi readings)", limits=(1, 700)),
    _p("energy.dimm_idle_w", "platform", 3.0, 1.5, 5.0, "W per DIMM",
       "DDR4 RDIMM idle/self-refresh: ~1.5-5 W", limits=(0.1, 50)),
    _p("energy.ssd_idle_w", "platform", 5.0, 3.0, 8.0, "W per SSD",
       "enterprise NVMe idle: ~3-8 W (datasheets)", limits=(0.1, 50)),
    _p("energy.node_other_w", "platform", 1000.0, 500.0, 2000.0, "W per node",
       "DGX-class CPUs, NICs, fans and PSU loss at idle: ~0.5-2 kW", log=True,
       limits=(1, 10000)),
    # Access model (PAM_SPEC §5: persistence and spread of attention) -----------------------
    _p("access.sigma", "access", 2.5, 1.5, 3.5, "logit",
       "spread of log-importance: 1.5 puts ~75%, 3.5 ~97% of the mass on the top 1/8 "
       "(Keyformer ~90%, H2O >95% below 1% of the max)", limits=(0.0, 10.0)),
    _p("access.persistence", "access", 0.995, 0.95, 0.999, "per step",
       "AR(1) persistence of importance: 0.95 is Scissorhands' floor read per step, "
       "0.999 nearly static attention", limits=(0.0, 1.0)),
    _p("access.sink_tokens", "access", 4, 1, 8, "tokens",
       "StreamingLLM: 1-4 sinks suffice; 8 is generous", integer=True, limits=(0, 64)),
    _p("access.sink_bonus", "access", 8.0, 4.0, 12.0, "logit",
       "how surely the sinks are selected: from likely (4) to always (12)",
       limits=(0.0, 50.0)),
    _p("access.recency_bonus", "access", 6.0, 3.0, 9.0, "logit",
       "how surely the newest tokens are selected (local window strength)",
       limits=(0.0, 50.0)),
    _p("access.recency_tokens", "access", 32.0, 16.0, 128.0, "tokens",
       "e-folding length of the local window: 16-128 tokens (sliding windows in "
       "StreamingLLM/H2O use 64-256 recent tokens)", log=True, limits=(1.0, 4096.0)),
    # Modelling knobs and PAM's policy figures ----------------------------------------------
    _p("knobs.calibration_context", "knobs", 2048, 512, 8192, "tokens",
       "reference request of PAM's x:y calibration: from a dialogue turn to a long "
       "document (PAM_SPEC §5 revised: a stated reference point)", integer=True, log=True,
       limits=(16, 65536)),
    _p("knobs.prefill_token_budget", "knobs", 8192, 2048, 16384, "tokens per step",
       "vLLM max_num_batched_tokens: 2048 (chunked-prefill default) to 16384",
       integer=True, log=True, limits=(64, 1 << 20)),
    _p("system.swap_budget", "system", 8, 2, 32, "tokens per request per phase",
       "PAM's per-step swap budget is unpublished ('a small fraction of tokens moves'); "
       "a factor of 4 either way", integer=True, log=True, limits=(1, 4096)),
    _p("knobs.naive_run_tokens", "knobs", 64, 16, 256, "tokens",
       "sequential-mapping run length; read only by the sequential mapping, which no main "
       "system uses (a control: its effect must be zero)", integer=True, log=True,
       limits=(1, 4096)),
)
"""Every [D] assumption with its documented range (the README renders this table)."""

PARAMETERS_BY_NAME = {p.name: p for p in PARAMETERS}


def get_parameters(names: Sequence[str] | None = None) -> tuple[Parameter, ...]:
    """The parameters called ``names`` (all of :data:`PARAMETERS` for None)."""
    if names is None:
        return PARAMETERS
    for name in names:
        if name not in PARAMETERS_BY_NAME:
            raise UnknownNameError("sensitivity parameter", name, PARAMETERS_BY_NAME)
    return tuple(PARAMETERS_BY_NAME[n] for n in names)


def parameter_table_markdown(parameters: Sequence[Parameter] = PARAMETERS) -> str:
    """The table of :data:`PARAMETERS` as Markdown (name, nominal, low, high, unit, how it
    reaches the engine, reason)."""
    how = {"platform": "Platform override", "access": "AccessModel", "knobs": "Knobs",
           "system": "System (schedulers)"}
    header = "| parameter | nominal | low | high | unit | reaches the engine as | range: reason |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for p in parameters:
        extra = f" (+ {', '.join(p.follows)})" if p.follows else ""
        lines.append(f"| `{p.name}` | {p.nominal:g} | {p.low:g} | {p.high:g} | {p.unit} | "
                     f"{how[p.kind]}{extra} | {p.reason} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Building a perturbed configuration
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Base:
    """What a perturbation starts from: the user's platform, access model and knobs."""

    platform: Platform
    access: AccessModel
    knobs: Knobs


_FOLLOWS = {"ddr.host_read_pj_per_bit": ("ddr_host_read", "pcie"),
            "ddr.pim_read_pj_per_bit": ("ddr_pim_read",),
            "ssd.pim_read_pj_per_bit": ("ssd_nand_read",),
            "ssd.host_read_pj_per_bit": ("ssd_nand_read", "ssd_to_host")}
"""Tier energy fields and the energy-table figures the preset sums into them."""


def _followed(base: Platform, platform: Platform, field: str) -> float:
    """A tier energy field moved by the change of the energy figures it derives from (the
    base's own value plus the change, so a platform file's own tier value is kept)."""
    tier, name = field.split(".")
    change = sum(getattr(platform.energy, e) - getattr(base.energy, e) for e in _FOLLOWS[field])
    return getattr(getattr(base, tier), name) + change


def configure(base: Base, values: Mapping[str, float], system: System | str
              ) -> tuple[Platform, AccessModel, Knobs, System]:
    """The platform, access model, knobs and system of one perturbed configuration.

    Args:
      base: the unperturbed setup.
      values: {parameter name: value} (names of :data:`PARAMETERS`; others untouched).
      system: the system to configure (a System or its name).

    Returns:
      (platform, access, knobs, system), each built as a user's override builds it.
    """
    system = get_system(system) if isinstance(system, str) else system
    overrides, access, knobs, follows = {}, {}, {}, set()
    for name, value in values.items():
        p = PARAMETERS_BY_NAME.get(name) or get_parameters([name])[0]
        value = round(float(value)) if p.integer else float(value)
        if p.kind == "platform":
            overrides[name] = value
            follows.update(p.follows)
        elif p.kind == "access":
            access[p.field] = float(value)
        elif p.kind == "knobs":
            knobs[p.field] = value
        elif p.kind == "system" and getattr(system, p.field):
            # Only a system that uses the policy gets it (swap budget 0 = no scheduling).
            system = dataclasses.replace(system, **{p.field: value})
    platform = base.platform.with_overrides(overrides) if overrides else base.platform
    if follows:
        platform = platform.with_overrides(
            {f: _followed(base.platform, platform, f) for f in sorted(follows)})
    return (platform, dataclasses.replace(base.access, **access),
            dataclasses.replace(base.knobs, **knobs), system)


# ---------------------------------------------------------------------------------------------
# Vectorized evaluation
# ---------------------------------------------------------------------------------------------

METRICS = ("ratio", "throughput", "energy")
"""``ratio``: A/B output tokens/s; ``throughput``: A's tokens/s; ``energy``: A/B J/token."""

DEFAULT_WIDTH = 32
"""Configurations per compiled call (the vmap width) unless told otherwise."""


@dataclasses.dataclass(frozen=True)
class Study:
    """One comparison whose sensitivity is analysed.

    Fields:
      model: a model name or Model; pool: the request population (a dataset's synthetic
        draw or a trace's lengths); systems: (A, B) or (A,) for ``throughput``.
      batch: the fixed batch, or None with ``slo_ms``: each system's peak throughput under
        the SLO over ``slo_batches`` (as `pamjax compare` reports it).
      metric: a METRICS name; base: the unperturbed platform, access model and knobs.
      steps, warmup: measuring window and warm-up per point (engine steps).
      seed: population, steady-state draw and access-model seed.
      width: configurations per compiled call; page_size: tokens per KV unit (None: from
        ``width`` x the largest batch and the unit budget, fixed for the whole study).
      chunk_steps: steps per compiled call of the rollout.

    The metric reads the first one or two systems; further systems are simulated alongside
    (their figures are in Evaluation.throughput and .energy), so one evaluation serves
    several comparisons that share a system.
    """

    model: Model | str
    pool: Workload
    systems: tuple
    base: Base
    batch: int | None = None
    slo_ms: float | None = None
    slo_batches: tuple[int, ...] = (64, 128, 256, 512, 1024)
    metric: str = "ratio"
    steps: int = 32
    warmup: int = 16
    seed: int = 0
    width: int = DEFAULT_WIDTH
    page_size: int | None = None
    chunk_steps: int = 16

    def __post_init__(self):
        if self.metric not in METRICS:
            raise UnknownNameError("metric", self.metric, METRICS)
        if (self.batch is None) == (self.slo_ms is None):
            raise ConfigError("batch", self.batch, "give exactly one of batch and slo_ms")
        need = 1 if self.metric == "throughput" else 2
        if len(self.systems) < need:
            raise ConfigError("systems", [_name(s) for s in self.systems],
                              f"metric {self.metric!r} needs {need} system(s)")
        for field in ("steps", "warmup", "width", "chunk_steps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(field, value, "must be an integer >= 1")

    @property
    def batches(self) -> tuple[int, ...]:
        """The batch sizes every configuration runs at."""
        return (self.batch,) if self.batch is not None else tuple(sorted(self.slo_batches))


def make_study(model, workload: Workload | str, systems, *, platform: Platform | None = None,
               access: AccessModel | None = None, knobs: Knobs | None = None, seed: int = 0,
               **kwargs) -> Study:
    """A :class:`Study` of ``workload`` (a dataset name: its POOL_REQUESTS-request draw, as
    the study's sweeps use; or a Workload such as a trace: its lengths).

    Args:
      model, systems: the comparison; platform, access, knobs: the unperturbed setup
        (defaults: presets); seed; **kwargs: further :class:`Study` fields.
    """
    pool = synthetic(workload, POOL_REQUESTS, seed=seed) if isinstance(workload, str) \
        else workload
    base = Base(platform or get_platform(), access or AccessModel(), knobs or Knobs())
    return Study(model=model, pool=pool, systems=tuple(systems), base=base, seed=seed,
                 **kwargs)


@dataclasses.dataclass
class Evaluation:
    """Outcome of :func:`evaluate`.

    Fields:
      metric: f64 [n], the metric of every sample.
      throughput: f64 [n, S] tokens/s of each system (0 where nothing fits or meets the
        SLO); energy: f64 [n, S] J per output token (NaN where nothing is served).
      simulations: distinct configurations simulated; compiled_calls: calls of compiled
        programs that ran them (rollout chunks and steady-state resumes);
      compilations: XLA compilations while evaluating; wall_seconds.
    """

    metric: np.ndarray
    throughput: np.ndarray
    energy: np.ndarray
    simulations: int
    compiled_calls: int
    compilations: int
    wall_seconds: float


_COMPILES = [0]


def _count_compiles(event: str, *_args, **_kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def _name(system) -> str:
    return system if isinstance(system, str) else system.name


def _key(params) -> tuple:
    return tuple(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(params))


def evaluate(study: Study, values: Sequence[Mapping[str, float]], *,
             progress: str | None = None) -> Evaluation:
    """The metric of every configuration ``values[i]`` (one vmapped study for them all).

    Args:
      study: the comparison; values: n dicts {parameter name: value}.
      progress: a label for the progress display (stderr), or None.

    Returns:
      Evaluation.
    """
    start, compiles = time.perf_counter(), _COMPILES[0]
    if not values:
        empty = np.zeros((0, len(study.systems)))
        return Evaluation(np.zeros(0), empty, empty, 0, 0, 0, 0.0)
    batches = study.batches
    page = study.page_size or choose_page_size(study.width * max(batches),
                                               study.pool.max_context, UNIT_BUDGET)
    configs: dict = {}  # (batch, params key) -> (index, SimParams, SweepPoint)
    where = np.zeros((len(values), len(study.systems), len(batches)), np.int64)
    for i, sample in enumerate(values):
        for j, system in enumerate(study.systems):
            platform, access, knobs, sys_ = configure(study.base, sample, system)
            for k, b in enumerate(batches):
                params = make_params(sys_, study.model, platform, access, max_batch=b,
                                     page_size=page, knobs=knobs)
                key = (b, _key(params))
                if key not in configs:
                    point = SweepPoint(sys_, b, study.model, platform, "", access)
                    configs[key] = (len(configs), params, point)
                where[i, j, k] = configs[key][0]
    rows, calls = _simulate(study, list(configs.values()), page, progress)
    thr = np.array([r["throughput_tokens_per_s"] if not r["oom"] else 0.0 for r in rows])
    tpot = np.array([r["tpot_p99_ms"] for r in rows])
    energy = np.array([r["energy_j_per_token"] if not r["oom"] else np.nan for r in rows])
    meets = thr > 0 if study.slo_ms is None else (thr > 0) & (tpot <= study.slo_ms)
    score = np.where(meets, thr, 0.0)[where]  # [n, S, B]
    best = np.argmax(score, axis=-1)  # the peak batch (the only one at a fixed batch)
    throughput = np.take_along_axis(score, best[..., None], -1)[..., 0]
    energy = np.take_along_axis(energy[where], best[..., None], -1)[..., 0]
    energy = np.where(throughput > 0, energy, np.nan)
    metric = _metric(study.metric, throughput, energy)
    return Evaluation(metric, throughput, energy, len(configs), calls,
                      _COMPILES[0] - compiles, time.perf_counter() - start)


def _metric(name: str, throughput: np.ndarray, energy: np.ndarray) -> np.ndarray:
    if name == "throughput":
        return throughput[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        if name == "ratio":
            return np.where(throughput[:, 1] > 0, throughput[:, 0] / throughput[:, 1], np.inf)
        return energy[:, 0] / energy[:, 1]


def _simulate(study: Study, configs: list, page: int, progress: str | None):
    """Run every distinct configuration at steady state, a slot class at a time, in vmapped
    calls of ``study.width``; (rows in ``configs`` order, compiled calls made)."""
    rows: list = [None] * len(configs)
    calls = 0
    bar = Progress(len(configs), desc=progress or "", unit="config",
                   enabled=progress is not None)
    for group in slot_classes(study.batches):
        mine = [c for c in configs if c[2].batch in group]
        if not mine:
            continue
        requests = steady_requests(study.pool, group[-1], study.warmup + study.steps)
        work = {b: steady_state(study.pool, b, requests, seed=study.seed) for b in group}
        config = make_config(max(work.values(), key=lambda w: w.max_context), group[-1],
                             page_size=page,
                             padded_bank_groups=max(max_bank_groups(c[2].platform)
                                                    for c in mine))
        for lo in range(0, len(mine), study.width):
            part = mine[lo:lo + study.width]
            # Pad to the width with the first configuration: every call has one shape.
            padded = part + [part[0]] * (study.width - len(part))
            loads = [work[c[2].batch] for c in padded]
            opened, final, metrics = run_steady(
                config, [c[1] for c in padded], loads if len(group) > 1 else loads[0],
                study.steps, study.warmup, study.seed, chunk_steps=study.chunk_steps)
            chunk = math.gcd(math.gcd(study.warmup, study.steps), study.chunk_steps)
            calls += 1 + (study.warmup + study.steps) // chunk  # resume + rollout chunks
            for i, (index, _, point) in enumerate(part):
                take = jax.tree.map(lambda x, i=i: x[i], (metrics, opened, final))
                rows[index] = point_row(point, *take, work[point.batch], page)
            bar.update(len(part))
    bar.close()
    return rows, calls


# ---------------------------------------------------------------------------------------------
# Designs and indices (SALib)
# ---------------------------------------------------------------------------------------------

METHODS = ("morris", "sobol")
MORRIS_LEVELS = 4


def _salib():
    try:
        import SALib  # noqa: F401
    except ImportError:
        raise PamjaxError("sensitivity analysis needs SALib: pip install 'pamjax[sensitivity]' "
                          "(or pip install 'SALib>=1.5')") from None
    from SALib.analyze import morris as morris_analyze
    from SALib.analyze import sobol as sobol_analyze
    from SALib.sample import morris as morris_sample
    from SALib.sample import sobol as sobol_sample
    return morris_sample, morris_analyze, sobol_sample, sobol_analyze


def _problem(parameters: Sequence[Parameter]) -> dict:
    # The design lives in the unit cube; Parameter.value maps it onto [low, high].
    return {"num_vars": len(parameters), "names": [p.name for p in parameters],
            "bounds": [[0.0, 1.0]] * len(parameters)}


def design(parameters: Sequence[Parameter], method: str, samples: int, seed: int = 0
           ) -> np.ndarray:
    """Unit-cube sample points of a SALib design.

    Args:
      parameters: the factors; method: ``morris`` (``samples`` trajectories, 4 levels,
        (k + 1) x samples points) or ``sobol`` (Saltelli, ``samples`` base points rounded
        up to a power of two, no second order: (k + 2) x samples points).

    Returns:
      f64 [points, k] in [0, 1].
    """
    morris_sample, _, sobol_sample, _ = _salib()
    if method not in METHODS:
        raise UnknownNameError("method", method, METHODS)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ConfigError("samples", samples, "must be an integer >= 2")
    problem = _problem(parameters)
    if method == "morris":
        return morris_sample.sample(problem, samples, num_levels=MORRIS_LEVELS, seed=seed)
    n = 1 << (samples - 1).bit_length()
    return sobol_sample.sample(problem, n, calc_second_order=False, seed=seed)


def analyze(parameters: Sequence[Parameter], method: str, unit: np.ndarray, y: np.ndarray,
            seed: int = 0) -> list[dict]:
    """Indices of every parameter from a design's points ``unit`` and outputs ``y``.

    Morris: mu_star and sigma of the elementary effects (metric change per whole
    documented range). Sobol: S1 and ST, and mu_star and sigma of the radial pairs of the
    Saltelli design (row A and row AB_j differ in factor j alone).

    Returns:
      one dict per parameter: name, nominal, low, high, unit, mu_star, sigma (+ mu and,
      for Sobol, S1, ST and their confidence half-widths).
    """
    _, morris_analyze, _, sobol_analyze = _salib()
    y = np.asarray(y, np.float64)
    if not np.all(np.isfinite(y)):
        raise PamjaxError(f"{int(np.sum(~np.isfinite(y)))} of {y.size} evaluations have no "
                          "finite metric (system B served nothing): narrow the ranges or "
                          "change the batch/SLO")
    problem = _problem(parameters)
    out = [{"name": p.name, "nominal": p.nominal, "low": p.low, "high": p.high,
            "unit": p.unit} for p in parameters]
    if method == "morris":
        res = morris_analyze.analyze(problem, unit, y, num_levels=MORRIS_LEVELS, seed=seed)
        for row, mu_star, sigma, mu in zip(out, res["mu_star"], res["sigma"], res["mu"]):
            row.update(mu_star=float(mu_star), sigma=float(sigma), mu=float(mu))
        return out
    res = sobol_analyze.analyze(problem, y, calc_second_order=False, seed=seed)
    effects = _radial_effects(unit, y, len(parameters))
    for j, row in enumerate(out):
        row.update(mu_star=float(np.mean(np.abs(effects[:, j]))),
                   sigma=float(np.std(effects[:, j], ddof=1)) if len(effects) > 1 else 0.0,
                   mu=float(np.mean(effects[:, j])), S1=float(res["S1"][j]),
                   ST=float(res["ST"][j]), S1_conf=float(res["S1_conf"][j]),
                   ST_conf=float(res["ST_conf"][j]))
    return out


def _radial_effects(unit: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Elementary effects [N, k] of a Saltelli design without second order: rows come in
    blocks of k + 2 (A, AB_1..AB_k, B), and AB_j is A with factor j taken from B."""
    blocks = unit.reshape(-1, k + 2, k)
    out = y.reshape(-1, k + 2)
    step = blocks[:, 1 + np.arange(k), np.arange(k)] - blocks[:, 0, :]  # [N, k]
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = (out[:, 1:k + 1] - out[:, :1]) / step
    return np.where(step != 0, effect, 0.0)


def values_of(parameters: Sequence[Parameter], unit: np.ndarray) -> list[dict]:
    """{name: value} of every unit-cube point (each column mapped by its Parameter)."""
    columns = [p.value(unit[:, j]) for j, p in enumerate(parameters)]
    return [{p.name: float(c[i]) for p, c in zip(parameters, columns)}
            for i in range(unit.shape[0])]


def run(study: Study, parameters: Sequence[Parameter] = PARAMETERS, *, method: str = "morris",
        samples: int = 4, seed: int = 0, progress: bool = False) -> dict:
    """Sensitivity of ``study``'s metric to ``parameters``: design, vmapped evaluation of
    every point and the nominal configuration, indices.

    Returns:
      {"parameters": analyze() rows, sorted by mu_star, "metric", "method",
      "nominal_value", "evaluations" (design points + 1), "simulations",
      "compiled_calls", "compilations", "wall_seconds"}.
    """
    start = time.perf_counter()
    unit = design(parameters, method, samples, seed)
    label = f"{method}: {unit.shape[0] + 1} points" if progress else None
    ev = evaluate(study, [{}] + values_of(parameters, unit), progress=label)
    rows = analyze(parameters, method, unit, ev.metric[1:], seed)
    rows.sort(key=lambda r: -r["mu_star"])
    return {"parameters": rows, "metric": study.metric, "method": method,
            "nominal_value": float(ev.metric[0]), "evaluations": int(unit.shape[0] + 1),
            "simulations": ev.simulations, "compiled_calls": ev.compiled_calls,
            "compilations": ev.compilations,
            "wall_seconds": time.perf_counter() - start}


def metric_label(study: Study) -> str:
    """What the metric is, in words (plot axes, tables)."""
    a = _name(study.systems[0])
    where = f"batch {study.batch}" if study.batch else f"peak under {study.slo_ms:g} ms"
    if study.metric == "throughput":
        return f"{a} output tokens/s ({where})"
    b = _name(study.systems[1])
    what = "throughput" if study.metric == "ratio" else "energy per token"
    return f"{a}/{b} {what} ratio ({where})"


def tornado(path, result: dict, *, title: str, label: str, top: int = 20):
    """Horizontal bars of mu_star per parameter (largest on top), sigma as a whisker, and
    the sign of the mean effect as the colour; S1/ST beside them for Sobol."""
    from pamjax.studies.plots import _pyplot, _save

    plt = _pyplot()
    rows = result["parameters"][:top][::-1]
    sobol = "ST" in rows[0]
    fig, axes = plt.subplots(1, 2 if sobol else 1, figsize=(12 if sobol else 9,
                                                          0.4 * len(rows) + 1.6),
                             squeeze=False, sharey=True, layout="constrained")
    y = np.arange(len(rows))
    ax = axes[0][0]
    colours = ["tab:blue" if r.get("mu", 0) >= 0 else "tab:orange" for r in rows]
    ax.barh(y, [r["mu_star"] for r in rows], color=colours,
            xerr=[r["sigma"] for r in rows], error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_yticks(y, [f"{r['name']} [{r['low']:g}-{r['high']:g}]" for r in rows], fontsize=8)
    ax.set_xlabel(f"mu* = mean |change of {label}| over the parameter's range\n"
                  "(blue: rises with the parameter, orange: falls; whisker: sigma)",
                  fontsize=8)
    ax.axvline(0, color="black", linewidth=0.6)
    if sobol:
        axes[0][1].barh(y - 0.2, [r["S1"] for r in rows], height=0.4, label="S1")
        axes[0][1].barh(y + 0.2, [r["ST"] for r in rows], height=0.4, label="ST")
        axes[0][1].set_xlabel("Sobol index (share of the metric's variance)", fontsize=8)
        axes[0][1].legend(fontsize=8)
    return _save(plt, fig, title, path)


# ---------------------------------------------------------------------------------------------
# What would it take: one assumption at a time, where does a claimed ratio become attainable
# ---------------------------------------------------------------------------------------------

BOUND_GRID = 33
"""Values per side of the nominal at which the closed-form ceiling is evaluated."""


def search_interval(p: Parameter) -> tuple[float, float]:
    """Where the what-would-it-take search looks: the documented range widened by its own
    width on each side (a factor high/low on a log scale), within the field's limits."""
    if p.log:
        factor = p.high / p.low
        lo, hi = p.low / factor, p.high * factor
    else:
        width = p.high - p.low
        lo, hi = p.low - width, p.high + width
    lo, hi = max(lo, p.limits[0]), min(hi, p.limits[1])
    if p.integer:
        lo, hi = math.ceil(lo), math.floor(hi)
    return float(lo), float(hi)


def distance(p: Parameter, value: float) -> float:
    """How far ``value`` lies from the nominal, in units of the documented range on that
    side (1 = at low or high; a one-sided range is measured by its whole width)."""
    side = (p.high - p.nominal) if value >= p.nominal else (p.nominal - p.low)
    side = side if side > 0 else (p.high - p.low)
    if p.log:
        hi, lo = (max(p.high, p.nominal), p.nominal) if value >= p.nominal else \
            (p.nominal, min(p.low, p.nominal))
        side = math.log(hi / lo) if hi > lo else math.log(p.high / p.low)
        return abs(math.log(value / p.nominal)) / side
    return abs(value - p.nominal) / side


def _between(p: Parameter, a: float, b: float, t) -> np.ndarray:
    """Points a fraction ``t`` of the way from a to b (geometrically for a log scale)."""
    t = np.asarray(t, np.float64)
    v = a * (b / a) ** t if p.log and a > 0 and b > 0 else a + t * (b - a)
    return np.round(v) if p.integer else v


def _ceilings(study: Study, p: Parameter, values, b_reference: float, claim) -> np.ndarray:
    """The closed-form ratio ceiling (bounds.ratio_ceiling) at each value of ``p``."""
    from pamjax.studies import bounds

    mean_prompt, mean_output = study.pool.mean_prompt, study.pool.mean_output
    out = []
    for v in values:
        platform, access, _, system = configure(study.base, {p.name: v}, claim[0])
        out.append(bounds.ratio_ceiling(
            system, b_tokens_per_s=b_reference, model=study.model, mean_prompt=mean_prompt,
            mean_output=mean_output, batch=study.batch, slo_ms=study.slo_ms,
            platform=platform, access=access))
    return np.array(out)


def _bound_stage(study, parameters, ratio, b_reference, claim) -> list[dict]:
    """Per (parameter, side): the value nearest the nominal whose ceiling reaches ``ratio``
    (None: not within the search interval), and the search end of that side."""
    legs = []
    for p in parameters:
        lo, hi = search_interval(p)
        for end in (lo, hi):
            if end == p.nominal:
                continue
            grid = _between(p, p.nominal, end, np.linspace(0.0, 1.0, BOUND_GRID))
            ceiling = _ceilings(study, p, grid, b_reference, claim)
            ok = ceiling >= ratio
            legs.append({"parameter": p, "end": float(end), "ceiling": float(ceiling.max()),
                         "bound_value": float(grid[np.argmax(ok)]) if ok.any() else None})
    return legs


def what_would_it_take(study: Study, ratio: float, parameters: Sequence[Parameter] = PARAMETERS,
                       *, iterations: int = 4, progress: bool = False) -> dict:
    """For each assumption alone: the value at which A/B = ``ratio`` becomes attainable.

    1. Simulate A and B at the nominal (B's throughput is the claim's reference).
    2. Bound: along each side of each parameter's :func:`search_interval`, the value
       nearest the nominal at which A's closed-form bound over B's nominal throughput
       reaches ``ratio`` (a necessary condition; bounds.ratio_ceiling).
    3. Simulation: for each side the bound leaves open, A and B are simulated at the
       search end; where the simulated ratio reaches ``ratio`` there, a bisection between
       the nominal and that end (``iterations`` halvings, every side's midpoint in one
       vmapped evaluation per iteration; log-scale midpoints for log parameters) finds
       the value nearest the nominal known to reach it (assuming one crossing).

    Returns:
      {"ratio", "nominal_ratio", "reference_tokens_per_s", "rows": one per (parameter,
      side of each parameter, those with a value first, ranked by :func:`distance` (name,
      nominal, low, high, side, bound_value (None: the bound rules the ratio out on that
      side), bound_ceiling_max (the largest ceiling on that side), search_end, value (None:
      not reached), simulated_ratio, ratio_at_search_end, distance, inside),
      "none_within_range",
      "evaluations", "simulations", "compiled_calls", "wall_seconds"}.
    """
    start = time.perf_counter()
    if study.metric != "ratio":
        raise ConfigError("metric", study.metric, "what-would-it-take needs the ratio metric")
    if not (math.isfinite(ratio) and ratio > 0):
        raise ConfigError("ratio", ratio, "must be a finite number > 0")
    totals = {"evaluations": 0, "simulations": 0, "compiled_calls": 0}

    def run_(values, label):
        ev = evaluate(study, values, progress=label if progress else None)
        totals["evaluations"] += len(values)
        totals["simulations"] += ev.simulations
        totals["compiled_calls"] += ev.compiled_calls
        return ev

    nominal = run_([{}], "nominal")
    b_ref = float(nominal.throughput[0, 1])
    if not b_ref > 0:
        raise PamjaxError(f"{_name(study.systems[1])} serves nothing at the nominal setup: "
                          "no reference for the claim")
    legs = _bound_stage(study, parameters, ratio, b_ref, study.systems)
    for leg in legs:
        leg.update(lo=leg["parameter"].nominal, hi=leg["end"], hi_ratio=None, open=False)
    legal = [leg for leg in legs if leg["bound_value"] is not None]
    if legal:  # the sides the bound leaves open: simulate their search ends
        ends = run_([{leg["parameter"].name: leg["end"]} for leg in legal], "search ends")
        for leg, r in zip(legal, ends.metric):
            leg.update(hi_ratio=float(r), open=bool(r >= ratio) and nominal.metric[0] < ratio)
    _bisect(legs, ratio, iterations, run_)
    rows = [_leg_row(leg) for leg in legs]
    rows.sort(key=lambda r: (r["value"] is None, r["distance"] if r["value"] is not None
                             else math.inf))
    return {"ratio": ratio, "nominal_ratio": float(nominal.metric[0]),
            "reference_tokens_per_s": b_ref, "rows": rows,
            "none_within_range": not any(r["inside"] for r in rows),
            **totals, "wall_seconds": time.perf_counter() - start}


def _bisect(legs: list[dict], ratio: float, iterations: int, run_) -> None:
    """Halve every open leg's [lo, hi] ``iterations`` times (lo below the ratio, hi at or
    above it), all legs' midpoints in one evaluation per iteration."""
    for it in range(iterations):
        active = [leg for leg in legs if leg["open"]]
        mids = []
        for leg in active:
            p = leg["parameter"]
            mids.append(float(_between(p, leg["lo"], leg["hi"], 0.5)))
        active = [(leg, m) for leg, m in zip(active, mids) if m not in (leg["lo"], leg["hi"])]
        if not active:
            return
        ev = run_([{leg["parameter"].name: m} for leg, m in active],
                  f"bisection {it + 1}/{iterations}")
        for (leg, m), r in zip(active, ev.metric):
            if r >= ratio:
                leg["hi"], leg["hi_ratio"] = m, float(r)
            else:
                leg["lo"] = m


def _leg_row(leg: dict) -> dict:
    p = leg["parameter"]
    value = leg["hi"] if leg["open"] else None
    return {"name": p.name, "unit": p.unit, "nominal": p.nominal, "low": p.low,
            "high": p.high, "side": "up" if leg["end"] > p.nominal else "down",
            "bound_value": leg["bound_value"], "bound_ceiling_max": leg["ceiling"],
            "search_end": leg["end"], "value": value,
            "simulated_ratio": leg["hi_ratio"] if value is not None else None,
            "ratio_at_search_end": leg.get("hi_ratio") if value is None else None,
            "distance": distance(p, value) if value is not None else None,
            "inside": value is not None and p.low <= value <= p.high}
