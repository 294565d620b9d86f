"""Host driver: size the engine for a workload, run it in jitted chunks, summarise.

The loop over chunks is the only host-side loop: each chunk is one compiled ``lax.scan`` of
``chunk_steps`` steps with the state donated (with the event leap, leap.run_chunk: a
``lax.while_loop`` filling at most ``chunk_steps`` rows). The host never blocks on the chunk it has just
dispatched: it folds the previous chunk's metrics into running statistics
(metrics.RunningStats) and reads that chunk's completion count while the device runs the next
one. Host memory stays O(chunk_steps) for runs of any length unless the per-step timeline is
kept (``timeline``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pamjax import engine
from pamjax import leap as leap_lib
from pamjax import metrics as metrics_lib
from pamjax.errors import ConfigError
from pamjax.locality import AccessModel, recorded_unit_logits
from pamjax.types import STATUS_FINISHED, STATUS_REJECTED, DeviceWorkload, EngineConfig, SimParams
from pamjax.workload import Workload as HostWorkload

MAX_TRACKED_UNITS = 1 << 21
"""Default bound on R x U tracked units; beyond it the page size grows (powers of two)."""


@dataclasses.dataclass
class SimResult:
    """Outcome of :func:`run`.

    Fields:
      summary: the summary dict (metrics.summarize_stats).
      state: final EngineState (numpy).
      metrics: StepMetrics stacked over every simulated step [S] when the timeline was kept
        (``timeline``), else None.
      config: the EngineConfig.
      stats: the RunningStats the summary came from.
    """

    summary: dict
    state: object
    metrics: object
    config: EngineConfig
    stats: metrics_lib.RunningStats | None = None


def choose_page_size(num_slots: int, max_context: int,
                     max_units: int = MAX_TRACKED_UNITS) -> int:
    """Token granularity unless slots x units would exceed ``max_units``; then the smallest
    power-of-two page that fits.

    Args:
      num_slots: concurrent request slots R; max_context: longest request, tokens;
      max_units: budget of tracked units R x U.

    Returns:
      tokens per KV unit (a power of two).

    Raises:
      ConfigError: more slots than ``max_units`` (no page size can fit one unit each).
    """
    if num_slots > max_units:
        raise ConfigError("batch", num_slots, f"more concurrent requests than the engine "
                          f"tracks ({max_units:,} KV units in all); use a smaller batch")
    page = 1
    while num_slots * -(-max_context // page) > max_units:
        page *= 2
    return page


def make_config(workload: HostWorkload, num_slots: int, *, page_size: int | None = None,
                padded_bank_groups: int = 256, recorded_steps: int = 0,
                **overrides) -> EngineConfig:
    """EngineConfig sized for a workload: U covers its longest request."""
    if num_slots < 1:
        raise ConfigError("num_slots", num_slots, "must be >= 1")
    page = page_size or choose_page_size(num_slots, workload.max_context)
    units = -(-workload.max_context // page)
    admit = min(num_slots, 64, workload.num_requests)
    return EngineConfig(num_slots=num_slots, units_per_slot=units, page_size=page,
                        num_requests=workload.num_requests,
                        padded_bank_groups=padded_bank_groups, admit_window=max(admit, 1),
                        recorded_steps=recorded_steps, **overrides)


def device_workload(workload: HostWorkload) -> DeviceWorkload:
    """The engine's request arrays: arrival_s f32 [N] (s), prompt and output tokens i32 [N]."""
    return DeviceWorkload(arrival_s=jnp.asarray(workload.arrival_s, jnp.float32),
                    prompt_tokens=jnp.asarray(workload.prompt_tokens, jnp.int32),
                    output_tokens=jnp.asarray(workload.output_tokens, jnp.int32))


def step_bound(workload: HostWorkload) -> int:
    """Steps after which every request must be done: each busy step makes progress."""
    return int(np.sum(workload.output_tokens)) + 2 * workload.num_requests + 8


def prepare_recorded(scores: np.ndarray | None, config: EngineConfig):
    """Recorded token logits [S, N] -> unit logits [S, U] for the engine (None if absent)."""
    if scores is None:
        return None
    units = recorded_unit_logits(scores, config.page_size)
    padded = np.full((units.shape[0], config.units_per_slot), -1e4, np.float32)
    width = min(units.shape[1], config.units_per_slot)
    padded[:, :width] = units[:, :width]
    return jnp.asarray(padded)


TIMELINE_AUTO_BYTES = 64 << 20
"""``timeline=None`` keeps the per-step timeline only while it can never exceed this many
host bytes (a run's step bound x bytes per step), so long runs stay in bounded memory."""


@functools.partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnums=(2,))
def _run_chunk(config, params, state, workload, num_steps, recorded):
    """One chunk of :func:`run`: ``num_steps`` engine steps plus the count of finished or
    rejected requests (i32 []), so that the host can test completion without reading the
    donated state.

    A chunk that starts with every request done is replaced by its exact outcome, computed
    cheaply (lax.cond): the step counter advances, the activation window records empty steps
    and every metric is zero, which is what engine.step gives then. So the extra chunk that
    the lagged completion test (see :func:`run`) may dispatch costs almost nothing.
    """
    idle = jax.eval_shape(lambda: engine.rollout(config, params, state, workload, num_steps,
                                                 recorded)[1])

    def skip(s):
        rows = (s.step + jnp.arange(min(num_steps, config.window))) % config.window
        s = s.replace(step=s.step + num_steps, activation=s.activation.at[rows].set(0))
        return s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), idle)

    done = (state.next_request >= config.num_requests) & jnp.all(state.slot_request < 0)
    state, chunk = lax.cond(
        done, skip,
        lambda s: engine.rollout(config, params, s, workload, num_steps, recorded), state)
    status = state.req_status
    done = jnp.sum((status == STATUS_FINISHED) | (status == STATUS_REJECTED), dtype=jnp.int32)
    return state, chunk, done


class _Progress:
    """Requests done out of the total: a tqdm bar when tqdm is installed, else a line."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, unit="req", desc="simulate", file=sys.stderr,
                            leave=False)

    def update(self, done: int, steps: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"{steps} steps", refresh=False)
            self.bar.update(done - self.done)
        else:
            print(f"\r  steps {steps:>8d}  requests done {done}/{self.total}", end="",
                  file=sys.stderr, flush=True)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def run(params: SimParams, workload: HostWorkload, config: EngineConfig, *, seed: int = 0,
        chunk_steps: int = 256, max_steps: int | None = None, recorded=None,
        progress: bool = False, timeline: bool | None = None,
        leap_steps: int = 0) -> SimResult:
    """Simulate one configuration until every request is finished or rejected.

    The host loop never waits on the chunk it has just dispatched: chunk k+1 is queued before
    chunk k's metrics are fetched and folded into :class:`metrics.RunningStats` and its
    completion count is read, so the device is never idle on the host (with JAX's async
    dispatch). The price, one extra chunk after the last request finishes, is almost nothing:
    a chunk that starts with every request done is skipped on the device (_run_chunk) with
    its exact outcome, and idle steps change no summary figure. Host memory is
    O(chunk_steps) unless the timeline is kept.

    Args:
      params: SimParams of one configuration (from systems.make_params).
      workload: host workload.
      config: EngineConfig (see make_config).
      seed: access-model seed.
      chunk_steps: steps per compiled chunk.
      max_steps: stop after this many steps (default: a bound no run can exceed).
      recorded: f32 [S, U] recorded unit logits (prepare_recorded), if config asks for them.
      progress: show progress (tqdm when installed) on stderr.
      timeline: keep every step's StepMetrics in ``SimResult.metrics`` (True), never (False),
        or while it stays under TIMELINE_AUTO_BYTES (None, the default).
      leap_steps: 0 (default) runs engine.step; K >= 2 runs the event leap (leap.py), up to
        K engine steps per device iteration, engine.step's trajectory (to float32 rounding)
        for the systems leap.applies to (ConfigError otherwise; ``seed`` then changes
        nothing, as these systems do not read the access model). Its chunks hold up to
        ``max(chunk_steps, K)`` steps.

    Returns:
      SimResult (with the leap, ``state`` is a leap.LeapState).
    """
    for field, value in (("max_steps", max_steps), ("chunk_steps", chunk_steps)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ConfigError(field, value, "must be an integer >= 1")
    if leap_steps:
        if not isinstance(leap_steps, (int, np.integer)) or leap_steps < 2:
            raise ConfigError("leap_steps", leap_steps, "must be 0 (off) or an integer >= 2")
        reason = leap_lib.applies(params, config)
        if reason is not None:
            raise ConfigError("leap_steps", leap_steps, f"the event leap does not apply: "
                              f"{reason}")
        chunk_steps = max(chunk_steps, leap_steps)
    start = time.perf_counter()
    dev_workload = device_workload(workload)
    state = leap_lib.init_state(config) if leap_steps else engine.init_state(config, seed)
    limit = max_steps or step_bound(workload)
    stats = metrics_lib.RunningStats()
    kept = []
    keep = timeline
    bar = _Progress(workload.num_requests, progress)
    pending = None
    dispatched = 0
    finished = False
    # The leap's chunks take a varying number of steps: count those folded instead.
    while (stats.steps if leap_steps else dispatched) < limit and not finished:
        if leap_steps:
            state, chunk, rows, done = leap_lib.run_chunk(config, params, state, dev_workload,
                                                      chunk_steps, leap_steps, limit)
        else:
            state, chunk, done = _run_chunk(config, params, state, dev_workload, chunk_steps,
                                            recorded)
            rows = chunk_steps
        dispatched += chunk_steps
        if pending is not None:
            finished = _fold(pending, stats, kept, keep, bar)
        pending = (chunk, rows, done)
        if keep is None:  # decided on the first chunk's size
            per_step = sum(x.nbytes for x in jax.tree.leaves(chunk)) / chunk_steps
            keep = per_step * limit <= TIMELINE_AUTO_BYTES
    _fold(pending, stats, kept, keep, bar)
    bar.close()
    state = jax.device_get(state)
    summary = metrics_lib.summarize_stats(workload, state, stats, time.perf_counter() - start)
    stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *kept) if keep else None
    return SimResult(summary=summary, state=state, metrics=stacked, config=config, stats=stats)


def _fold(pending, stats, kept, keep: bool, bar: _Progress) -> bool:
    """Fold a finished chunk (its first ``rows`` steps) into the statistics; True when every
    request is done."""
    chunk, rows, done = pending
    chunk = jax.device_get(chunk)
    rows = int(rows)
    if rows < len(chunk.step_time_s):
        chunk = jax.tree.map(lambda x: x[:rows], chunk)
    stats.fold(chunk)
    if keep:
        kept.append(chunk)
    done = int(done)
    bar.update(done, stats.steps)
    return done == bar.total


def simulate(system: str, model: str, workload: HostWorkload, *, max_batch: int = 64,
             platform=None, access: AccessModel | None = None, knobs=None,
             page_size: int | None = None, seed: int = 0, chunk_steps: int = 256,
             max_steps: int | None = None, recorded_scores: np.ndarray | None = None,
             progress: bool = False, timeline: bool | None = None,
             leap: bool | None = None) -> SimResult:
    """One system on one workload: the convenience entry point behind `pamjax simulate`.

    Args:
      system, model: names (systems.SYSTEMS, models.MODELS) or objects.
      workload: host workload (pamjax.workload.synthetic or pamjax.traces.load_trace).
      max_batch: largest number of concurrent requests.
      platform, access, knobs: hardware, access model and modelling knobs (defaults).
      page_size: tokens per KV unit (default: token granularity when it fits).
      seed: access-model seed.
      recorded_scores: f32 [S, N] recorded per-step token logits (locality.load_recorded_scores).
      chunk_steps, max_steps, progress, timeline: see :func:`run`.
      leap: use the event leap (leap.py, the same trajectory in far fewer device
        iterations): None (default) when it applies to the system, True always (ConfigError
        where it does not apply), False never.

    Raises:
      CapacityError: no request of the workload can ever fit the system's KV tiers (or the
        weights do not fit HBM).
      ConfigError: ``leap=True`` for a system the leap does not apply to (field ``engine``).
    """
    from pamjax.systems import make_params, max_bank_groups, require_a_fitting_request

    require_a_fitting_request(system, model, workload, platform)

    # No more slots than requests: concurrency cannot exceed them, and slots cost memory.
    config = make_config(workload, min(max_batch, workload.num_requests), page_size=page_size,
                         padded_bank_groups=max_bank_groups(platform),
                         recorded_steps=0 if recorded_scores is None else
                         int(recorded_scores.shape[0]))
    params = make_params(system, model, platform, access, max_batch=max_batch,
                         page_size=config.page_size, knobs=knobs)
    reason = leap_lib.applies(params, config)
    if leap and reason is not None:
        raise ConfigError("engine", "leap", f"the event leap does not apply to "
                          f"{system if isinstance(system, str) else system.name}: {reason}")
    if leap is None:
        leap = reason is None
    return run(params, workload, config, seed=seed, chunk_steps=chunk_steps,
               max_steps=max_steps, recorded=prepare_recorded(recorded_scores, config),
               progress=progress, timeline=timeline,
               leap_steps=leap_lib.LEAP_STEPS if leap else 0)
