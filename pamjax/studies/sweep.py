"""Large sweeps: systems x batch sizes x SLOs x seeds x hardware overrides, spread over devices.

A sweep is the cartesian product of its axes for one model and one workload (a synthetic
dataset name or a trace) and writes ``OUT/sweep.csv``, one row per configuration. What is
simulated and how:

* **Configurations.** A simulated configuration is (hardware overrides, system, batch,
  seed); the SLO axis does not change a simulation, so every simulated configuration gives
  one row per SLO (``meets_slo`` = fits and ``tpot_p99_ms <= slo_ms``). Every configuration
  is a closed loop at steady state, as in study.run_sweep: its batch of in-flight requests
  and the refills are drawn (workload.steady_state, with the configuration's seed) from a
  population: ``max_requests`` requests of the dataset (default study.POOL_REQUESTS) or
  the lengths of a trace's first ``max_requests`` requests. It runs study.WARMUP_STEPS
  steps, then the ``steps`` of its measuring window, and its row has the columns of
  study.run_sweep (same definitions: TPOT in the window, ``oom`` when the in-flight
  requests do not fit, ...).
* **Grouping and compilation.** As in study.run_sweep, batch sizes within a factor of 8
  share one compiled program (study.slot_classes). Inside a class, configurations run in
  chunks of the same shape, the last one padded with copies of a real configuration (whose
  rows are dropped), so a sweep compiles once per slot class however many chunks it has; the
  trace count is reported (``SweepReport.compiles``). Each call goes through
  simulation.run_batch, with one workload per configuration.
* **Devices.** A call runs one chunk per device of ``jax.devices()`` (of every process of
  a multi-process job), ``vmap``-ed over its ``width`` configurations; devices without a
  chunk in a class's last call idle. Every device runs the same *one-device* program
  (simulation.run_batch with ``devices``: traced once, compiled per device), never one
  program partitioned over the devices, because XLA compiles a ``jit`` sharded over N > 1
  devices through its SPMD pipeline and that rounds differently. Measured: with the
  configuration axis sharded by a ``NamedSharding`` (the earlier design), LLVM fused the
  *other* product of the prefill FLOPs ``fc_flops x tokens + 4LHD x pairs`` (costs.py)
  into an FMA in the partitioned program than in the one-device program (the pipelines
  left the fused loop's operands in another order), so llama3-70b's ``energy_gpu_compute``
  differed in the 9th digit between 1 device and 2 or 4 (2 and 4 agreed). Now a
  configuration runs at the same vmap width and position, in the same program, whatever
  the device or process count: a sweep gives byte-identical CSVs on 1, 2 and 4 devices and
  in 2 processes (tests/test_sweep.py). The width does matter (XLA may round differently
  at another vmap width, and one rounding flip can change a discrete decision of the
  engine), so keep chunk_size to compare sweeps. The price: a process with N devices
  compiles the program N times (one process per device, e.g. per GPU, compiles once, in
  parallel with the others). Configurations never communicate. To keep every device busy,
  use chunk_size <= configurations / devices.
* **Chunks, commit and resume.** Each finished chunk's rows are appended to ``sweep.csv``
  at once: the chunk is formatted in memory and written with a single ``os.write`` on a file
  opened ``O_APPEND``, then ``fsync``-ed, so a killed process leaves whole chunks (a torn
  tail can only come from a crash of the machine mid-write; resume drops any incomplete last
  line). ``sweep.json`` beside it records the sweep's axes and chunk size. With
  ``resume=True`` the rows already in ``sweep.csv`` are kept (axes and chunk size must match
  ``sweep.json``) and only the chunks with missing configurations run; chunks are cut from
  the whole sweep, not from what is left of it, so a resumed configuration runs at the same
  vmap width and position as it would have without the interruption. Without ``resume``
  the sweep starts over. A call's chunks are committed together. When every configuration
  is done the file is rewritten sorted (rows by system, overrides, batch, seed, SLO;
  columns in a fixed order) through a temporary file and ``os.replace``, so an
  interrupted-and-resumed sweep and an uninterrupted one end with identical bytes.
* **Page size.** The one a single run at the largest batch would use
  (simulation.choose_page_size); a device holds at most study.UNIT_BUDGET tracked units
  per call (fewer configurations per chunk at large batches and contexts).

Several processes (hosts): every process of the job runs the same sweep, started after
multihost.initialize (``jax.distributed.initialize``; ``pamjax sweep --coordinator HOST:PORT
--num-processes N --process-id I``). ``jax.devices()`` then lists the devices of every
process, in the same order everywhere, so every process plans the same calls; each runs
the chunks of its own devices, and the formatted rows of a call are gathered to every
process (multihost.allgather_bytes, a JAX collective) before process 0 commits them. Only
process 0 reads and writes ``out_dir``: on a resume it reads ``sweep.csv`` and tells the
others what is done, so ``out_dir`` need not be shared. The processes check that they were
started with the same axes and chunk size (else every one stops with the same error).
What was run: 2 CPU processes of one device each on one machine (127.0.0.1, gloo
collectives), fresh and resumed (tests/test_sweep.py), and 2 processes of 2 forced host
devices each, all giving the bytes of one process; not several hosts, nor GPUs. From
Python, two hosts with 4 GPUs each::

    # host 0 (10.0.0.1) and host 1 run the same script, with PROCESS_ID=0 and 1:
    import os
    from pamjax import multihost
    multihost.initialize("10.0.0.1:1234", 2, int(os.environ["PROCESS_ID"]))
    from pamjax.studies import sweep
    spec = sweep.make_spec(model="llama3-70b", workload="sharegpt", trace=None,
                           max_requests=None, systems=["pam", "l-pim"],
                           batches=[64, 128, 256, 512], slo_ms=[100, 150, 200],
                           seeds=[0, 1, 2, 3], overrides=["", "ddr.num_devices=80"], steps=256)
    sweep.run(spec, "/results/sweep", resume=True, chunk_size=64, progress=True)

(On a single host, no initialization is needed: all local devices are used. The README
shows the command line, with SLURM.)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
import time

import jax
import numpy as np

from pamjax import multihost, simulation
from pamjax.errors import ConfigError, UnknownNameError
from pamjax.hardware import Platform, get_platform
from pamjax.models import Model, get_model
from pamjax.progress import Progress
from pamjax.simulation import choose_page_size, index_config, make_config
from pamjax.studies import study
from pamjax.systems import Knobs, System, get_system, make_params, max_bank_groups
from pamjax.traces import load_trace
from pamjax.workload import DATASETS, Workload, steady_state, synthetic

KEY_COLUMNS = ("system", "overrides", "batch", "seed", "slo_ms")
"""Columns identifying a row, in sort order."""

_SPEC_COLUMNS = ("model", "workload")
_SIM_KEY = ("system", "overrides", "batch", "seed")  # one simulated configuration


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """The axes of a sweep (what sweep.json records and resume checks).

    Fields: model (a preset name or a Model, e.g. from a --model-file); workload (dataset
    name, or None for a trace); trace (path or None); max_requests (None = the default);
    systems, batches, slo_ms, seeds and overrides (tuples, each override a
    ``"path=value[,path=value]"`` string applied to ``platform``, ``""`` = the platform
    itself); steps (engine steps per configuration); platform (None = the preset); knobs
    (None = the defaults); custom_systems (System objects named in ``systems``, e.g. from
    --system-file).
    """

    model: str | Model
    workload: str | None
    trace: str | None
    max_requests: int | None
    systems: tuple[str, ...]
    batches: tuple[int, ...]
    slo_ms: tuple[float, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    steps: int
    platform: Platform | None = None
    knobs: Knobs | None = None
    custom_systems: tuple[System, ...] = ()


@dataclasses.dataclass
class SweepReport:
    """What :func:`run` did: CSV path, configurations (simulated ones, SLO rows apart),
    those run now (the rest came from a resumed CSV), chunks run, compilations (traces of
    simulation.rollout_per_config), devices and processes of the job, page size and wall
    seconds."""

    path: pathlib.Path
    configs_total: int
    configs_run: int
    chunks: int
    compiles: int
    devices: int
    processes: int
    page_size: int
    wall_seconds: float


def parse_override(text: str) -> dict:
    """``"ddr.num_devices=80,gpu.num_gpus=16"`` -> {path: number}; ``""`` -> {} (the preset).

    Raises:
      ConfigError naming ``overrides`` and the string when an item is not ``path=number``.
    """
    result = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        path, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not path or not value:
            raise ConfigError("overrides", text, f"{item!r} is not PATH=VALUE "
                              "(e.g. ddr.num_devices=80)")
        try:
            number = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError("overrides", text, f"value {value!r} of {path} is not a "
                                  "number") from None
        result[path] = number
    return result


def make_spec(*, model, workload, trace, max_requests, systems, batches, slo_ms, seeds,
              overrides, steps, platform=None, knobs=None, custom_systems=()) -> SweepSpec:
    """Validated SweepSpec (axes deduplicated, in the order given).

    Raises:
      ConfigError (empty axis, bad value or override string), UnknownNameError (system,
      model or hardware field).
    """
    axes = {"systems": systems, "batches": batches, "slo_ms": slo_ms, "seeds": seeds}
    for name, values in axes.items():
        if values is None or len(list(values)) == 0:
            raise ConfigError(name, values, "empty: the sweep would have no configuration")
    systems = tuple(dict.fromkeys(str(s) for s in systems))
    custom = {s.name: s for s in custom_systems}
    for name in systems:
        if name not in custom:
            get_system(name)
    if isinstance(model, str):
        get_model(model)
    for name, values, minimum in (("batches", batches, 1), ("seeds", seeds, 0)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ConfigError(name, v, f"must be an integer >= {minimum}")
    for v in slo_ms:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ConfigError("slo_ms", v, "must be a finite number > 0")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError("steps", steps, "must be an integer >= 1")
    if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 1):
        raise ConfigError("max_requests", max_requests, "must be an integer >= 1")
    overrides = tuple(dict.fromkeys(o.strip() for o in (overrides or [""])))
    for text in overrides:
        (platform or get_platform()).with_overrides(parse_override(text))
    if trace is None and workload not in DATASETS:
        raise UnknownNameError("workload", workload, DATASETS)
    if trace is not None:
        load_trace(trace, max_requests=max_requests)  # a bad trace fails before any output
    return SweepSpec(model=model, workload=None if trace else workload,
                     trace=str(trace) if trace else None, max_requests=max_requests,
                     systems=systems, batches=tuple(dict.fromkeys(int(b) for b in batches)),
                     slo_ms=tuple(dict.fromkeys(float(s) for s in slo_ms)),
                     seeds=tuple(dict.fromkeys(int(s) for s in seeds)),
                     overrides=overrides, steps=steps, platform=platform, knobs=knobs,
                     custom_systems=tuple(custom_systems))


def _workloads(spec: SweepSpec) -> dict[int, Workload]:
    """The request population per seed (one trace for every seed)."""
    if spec.trace:
        trace = load_trace(spec.trace, max_requests=spec.max_requests)
        return {seed: trace for seed in spec.seeds}
    n = spec.max_requests or study.POOL_REQUESTS
    return {seed: synthetic(spec.workload, n, seed=seed) for seed in spec.seeds}


def _steady(pools: dict, seed: int, batch: int, requests: int) -> Workload:
    """The steady-state workload of one configuration (workload.steady_state)."""
    return steady_state(pools[seed], batch, requests, seed=seed)


def _columns(row: dict) -> list[str]:
    """CSV columns: the key columns, model and workload, study's metric columns in its
    order (its platform/model/system/batch are key columns here), then meets_slo."""
    fixed = {*KEY_COLUMNS, *_SPEC_COLUMNS, "platform", "meets_slo"}
    return [*KEY_COLUMNS, *_SPEC_COLUMNS, *(c for c in row if c not in fixed), "meets_slo"]


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def _sort_key(row: dict):
    return (row["system"], row["overrides"], int(row["batch"]), int(row["seed"]),
            float(row["slo_ms"]))


def _csv_text(rows: list[dict], columns: list[str], header: bool = False) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _append_rows(path: pathlib.Path, data: bytes) -> None:
    """Commit one chunk: a single O_APPEND write, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_existing(path: pathlib.Path, rows_per_config: int
                   ) -> tuple[list[str] | None, list[dict]]:
    """Columns and rows of a sweep CSV written by an earlier run (None, [] when it has no
    header yet). Only whole configurations are kept (``rows_per_config`` rows, one per SLO):
    an incomplete last line or a configuration cut short by a crash is dropped, and cut
    from the file, so it runs again."""
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    reader = csv.DictReader(io.StringIO(complete.decode()))
    rows = list(reader)
    counts: dict[tuple, int] = {}
    for r in rows:
        key = tuple(r[c] for c in _SIM_KEY)
        counts[key] = counts.get(key, 0) + 1
    kept = [r for r in rows if counts[tuple(r[c] for c in _SIM_KEY)] == rows_per_config]
    if complete != data or len(kept) != len(rows):
        _write_atomic(path, _csv_text(kept, reader.fieldnames, header=True)
                      if reader.fieldnames else b"")
    return reader.fieldnames, kept


def run(spec: SweepSpec, out_dir, *, resume: bool = False, chunk_size: int = 64,
        progress: bool = False) -> SweepReport:
    """Run (or resume) a sweep; writes ``out_dir/sweep.csv`` and ``out_dir/sweep.json``.

    In a multi-process job (multihost.initialize), every process calls it with the same
    arguments; only process 0 reads and writes ``out_dir``.

    Args:
      spec: the axes (make_spec).
      out_dir: output folder (created).
      resume: keep the rows already in ``sweep.csv`` and run only the missing
        configurations (the axes must equal those in ``sweep.json``).
      chunk_size: simulated configurations per device per compiled call at most (fewer
        when a slot class has fewer, or when they would exceed study.UNIT_BUDGET tracked
        units per device).
      progress: progress bar on stderr (process 0's).

    Returns:
      SweepReport.

    Raises:
      ConfigError: a bad chunk_size, a resume of another sweep, or processes started with
        other arguments than process 0.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError("chunk_size", chunk_size, "must be an integer >= 1")
    start, traces_before = time.perf_counter(), simulation.BATCH_TRACES
    writer = jax.process_index() == 0
    path = pathlib.Path(out_dir) / "sweep.csv"
    spec_json = _spec_json(spec, chunk_size)
    multihost.check_same("processes", spec_json.encode(), "sweep axes or chunk size")
    columns, done_rows, error = None, [], None
    if writer:  # only process 0 reads and writes files; the others learn what it found
        try:
            columns, done_rows = _open(spec_json, path, resume, len(spec.slo_ms))
        except ConfigError as exc:
            error = exc
    done = _agree_on_done(done_rows, error)

    workloads = _workloads(spec)
    widest = max(workloads.values(), key=lambda w: w.max_context)
    page = choose_page_size(max(spec.batches), widest.max_context)
    run_steps = study.WARMUP_STEPS + spec.steps
    platforms = {o: (spec.platform or get_platform()).with_overrides(parse_override(o))
                 for o in spec.overrides}
    bank_groups = max(max_bank_groups(p) for p in platforms.values())
    devices = jax.devices()  # of every process, in the same order on every process
    classes, total = _plan(spec, done, workloads, page, bank_groups, chunk_size, run_steps)

    chunks = run_now = 0
    with Progress(total, desc="sweep", unit="config", enabled=progress and writer,
                  initial=len(done)) as bar:
        for config, width, pending in classes:
            for lo in range(0, len(pending), len(devices)):
                call = pending[lo:lo + len(devices)]
                rows = _run_call(spec, config, width, call, devices, platforms, workloads,
                                 page)
                if writer:
                    columns = _commit(path, rows, columns)
                    done_rows.extend(rows)
                wanted = sum(len(left) for _, left in call)
                chunks += len(call)
                run_now += wanted
                bar.update(wanted)
    if writer and columns is not None:
        done_rows.sort(key=_sort_key)
        _write_atomic(path, _csv_text(done_rows, columns, header=True))
    return SweepReport(path=path, configs_total=total, configs_run=run_now, chunks=chunks,
                       compiles=simulation.BATCH_TRACES - traces_before, devices=len(devices),
                       processes=jax.process_count(), page_size=page,
                       wall_seconds=time.perf_counter() - start)


def _spec_json(spec: SweepSpec, chunk_size: int) -> str:
    """What ``sweep.json`` holds: the axes and the chunk size (which fixes every
    configuration's vmap width, so a resume must keep it)."""
    return json.dumps({**dataclasses.asdict(spec), "chunk_size": chunk_size}, indent=2,
                      sort_keys=True) + "\n"


def _open(spec_json: str, path: pathlib.Path, resume: bool, rows_per_config: int
          ) -> tuple[list[str] | None, list[dict]]:
    """Start the sweep in ``path``'s folder, or resume it (process 0's job): (CSV columns
    or None, rows already done). A resume must have the same axes and chunk size as
    ``sweep.json``."""
    spec_path = path.with_name("sweep.json")
    if resume and path.is_file():
        if not spec_path.is_file() or spec_path.read_text() != spec_json:
            raise ConfigError("resume", str(spec_path), "the sweep in this folder has other "
                              "axes or chunk_size; use another folder or start over "
                              "without resume")
        return _read_existing(path, rows_per_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(spec_path, spec_json.encode())
    _write_atomic(path, b"")
    return None, []


def _agree_on_done(done_rows: list[dict], error: ConfigError | None) -> set[tuple]:
    """The simulated configurations already done, as process 0 read them, on every process
    (so that every process plans the same calls); process 0's error (``error``) raised on
    every process."""
    if error is not None:
        message = {"error": [error.field, error.value, error.reason]}
    else:
        message = {"done": sorted({tuple(r[c] for c in _SIM_KEY) for r in done_rows})}
    message = json.loads(multihost.broadcast_bytes(json.dumps(message).encode()))
    if "error" in message:
        raise ConfigError(*message["error"])
    return {tuple(key) for key in message["done"]}


def _plan(spec: SweepSpec, done: set, pools: dict, page: int, bank_groups: int,
          chunk_size: int, run_steps: int) -> tuple[list, int]:
    """The chunks still to run: ([(EngineConfig, width, [(chunk, its configurations not
    done)])] per slot class, configurations in all).

    Chunks are cut from the whole sweep (not from what is left of it): a configuration
    runs at the same vmap width and position whether the sweep was resumed or not, and on
    any device count (each device of a call runs one whole chunk).
    """
    classes, total = [], 0
    for group in study.slot_classes(spec.batches):
        configs = [(o, s, b, seed) for o in spec.overrides for s in spec.systems
                   for b in group for seed in spec.seeds]
        total += len(configs)
        # One request count per class (the stacked workloads share their shape).
        requests = max(study.steady_requests(pool, group[-1], run_steps)
                       for pool in pools.values())
        widest = max((_steady(pools, seed, group[-1], requests) for seed in spec.seeds),
                     key=lambda w: w.max_context)
        config = make_config(widest, group[-1], page_size=page, padded_bank_groups=bank_groups)
        units = config.num_slots * config.units_per_slot
        width = min(chunk_size, len(configs), max(1, study.UNIT_BUDGET // units))
        pending = []
        for lo in range(0, len(configs), width):
            chunk = configs[lo:lo + width]
            left = [c for c in chunk if (c[1], c[0], str(c[2]), str(c[3])) not in done]
            if left:
                pending.append((chunk, left))
        if pending:
            classes.append((config, width, pending))
    return classes, total


def _run_call(spec, config, width, call, devices, platforms, workloads, page) -> list[dict]:
    """One round of chunks: chunk ``i`` of ``call`` runs on ``devices[i]``, padded to
    ``width`` with copies of its last configuration. Each process runs the chunks of its
    own devices; the rows of the configurations still to run (formatted, in ``call``
    order) come back on every process."""
    mine = [i for i in range(len(call)) if devices[i].process_index == jax.process_index()]
    padded = []
    for i in mine:
        chunk, _ = call[i]
        padded += chunk + [chunk[-1]] * (width - len(chunk))
    rows = _run_chunk(spec, config, padded, width, [devices[i] for i in mine], platforms,
                      workloads, page) if mine else []
    local = {}
    for k, i in enumerate(mine):
        chunk, left = call[i]
        local[i] = [_formatted(r) for j, c in enumerate(chunk) if c in left
                    for r in rows[k * width + j]]
    every = multihost.allgather_bytes(json.dumps(local).encode())
    merged = {int(i): r for data in every for i, r in json.loads(data).items()}
    return [r for i in range(len(call)) for r in merged[i]]


def _formatted(row: dict) -> dict:
    """A result row as the CSV holds it: its columns (:func:`_columns`) as strings."""
    return {c: _format(row[c]) for c in _columns(row)}


def _commit(path: pathlib.Path, rows: list[dict], columns: list[str] | None) -> list[str]:
    """Append one call's formatted rows to the CSV (with the header when it is the first);
    returns the columns."""
    header = columns is None
    if header:
        columns = list(rows[0])
    elif columns != list(rows[0]):
        raise ConfigError("resume", str(path), "its columns differ from this version's rows; "
                          "start over without resume")
    _append_rows(path, _csv_text(rows, columns, header=header))
    return columns


def _run_chunk(spec, config, configs, width, devices, platforms, workloads, page
               ) -> list[list[dict]]:
    """Simulate chunks of ``width`` (overrides, system, batch, seed) configurations, one
    per device of ``devices``; per configuration of ``configs``, its rows, one per SLO."""
    custom = {s.name: s for s in spec.custom_systems}
    params = [make_params(custom.get(s, s), spec.model, platforms[o], max_batch=b,
                          page_size=page, knobs=spec.knobs) for o, s, b, _ in configs]
    seeds = [seed for *_, seed in configs]
    dev = [_steady(workloads, seed, b, config.num_requests) for _, _, b, seed in configs]
    opened, final, metrics = study.run_steady(config, params, dev, spec.steps,
                                              study.WARMUP_STEPS, seeds, width=width,
                                              devices=devices)
    name = pathlib.Path(spec.trace).name if spec.trace else spec.workload
    rows = []
    for i, (o, s, b, seed) in enumerate(configs):
        point = study.SweepPoint(custom.get(s, s), b, spec.model, platforms[o], o)
        row = study.point_row(point, index_config(metrics, i), index_config(opened, i),
                              index_config(final, i), dev[i], page)
        base = {"system": s, "overrides": o, "batch": b, "seed": seed, "model": row["model"],
                "workload": name}
        rows.append([{**row, **base, "slo_ms": slo,
                      "meets_slo": bool(not row["oom"] and row["tpot_p99_ms"] <= slo)}
                     for slo in spec.slo_ms])
    return rows


def best_batches(spec: SweepSpec, path) -> list[dict]:
    """Per (overrides, system, SLO) of a finished sweep's CSV: the largest batch that meets
    the SLO for every seed (0: none) and the mean throughput over seeds there.

    Returns:
      rows {overrides, system, slo_ms, max_batch, throughput_tokens_per_s}.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    table = []
    for o in spec.overrides:
        for s in spec.systems:
            for slo in spec.slo_ms:
                mine = [r for r in rows if r["overrides"] == o and r["system"] == s
                        and float(r["slo_ms"]) == slo]
                ok = [b for b in spec.batches
                      if all(r["meets_slo"] == "true" for r in mine if int(r["batch"]) == b)]
                best = max(ok) if ok else 0
                tput = [float(r["throughput_tokens_per_s"]) for r in mine
                        if int(r["batch"]) == best]
                table.append({"overrides": o, "system": s, "slo_ms": slo, "max_batch": best,
                              "throughput_tokens_per_s": float(np.mean(tput)) if tput else 0.0})
    return table
