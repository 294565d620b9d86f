"""Engine speed benchmark (`pamjax bench [--quick] [--json PATH]`).

Figures (each printed beside its target where one exists; targets are reported, never
asserted):

* ``engine_vs_reference_speedup``: PAM on LLaMA3-70B, a batch of 2K-8K-token contexts at
  token granularity (arxiv-sum prompts): seconds per decode step of ``pamjax.reference``
  over those of the jitted engine on the same case. Both run the same first steps from the
  same initial state and their step metrics are compared (exact integers, rtol 1e-5 for
  times and energies, the tolerances of tests/test_engine_reference.py): ``results_equal``.
  Target: >= 50x per core. Two per-core figures are reported: the same comparison rerun
  in a subprocess pinned to one CPU core (``engine_vs_reference_one_core``: both sides on
  one core, Linux only), and the multi-core speed-up divided by the cores JAX may use (which
  assumes the engine would scale perfectly with cores; the numpy reference uses one).
* ``token_steps_per_s``: tracked KV tokens x engine steps per wall second on that case.
* ``configs_scaling``: wall seconds per configuration when 1, 16, 256 and 1024 small
  configurations (LLaMA-3-8B, batch 4, eight ShareGPT requests, the five main systems in
  turn, distinct seeds) run as one vmapped, jitted call (engine.rollout_batch, the call
  simulation.run_batch makes, timed without the runner's copies to the host); target:
  falling as configurations are batched.
* ``cost_growth``: wall seconds per engine step against context length (fixed batch) and
  against batch (fixed context), PAM at token granularity, with the least-squares slope of
  log(time) on log(size) (1 = linear).
* ``bytes_per_tracked_token``: bytes of engine state (EngineState pytree nbytes) per
  tracked KV unit and per token for a few sizes (a unit is ``page_size`` tokens).
* ``azure_conv_requests_per_s``: requests simulated per wall second replaying the Azure LLM
  2023 conversation trace on ``vllm-offload`` (LLaMA3-70B, batch <= 64, page 256) with
  simulation.simulate, which uses the event leap (leap.py) for this system; compilation is
  excluded (a warm-up run of one chunk compiles it) and reported apart. Target: 10,000
  requests/s on a 2-core CPU; the median of five runs. Beside it, the same requests
  replayed by engine.step (one device iteration per step; the first 2,000 requests with
  ``quick``) and whether the two summaries agree.

``quick`` shrinks every case (batch 32 for the reference comparison, 2,000 trace requests
for the engine.step comparison, smaller growth grids) to run in a few minutes on a 2-core
CPU. Timings on a shared machine are noisy; run under ``taskset -c 0`` for a one-core
figure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pamjax import _numerics, batching, engine, locality, placement, scheduler
from pamjax.costs import step_cost
from pamjax.errors import ConfigError
from pamjax.reference import reference_init, reference_step
from pamjax.simulation import UnitSizer, device_workload, make_config, run, simulate, stack
from pamjax.systems import MAIN_SYSTEMS, make_params, max_bank_groups
from pamjax.testing import schedule_difference
from pamjax.traces import default_azure_trace_path, load_trace
from pamjax.workload import Workload, synthetic

SECTIONS = ("pam", "azure", "reference", "scaling", "growth", "footprint", "huge")
"""The benchmark's sections (run_bench ``sections``; `pamjax bench --sections`)."""

TARGETS = {
    "engine_vs_reference_speedup_per_core": 50.0,  # one-core run where available
    "azure_conv_requests_per_s": 10_000.0,
}

_EXACT = ("decode_requests", "prefill_requests", "output_tokens", "tier_units",
          "selected_units", "persisted_units", "previously_selected_units", "migrated_units",
          "migrated_from_ssd", "rejected")
_RELATIVE = ("step_time_s", "attention_s", "tier_attention_s", "selected_mass")


def _log(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def _repeat(fn, min_seconds: float, max_calls: int = 1000) -> float:
    """Mean wall seconds of ``fn()`` (which blocks until its result is ready) over as many
    calls as fit in ``min_seconds`` (at least one, at most ``max_calls``)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or calls >= max_calls:
            return elapsed / calls


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _queue(prompts, output: int, name: str) -> Workload:
    """Requests with the given prompt lengths, all waiting at t = 0."""
    prompts = np.asarray(prompts)
    return Workload(np.zeros(prompts.size), prompts, np.full(prompts.size, output), name=name)


def _admit_all(params):
    """No prefill token budget: the whole batch is admitted at the first step."""
    return params.replace(prefill_token_budget=np.int32(2**30))


def compare_steps(engine_metrics, reference_metrics) -> dict[str, int]:
    """Fields of stacked engine StepMetrics [S] that differ from a list of S RefMetrics,
    each with the first step where it differs."""
    bad = {}
    for name in _EXACT + _RELATIVE + ("energy_pj",):
        got = np.asarray(getattr(engine_metrics, name), np.float64)
        want = np.asarray([getattr(m, name) for m in reference_metrics], np.float64)
        if name in _EXACT:
            ok = got == want
        else:
            atol = 1e-3 if name == "energy_pj" else 1e-12
            ok = np.isclose(got, want, rtol=1e-5, atol=atol)
        ok = ok.reshape(ok.shape[0], -1).all(-1)
        if not ok.all():
            bad[name] = int(np.argmin(ok))
    return bad


def engine_vs_reference(batch: int, reference_steps: int, min_seconds: float,
                        progress: bool) -> dict:
    """The jitted engine and the plain reference on the same case (see module doc)."""
    workload = _queue(synthetic("arxiv-sum", batch, seed=0).prompt_tokens, 4096, "arxiv-sum")
    config = make_config(workload, batch, page_size=1)
    params = _admit_all(make_params("pam", "llama3-70b", max_batch=batch, page_size=1))
    dev = device_workload(workload)
    steps = reference_steps + 1  # the admission step, then decode steps

    start = time.perf_counter()
    state, first = engine.rollout_jit(config, params, engine.init_state(config, 0), dev, steps)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    first = jax.device_get(first)
    tokens = float(np.asarray(first.tier_units)[-1].sum())

    def run_engine():
        nonlocal state
        state, m = engine.rollout_jit(config, params, state, dev, steps)
        jax.block_until_ready(m)

    engine_s = _repeat(run_engine, min_seconds, max_calls=4096 // steps - 2) / steps

    _log(progress, f"  reference: {reference_steps} decode steps of {tokens:.0f} tokens")
    ref_state, admission = reference_step(config, params, reference_init(config, 0), workload)
    history = [admission]
    start = time.perf_counter()
    for _ in range(reference_steps):
        ref_state, m = reference_step(config, params, ref_state, workload)
        history.append(m)
    reference_s = (time.perf_counter() - start) / reference_steps
    mismatches = compare_steps(first, history)
    speedup = reference_s / engine_s
    return {
        "system": "pam", "model": "llama3-70b", "batch": batch, "page_size": 1,
        "tracked_tokens": tokens, "compared_steps": steps, "results_equal": not mismatches,
        "first_mismatch_step": mismatches,
        "tier_units_engine": np.asarray(first.tier_units).tolist(),
        "tier_units_reference": [np.asarray(m.tier_units).tolist() for m in history],
        "engine_s_per_step": engine_s,
        "reference_s_per_step": reference_s, "engine_compile_s": compile_s,
        "speedup": speedup, "cores": _cores(), "speedup_per_core": speedup / _cores(),
        "token_steps_per_s": tokens / engine_s,
    }


def engine_vs_reference_one_core(batch: int, reference_steps: int, min_seconds: float
                                  ) -> dict | None:
    """:func:`engine_vs_reference` in a fresh Python pinned to one CPU core (XLA's thread
    pool is sized at start-up, so the pinning must precede it); None where CPU affinity
    cannot be set (not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    # The child pins itself before it imports JAX (no fork hook in this threaded process).
    code = (f"import os; os.sched_setaffinity(0, {{{core}}}); import json, sys; "
            "from pamjax.studies.bench import engine_vs_reference; "
            f"json.dump(engine_vs_reference({batch}, {reference_steps}, {min_seconds}, False), "
            "sys.stdout)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def configs_scaling(counts, steps: int, min_seconds: float, progress: bool) -> list[dict]:
    """Wall seconds per configuration with ``count`` small configurations in one call."""
    wl = synthetic("sharegpt", 8, seed=0)
    page = 64
    config = make_config(wl, 4, page_size=page, padded_bank_groups=max_bank_groups())
    variants = [make_params(s, "llama3-8b", max_batch=4, page_size=page)
                for s in MAIN_SYSTEMS]
    dev = device_workload(wl)
    rows = []
    one = jax.device_get(engine.init_state(config, 0))
    for count in counts:
        params = stack([variants[i % len(variants)] for i in range(count)])
        # One initial state with distinct seeds (stacked once, not built seed by seed).
        state = stack([one] * count).replace(seed=np.arange(count, dtype=np.uint32))
        start = time.perf_counter()
        state, _ = engine.rollout_batch(config, params, state, dev, steps)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - start

        def run(params=params):
            nonlocal state
            state, m = engine.rollout_batch(config, params, state, dev, steps)
            jax.block_until_ready(m)

        wall = _repeat(run, min_seconds)
        rows.append({"configs": count, "steps": steps, "wall_s": wall,
                     "wall_s_per_config": wall / count, "compile_s": compile_s})
        _log(progress, f"  {count:5d} configurations: {wall / count * 1e3:.3f} ms each")
    return rows


def _step_time(batch: int, context: int, steps: int, min_seconds: float) -> dict:
    """Wall seconds per engine step, PAM, ``batch`` requests of ``context`` tokens."""
    output = 256  # every request keeps decoding through the timed calls (at most 60)
    workload = _queue(np.full(batch, context), output, "fixed")
    config = make_config(workload, batch, page_size=1)
    params = _admit_all(make_params("pam", "llama3-70b", max_batch=batch, page_size=1))
    dev = device_workload(workload)
    state, _ = engine.rollout_jit(config, params, engine.init_state(config, 0), dev, steps)
    jax.block_until_ready(state)

    def run():
        nonlocal state
        state, m = engine.rollout_jit(config, params, state, dev, steps)
        jax.block_until_ready(m)

    wall = _repeat(run, min_seconds, max_calls=min(60, output // steps - 2)) / steps
    return {"batch": batch, "context": context, "tracked_tokens": batch * (context + steps),
            "wall_s_per_step": wall}


def _slope(sizes, seconds) -> float:
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def cost_growth(batch: int, contexts, context: int, batches, steps: int, min_seconds: float,
                progress: bool) -> dict:
    """Per-step wall time against context (at ``batch``) and batch (at ``context``)."""
    cache = {}

    def point(b, c):
        if (b, c) not in cache:
            cache[(b, c)] = _step_time(b, c, steps, min_seconds)
            _log(progress, f"  batch {b:5d} x context {c:7d}: "
                           f"{cache[(b, c)]['wall_s_per_step'] * 1e3:.2f} ms/step")
        return cache[(b, c)]

    by_context = [point(batch, c) for c in contexts]
    by_batch = [point(b, context) for b in batches]
    return {
        "vs_context": {"batch": batch, "points": by_context, "loglog_slope": _slope(
            contexts, [p["wall_s_per_step"] for p in by_context])},
        "vs_batch": {"context": context, "points": by_batch, "loglog_slope": _slope(
            batches, [p["wall_s_per_step"] for p in by_batch])},
    }


def state_bytes(config) -> int:
    """Bytes of the engine state of ``config`` (from shapes; nothing is allocated)."""
    shapes = jax.eval_shape(lambda: engine.init_state(config, 0))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def bytes_per_tracked_token(cases) -> list[dict]:
    """State bytes per tracked unit and token for (label, workload, batch) cases."""
    rows = []
    for label, workload, batch in cases:
        config = make_config(workload, batch)
        units = config.num_slots * config.units_per_slot
        total = state_bytes(config)
        rows.append({"case": label, "batch": batch, "page_size": config.page_size,
                     "tracked_units": units, "state_bytes": total,
                     "bytes_per_tracked_unit": total / units,
                     "bytes_per_tracked_token": total / (units * config.page_size)})
    return rows


def _huge_cases() -> list[tuple[str, Workload, int]]:
    million = _queue([1_000_000] * 2, 16, "1M-token prompts")
    big_batch = synthetic("sharegpt", 8192, seed=0)
    return [("two 1M-token contexts, batch 2", million, 2),
            ("8192 ShareGPT requests, batch 8192", big_batch, 8192)]


def huge_runs(progress: bool) -> list[dict]:
    """Complete runs at the extremes (1M-token contexts; an 8192-request batch)."""
    rows = []
    for label, workload, batch in _huge_cases():
        start = time.perf_counter()
        result = simulate("pam", "llama3-70b", workload, max_batch=batch, timeline=False,
                          progress=progress)
        config = result.config
        rows.append({
            "case": label, "page_size": config.page_size,
            "tracked_units": config.num_slots * config.units_per_slot,
            "state_bytes": state_bytes(config), "wall_s": time.perf_counter() - start,
            "requests_finished": result.summary["requests_finished"],
            "steps": result.summary["steps"],
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        })
        _log(progress, f"  {label}: {rows[-1]['wall_s']:.1f} s")
    return rows


def _replay(workload: Workload, system: str, leap: bool, max_batch: int, page_size: int,
            chunk_steps: int, repeats: int = 1) -> tuple[dict, object]:
    """Timed replays (compilation excluded: a first run of one chunk compiles it); the
    figures are those of the median of ``repeats`` runs, all wall times listed."""
    kwargs = dict(max_batch=max_batch, page_size=page_size, chunk_steps=chunk_steps,
                  timeline=False, leap=leap)
    start = time.perf_counter()
    simulate(system, "llama3-70b", workload, max_steps=chunk_steps, **kwargs)
    warmup = time.perf_counter() - start
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = simulate(system, "llama3-70b", workload, **kwargs)
        walls.append(time.perf_counter() - start)
    wall = float(np.median(walls))
    s = result.summary
    iterations = int(result.state.iterations) if leap else result.stats.steps
    per_chunk = wall * min(chunk_steps / max(result.stats.steps, 1), 1.0)
    return {
        "engine": "event leap (leap.py)" if leap else "engine.step",
        "requests": workload.num_requests, "wall_s": wall, "wall_s_runs": walls,
        "requests_per_s": workload.num_requests / wall,
        "engine_steps": result.stats.steps, "busy_steps": s["steps"],
        "device_iterations": iterations,
        "wall_us_per_busy_step": wall / max(s["steps"], 1) * 1e6,
        "compile_s": max(warmup - per_chunk, 0.0),
        "requests_finished": s["requests_finished"],
        "simulated_seconds": s["simulated_seconds"],
    }, result


def _summary_differences(reference: dict, other: dict) -> list[str]:
    """Summary keys on which two runs of the same workload disagree beyond float32
    rounding: rtol 1e-6; latencies within two float32 ulps of the clock at the run's end
    (first-token and finish times are stamped from it); the selected mass share within
    1e-6 (leap.py)."""
    ulp_ms = 1e3 * float(np.spacing(np.float32(reference["simulated_seconds"])))
    bad = []
    for key, value in reference.items():
        if key == "wall_seconds":
            continue
        mine = other[key]
        if isinstance(value, dict):
            value, mine = list(value.values()), list(mine.values())
        atol = {"ttft_ms": 2 * ulp_ms, "tpot_ms": 2 * ulp_ms, "selected_mass_share": 1e-6
                }.get(key, 0.0)
        if not np.allclose(np.asarray(value, np.float64), np.asarray(mine, np.float64),
                           rtol=1e-6, atol=atol, equal_nan=True):
            bad.append(key)
    return bad


def azure_replay(path, limit: int | None, system: str = "vllm-offload", max_batch: int = 64,
                 page_size: int = 256, chunk_steps: int = 4096,
                 compare_requests: int | None = 2000) -> dict:
    """Requests per wall second replaying the trace (see module doc).

    The headline replays ``limit`` requests (None: the whole trace) the way `pamjax simulate`
    does, with the event leap (leap.py) where it applies: the median of five timed runs
    (this figure moves by up to 2x between runs on a shared virtual machine). For
    comparison, and to show that the leap changes no result, the first ``compare_requests``
    requests are replayed by both the leap and engine.step (None: all of them) and their
    summaries compared
    (:func:`_summary_differences`).
    """
    workload = load_trace(path, max_requests=limit)
    head = workload if compare_requests is None or compare_requests >= workload.num_requests \
        else load_trace(path, max_requests=compare_requests)
    common = dict(system=system, max_batch=max_batch, page_size=page_size,
                  chunk_steps=chunk_steps)
    headline, _ = _replay(workload, leap=True, repeats=5, **common)
    leaped, a = _replay(head, leap=True, **common)
    stepped, b = _replay(head, leap=False, **common)
    differs = _summary_differences(b.summary, a.summary)
    return {**headline, "system": system, "model": "llama3-70b", "max_batch": max_batch,
            "page_size": page_size, "chunk_steps": chunk_steps,
            "compare": {"requests": head.num_requests, "leap": leaped, "engine_step": stepped,
                        "speedup": stepped["wall_s"] / leaped["wall_s"],
                        "summaries_equal": not differs, "differing_keys": differs}}


def pam_section(path, requests: int, quick: bool, whole_trace: bool, progress: bool) -> dict:
    """PAM at speed (issue 15): trace replays at token granularity and 16-token pages (and once
    with the unit axis fitted per chunk at pages, for comparison), the
    phase breakdown of one step, and with ``whole_trace`` the whole trace at both
    granularities. ``path`` None: a synthetic ShareGPT workload at the conversation
    trace's rate stands in."""
    out = {"trace": str(path) if path else "synthetic sharegpt, 5.4 requests/s",
           "requests": requests}
    repeats = 1 if quick else 2
    for label, page, fit in (("token", 1, False), ("page16", 16, False),
                             ("page16_fitted", 16, True)):
        _log(progress, f"  PAM replay, {requests} requests, {label}")
        out[label] = pam_replay(path, requests, page, fit_units=fit, repeats=repeats)
        _log(progress, f"    {out[label]['requests_per_s']:.1f} requests/s, "
                       f"{out[label]['ms_per_engine_step']:.2f} ms/step, "
                       f"U sizes {out[label]['unit_sizes']}")
    for label, page, shortcut in (("skip_idle_token", 1, "skip_idle"),
                                  ("skip_idle_page16", 16, "skip_idle"),
                                  ("narrow_token", 1, "narrow")):
        _log(progress, f"  {shortcut} on and off, {label}")
        out[label] = shortcut_comparison(path, requests, page, chunks=6 if quick else 24,
                                         shortcut=shortcut)
        _log(progress, f"    {out[label]['speedup']:.2f}x, same schedule: "
                       f"{out[label]['same_schedule']}")
    _log(progress, "  the selector's bisection in L2-sized row blocks and whole")
    out["bracket_blocking"] = bracket_blocking(repeats=3 if quick else 7)
    _log(progress, "  one step, phase by phase")
    out["phases"] = step_phases(path, requests, 1, warm_steps=512 if quick else 2048,
                                min_seconds=0.5 if quick else 1.0)
    if whole_trace and path is not None:
        for label, page in (("whole_token", 1), ("whole_page16", 16)):
            _log(progress, f"  PAM replay, whole trace, {label}")
            out[label] = pam_replay(path, None, page, repeats=1)
    return out


def run_bench(*, quick: bool, progress: bool, sections=None, whole_trace: bool = False,
              pam_requests: int = 2000) -> dict:
    """Run the benchmark (module docstring); returns its figures (`pamjax bench` prints
    them and writes them as JSON).

    Args:
      quick: the small version (a few minutes on a 2-core CPU).
      progress: progress lines on stderr.
      sections: the sections to run (SECTIONS; default all).
      whole_trace: the PAM section also replays the whole trace (long).
      pam_requests: requests of the PAM section's replays (first of the trace).

    Returns:
      dict: the headline figures (``azure_conv_requests_per_s``,
      ``engine_vs_reference_speedup``, ``..._per_core``, ``token_steps_per_s``,
      ``bytes_per_tracked_token``), each section's details (``azure``,
      ``engine_vs_reference``, ``engine_vs_reference_one_core``, ``configs_scaling``,
      ``cost_growth``, ``state_footprint``, ``huge_runs`` unless quick), the run's
      environment (jax version, backend, devices, cores), ``targets`` and ``wall_s``.
    """
    start = time.perf_counter()
    min_s = 1.0 if quick else 3.0
    out = {"quick": quick, "jax": jax.__version__, "backend": jax.default_backend(),
           "devices": jax.device_count(), "cores": _cores(), "targets": TARGETS}

    # The trace replay first: a long loop of small device calls, it is the figure most
    # sensitive to the process's state (in one measurement it ran 1.5x slower after the
    # large vmapped calls of configs_scaling than in a fresh process).
    sections = set(SECTIONS if sections is None else sections)
    trace = default_azure_trace_path()
    if trace is not None and not pathlib.Path(trace).is_file():
        trace = None
    out["azure"] = out["azure_conv_requests_per_s"] = out["pam"] = None
    if "pam" in sections:
        _log(progress, "PAM trace replay")
        out["pam"] = pam_section(trace, pam_requests, quick, whole_trace, progress)
    if trace is not None and "azure" in sections:
        _log(progress, "Azure conversation trace replay")
        out["azure"] = azure_replay(trace, None, compare_requests=2000 if quick else None)
        out["azure_conv_requests_per_s"] = out["azure"]["requests_per_s"]

    if sections & {"reference", "scaling", "growth", "footprint", "huge"}:
        _rest(out, quick, min_s, progress, sections)
    out["wall_s"] = time.perf_counter() - start
    return out


def _rest(out: dict, quick: bool, min_s: float, progress: bool, sections) -> None:
    """The engine sections of run_bench (reference, scaling, growth, footprint, huge)."""
    if "reference" in sections:
        _reference_section(out, quick, min_s, progress)
    if "scaling" in sections:
        _log(progress, "configurations per call")
        out["configs_scaling"] = configs_scaling([1, 16, 256, 1024], 16 if quick else 64,
                                                 min_s, progress)
    if "growth" in sections:
        _log(progress, "cost growth")
        if quick:
            out["cost_growth"] = cost_growth(8, [1024, 4096, 16384], 1024, [8, 32, 128], 4,
                                             min_s / 2, progress)
        else:
            out["cost_growth"] = cost_growth(16, [1024, 4096, 16384, 65536], 2048,
                                             [16, 64, 256, 1024], 4, min_s, progress)
    if "footprint" in sections:
        cases = [("batch 128 x 8K context", _queue(np.full(128, 8192), 1, "8K"), 128),
                 *_huge_cases()]
        footprint = bytes_per_tracked_token(cases)
        out["bytes_per_tracked_token"] = footprint[0]["bytes_per_tracked_token"]
        out["state_footprint"] = footprint
    if "huge" in sections and not quick:
        _log(progress, "huge runs")
        out["huge_runs"] = huge_runs(progress)


def _reference_section(out: dict, quick: bool, min_s: float, progress: bool) -> None:
    _log(progress, "engine vs reference")
    batch, steps = (32, 2) if quick else (128, 3)
    speed = engine_vs_reference(batch, steps, min_s, progress)
    out["engine_vs_reference"] = speed
    out["engine_vs_reference_speedup"] = speed["speedup"]
    out["token_steps_per_s"] = speed["token_steps_per_s"]
    _log(progress, "  again, pinned to one core")
    one = engine_vs_reference_one_core(batch, steps, min_s)
    out["engine_vs_reference_one_core"] = one
    out["engine_vs_reference_speedup_per_core"] = one["speedup"] if one else \
        speed["speedup_per_core"]


# ---------------------------------------------------------------------------------------------
# PAM on a trace: replay speed and where one step's time goes
# ---------------------------------------------------------------------------------------------

PHASES = ("admission", "prefill_placement", "new_units", "attend", "attention_load",
          "scheduling", "cost", "complete")
"""The named phases of engine.step, in order (engine module docstring)."""


def step_prefix(config, params, state, workload, upto: int):
    """engine.step's phases 0..``upto`` (indices into PHASES), returning every intermediate
    computed so far (so that nothing is dead code) and, after the last phase, what
    engine.step returns. Mirrors engine.step line for line for a system without a learned
    placement score (``config.placement_score`` None: the LifetimeViews such a score reads
    are not built); tests/test_bench.py checks that the whole prefix equals engine.step.
    """
    start = state
    decoding = state.slot_request >= 0
    capacity = batching.tier_capacity(params)
    admission = batching.admit_fcfs(config, params, workload, state.slot_request,
                                    state.next_request, state.clock_whole + state.clock_frac,
                                    capacity)
    out = (admission,)
    if upto == 0:
        return out
    order = placement.mapping_order(config, params, state, admission, decoding)
    state, prefill_tier_tokens = engine.admit_prompts(config, params, state, admission,
                                                      capacity, order, None)
    out += (state, order)
    if upto == 1:
        return out
    token = batching.decode_token(config, state.slot_context, decoding)
    tier_before = state.unit_tier
    state = placement.place_new_units(config, params, state, token, capacity, order)
    out += (state, token)
    if upto == 2:
        return out
    state, attended = locality.attend(config, params, state, decoding, token, None)
    out += (state, attended)
    if upto == 3:
        return out
    activation, load = placement.attention_load(config, params, state, attended, token)
    out += (activation, load)
    if upto == 4:
        return out
    state = scheduler.schedule_step(config, params, state, attended, token.context)
    migration = scheduler.migration(tier_before, state.unit_tier, attended.tokens,
                                    attended.present[:, 0] if config.skip_idle else None)
    out += (state, migration)
    if upto == 5:
        return out
    cost = step_cost(params, engine._step_counts(config, params, decoding, token,
                                                 prefill_tier_tokens, admission, attended, load,
                                                 migration.tokens))
    out += (cost,)
    if upto == 6:
        return out
    busy = jnp.any(decoding) | jnp.any(admission.admit)
    end = batching.close_step(config, workload, start, admission, state.slot_request,
                              state.slot_generated, decoding, busy, cost.time_s)
    new_state = engine._next_state(config, state, end, token, attended, activation, start)
    return new_state, engine._metrics(config, params, end, decoding, admission, new_state,
                                      cost, busy, attended, migration, token.context)


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth, bytes/s: the best of ``repeats`` numpy copies of a
    ``megabytes`` array (each byte read once and written once)."""
    src = np.ones(megabytes << 18, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unit_table_bytes(config) -> int:
    """Bytes one step must at least read and write: every [R, U] unit table of the state
    (engine.UNIT_FIELDS) read once and written once."""
    shapes = jax.eval_shape(lambda: engine.init_state(config, 0))
    return 2 * sum(getattr(shapes, name).size * getattr(shapes, name).dtype.itemsize
                   for name in engine.UNIT_FIELDS)


def _pam_case(path, limit: int | None, page_size: int, max_batch: int = 64):
    """(workload, config, params) of PAM (LLaMA3-70B) on the trace's first ``limit``
    requests; a synthetic conversation workload of ``limit`` requests when ``path`` is None."""
    workload = load_trace(path, max_requests=limit) if path is not None else \
        synthetic("sharegpt", limit or 2000, seed=0, rate_per_s=5.4)
    config = make_config(workload, min(max_batch, workload.num_requests), page_size=page_size,
                         padded_bank_groups=max_bank_groups())
    params = make_params("pam", "llama3-70b", max_batch=max_batch, page_size=page_size)
    return workload, config, params


def pam_replay(path, limit: int | None, page_size: int, fit_units: bool = False,
               repeats: int = 2) -> dict:
    """PAM replaying a trace with engine.step (simulation.run, chunks of 256 steps): wall
    seconds of a first run (which compiles every chunk program it needs) and of
    ``repeats`` - 1 more runs (compiled programs reused), requests per wall second."""
    workload, config, params = _pam_case(path, limit, page_size)
    walls, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run(params, workload, config, timeline=False, fit_units=fit_units)
        walls.append(time.perf_counter() - start)
    warm = float(np.median(walls[1:])) if repeats > 1 else walls[0]
    s = result.summary
    return {"system": "pam", "model": "llama3-70b", "requests": workload.num_requests,
            "page_size": config.page_size, "units_per_slot": config.units_per_slot,
            "fit_units": fit_units, "unit_sizes": list(result.unit_sizes),
            "compiled_chunk_programs": max(len(result.unit_sizes), 1),
            "wall_s_first": walls[0], "wall_s_runs": walls, "wall_s": warm,
            "requests_per_s": workload.num_requests / warm,
            "engine_steps": result.stats.steps, "busy_steps": s["steps"],
            "ms_per_engine_step": warm / max(result.stats.steps, 1) * 1e3,
            "requests_finished": s["requests_finished"],
            "simulated_seconds": s["simulated_seconds"], "summary": s}


def bracket_blocking(rows: int = 64, units: int = 7979, *, repeats: int = 7,
                     iters: int = 20, seed: int = 0) -> dict:
    """The selector's bisection (_numerics.threshold_bracket) on one [rows, units] table of
    logits with integer token weights, in L2-sized row blocks (as the engine runs it) and
    as the whole table at once: milliseconds [min, max] over ``repeats`` calls each
    (interleaved, so both see the same machine), the speed-up of the medians, and whether
    the brackets are bit-identical. Default shape: a replay's 64 slots at token
    granularity (U = 7,979)."""
    rng = np.random.default_rng(seed)
    values = jnp.asarray(rng.normal(size=(rows, units)), jnp.float32)
    weights = jnp.asarray(rng.random((rows, units)) < 0.3, jnp.float32)
    target = jnp.ceil(0.2 * weights.sum(-1))
    calls = {"blocked": jax.jit(functools.partial(_numerics.threshold_bracket, iters=iters)),
             "whole_table": jax.jit(functools.partial(_numerics._bracket_rows, iters=iters))}
    results = {k: jax.block_until_ready(f(values, weights, target)) for k, f in calls.items()}
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            times[k].append(1e3 * _timed(
                lambda f=f: jax.block_until_ready(f(values, weights, target))))
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(results["blocked"], results["whole_table"]))
    return {"rows": rows, "units": units, "iters": iters,
            "block_elements": _numerics.BRACKET_BLOCK_ELEMENTS,
            **{f"{k}_ms": [min(t), max(t)] for k, t in times.items()},
            "speedup": float(np.median(times["whole_table"]) / np.median(times["blocked"])),
            "identical": same}


OCCUPANCY_BANDS = ((0, 8), (8, 16), (16, 32), (32, 65))
"""Bands of running requests (of 64 slots) shortcut_comparison reports separately."""


COMPARED_SHORTCUTS = {"skip_idle": {"skip_idle": False}, "narrow": {"narrow_units": 0}}
"""The engine's shortcuts :func:`shortcut_comparison` can turn off: the EngineConfig fields
that turn each off (skipping idle work; the narrow columns, which need it on)."""


def shortcut_comparison(path, limit: int | None, page_size: int, chunks: int,
                        shortcut: str = "skip_idle", chunk_steps: int = 256) -> dict:
    """engine.step with a shortcut on (the default EngineConfig of the replay) and off
    (COMPARED_SHORTCUTS) on the same replay: the two rollouts advance chunk by chunk in
    turn (so both see the same machine), their states and step metrics compared after every
    chunk (testing.schedule_difference: the schedule bit for bit, the other float32 values
    by their largest relative difference). Returns per-chunk wall seconds (the first
    includes compiling), the mean number of running requests, ms per step by band of
    running requests and the overall speed-up (chunks after the first)."""
    if shortcut not in COMPARED_SHORTCUTS:
        raise ConfigError("shortcut", shortcut, f"must be one of {sorted(COMPARED_SHORTCUTS)}")
    workload, config, params = _pam_case(path, limit, page_size)
    dev = device_workload(workload)
    configs = {"off": dataclasses.replace(config, **COMPARED_SHORTCUTS[shortcut]), "on": config}
    states = {k: engine.init_state(c, 0) for k, c in configs.items()}
    rows, differing, worst = [], set(), 0.0
    for _ in range(chunks):
        row, metrics = {}, {}
        for key in ("off", "on"):
            start = time.perf_counter()
            states[key], metrics[key] = engine.rollout_jit(configs[key], params, states[key],
                                                           dev, chunk_steps)
            jax.block_until_ready(states[key])
            row[f"{key}_s"] = time.perf_counter() - start
        row["running"] = float(np.mean(np.asarray(metrics["on"].decode_requests)))
        for on, off in ((states["on"], states["off"]), (metrics["on"], metrics["off"])):
            diff = schedule_difference(jax.device_get(on), jax.device_get(off))
            differing.update(diff["schedule_fields"])
            worst = max(worst, diff["float_max_relative"])
        rows.append(row)
    timed = rows[1:]
    bands = []
    for lo, hi in OCCUPANCY_BANDS:
        inside = [r for r in timed if lo <= r["running"] < hi]
        if inside:
            off, on = (np.array([r[f"{k}_s"] for r in inside]) / chunk_steps * 1e3
                       for k in ("off", "on"))
            bands.append({"running": f"{lo}-{hi - 1}", "chunks": len(inside),
                          "off_ms_per_step": [float(off.min()), float(off.max())],
                          "on_ms_per_step": [float(on.min()), float(on.max())],
                          "speedup": float(off.sum() / on.sum())})
    return {"shortcut": shortcut, "page_size": page_size,
            "units_per_slot": config.units_per_slot, "narrow_units": config.narrow_units,
            "chunk_steps": chunk_steps, "chunks": rows, "bands": bands,
            "first_chunk_s": {k: rows[0][f"{k}_s"] for k in configs},
            "speedup": sum(r["off_s"] for r in timed) / max(sum(r["on_s"] for r in timed),
                                                            1e-12),
            "same_schedule": not differing, "schedule_fields_differing": sorted(differing),
            "float_max_relative_difference": worst}


def _mid_run_state(config, params, workload, steps: int):
    """The engine state after ``steps`` steps (multiple of 256) from t = 0."""
    dev = device_workload(workload)
    state = engine.init_state(config, 0)
    for _ in range(max(steps // 256, 1)):
        state, _ = engine.rollout_jit(config, params, state, dev, 256)
    return jax.device_get(state), dev


def step_phases(path, limit: int | None, page_size: int, warm_steps: int = 2048,
                min_seconds: float = 1.0, bandwidth: float | None = None) -> dict:
    """Where one engine step's time goes, on PAM's state after ``warm_steps`` steps of the
    trace: wall ms of engine.step's phases 0..k jitted together (step_prefix), each phase's
    share as the difference of consecutive prefixes (XLA fuses across phase boundaries, so
    a difference is an estimate, occasionally slightly negative), at the config's U and at
    the U the run would use then (simulation.UnitSizer); beside them the bytes of the
    unit tables a step must read and write and the time they take at ``bandwidth``."""
    workload, config, params = _pam_case(path, limit, page_size)
    state, dev = _mid_run_state(config, params, workload, warm_steps)
    sizer = UnitSizer(workload, config)
    fitted = sizer.units(np.asarray(state.slot_request), int(state.next_request))
    bandwidth = bandwidth or memory_bandwidth()
    out = {"requests": workload.num_requests, "page_size": config.page_size,
           "after_steps": int(state.step), "running": int(np.sum(state.slot_request >= 0)),
           "max_context": int(np.max(state.slot_context)), "bandwidth_bytes_per_s": bandwidth}
    for label, units in (("full", config.units_per_slot), ("fitted", fitted)):
        cfg = dataclasses.replace(config, units_per_slot=units)
        st = jax.device_get(engine.relay_units(state, units))
        rows, previous = {}, 0.0
        for k, name in enumerate(PHASES):
            fn = jax.jit(functools.partial(step_prefix, cfg, upto=k))
            jax.block_until_ready(fn(params, st, dev))
            ms = _repeat(lambda fn=fn, st=st: jax.block_until_ready(fn(params, st, dev)),
                         min_seconds) * 1e3
            rows[name] = {"prefix_ms": ms, "phase_ms": ms - previous}
            previous = ms
        touched = unit_table_bytes(cfg)
        out[label] = {"units_per_slot": units, "phases": rows, "step_ms": previous,
                      "unit_table_bytes": touched,
                      "bandwidth_ms": touched / bandwidth * 1e3,
                      "times_bandwidth_limit": previous / (touched / bandwidth * 1e3)}
    return out
