"""Host drivers: size the engine for a workload, run it in jitted chunks, summarise.

One configuration (:func:`run`, :func:`simulate`): the loop over chunks is the only host-side
loop: each chunk is one compiled ``lax.scan`` of ``chunk_steps`` steps with the state donated
(with the event leap, leap.run_chunk: a ``lax.while_loop`` filling at most ``chunk_steps``
rows). The host never blocks on the chunk it has just dispatched: it folds the previous
chunk's metrics into running statistics (metrics.RunningStats) and reads that chunk's
completion count while the device runs the next one. Host memory stays O(chunk_steps) for
runs of any length unless the per-step timeline is kept (``timeline``).

Many configurations (:func:`run_batch`, :func:`stack`): C configurations stacked on a
leading axis and run by one vmapped, jitted rollout per group of configurations and chunk of
steps, optionally spread over devices; the runner of the SLO search, the sweep and the
learned-policy judge.

Several configurations to completion (:func:`run_many`, :func:`simulate_systems`): the
host loop of :func:`run` over one vmapped chunk function, for `pamjax simulate --systems`.

Every runner refuses parameters whose ``max_batch`` the config's slots cannot serve
(:func:`check_slots`): the slots would otherwise cap the batch silently.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pamjax import batching, engine
from pamjax import leap as leap_lib
from pamjax import metrics as metrics_lib
from pamjax.errors import ConfigError
from pamjax.locality import AccessModel, recorded_unit_logits
from pamjax.progress import Progress
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
      engine: how it ran: ``"step"`` (engine.step), ``"leap"`` (the event leap) or
        ``"step, vmapped over C configurations"`` (:func:`run_many`).
      unit_sizes: the unit-axis sizes U the chunks ran with (one compiled program each;
        empty when the axis was not fitted, see :func:`run`).
    """

    summary: dict
    state: object
    metrics: object
    config: EngineConfig
    stats: metrics_lib.RunningStats | None = None
    engine: str = "step"
    unit_sizes: tuple = ()


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


NARROW_SHARE = 0.97
"""Share of a workload's decode steps whose context the narrow columns must hold
(:func:`narrow_units`): the rest run on all U columns, in a row bucket of their own, and
few enough of them run at once to fit its small buckets (active_rows.WIDE_BUCKETS)."""


NARROW_MIN_UNITS = 1024
"""U below which :func:`narrow_units` leaves the narrow columns off: the tables are small
(the conversation trace at 16-token pages, U = 499: steps 25% faster, but 7 s more to
compile the phases' extra branches, a net loss over its first 2,000 requests)."""


def narrow_units(workload: HostWorkload, page_size: int, units: int) -> int:
    """EngineConfig.narrow_units for a workload: the smallest power of two of units that
    holds the context of NARROW_SHARE of its decode steps, or 0 (off) unless that is at
    most half of U (and U is at least NARROW_MIN_UNITS).

    A request of prompt p and output o decodes o steps at contexts p + 1 .. p + o, so the
    share of decode steps at a context of at most c tokens is sum(clip(c - p, 0, o)) /
    sum(o): the narrow width follows where requests spend their decode steps, not the
    longest request (which sets U). On the Azure conversation trace (first 2,000 requests,
    token granularity) it is 2,048 of U = 7,979.

    Args:
      workload: host workload; page_size: tokens per unit; units: U.

    Returns:
      int, a width in units (0 = off).
    """
    if units < NARROW_MIN_UNITS:
        return 0
    prompt = np.asarray(workload.prompt_tokens, np.int64)
    output = np.asarray(workload.output_tokens, np.int64)
    steps = max(int(output.sum()), 1)
    width = 1
    while 2 * width <= units:
        held = np.clip(width * page_size - prompt, 0, output).sum()
        if held >= NARROW_SHARE * steps:
            return width
        width *= 2
    return 0


def make_config(workload: HostWorkload, num_slots: int, *, page_size: int | None = None,
                padded_bank_groups: int = 256, recorded_steps: int = 0,
                **overrides) -> EngineConfig:
    """EngineConfig sized for a workload: U covers its longest request; the narrow columns
    (``narrow_units``) its usual context (:func:`narrow_units`)."""
    if num_slots < 1:
        raise ConfigError("num_slots", num_slots, "must be >= 1")
    page = page_size or choose_page_size(num_slots, workload.max_context)
    units = -(-workload.max_context // page)
    admit = min(num_slots, 64, workload.num_requests)
    overrides.setdefault("narrow_units", narrow_units(workload, page, units))
    return EngineConfig(num_slots=num_slots, units_per_slot=units, page_size=page,
                        num_requests=workload.num_requests,
                        padded_bank_groups=padded_bank_groups, admit_window=max(admit, 1),
                        recorded_steps=recorded_steps, **overrides)


def check_slots(params, config: EngineConfig) -> None:
    """Refuse parameters whose ``max_batch`` the config's slots cannot serve.

    At most ``config.num_slots`` requests run at once, so a larger ``max_batch`` would be
    capped silently, unless the workload has no more requests than slots (then neither can
    be reached, which is how :func:`simulate` sizes its config).

    Args:
      params: SimParams of one configuration, or stacked [C] (host or device arrays).
      config: the EngineConfig they will run with.

    Raises:
      ConfigError: naming max_batch and num_slots.
    """
    max_batch = int(np.max(np.asarray(params.max_batch)))
    if max_batch > config.num_slots and config.num_slots < config.num_requests:
        raise ConfigError("max_batch", max_batch, f"exceeds the EngineConfig's "
                          f"num_slots={config.num_slots} (the most requests that can run at "
                          f"once); build the config with make_config(workload, {max_batch}) "
                          f"or lower max_batch")


def device_workload(workload: HostWorkload) -> DeviceWorkload:
    """The engine's request arrays: arrival_s f32 [N] (s), prompt and output tokens i32 [N]."""
    return DeviceWorkload(arrival_s=jnp.asarray(workload.arrival_s, jnp.float32),
                          prompt_tokens=jnp.asarray(workload.prompt_tokens, jnp.int32),
                          output_tokens=jnp.asarray(workload.output_tokens, jnp.int32),
                          generated_tokens=jnp.asarray(workload.generated_tokens, jnp.int32))


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


class UnitSizer:
    """Runs :func:`run`'s chunks with the unit axis fitted to the requests they may hold.

    A chunk's U is the next power of GROWTH (at least MIN_UNITS, at most the config's) of
    the largest reservation among the running requests and the next ``lookahead`` requests in
    FCFS order (batching.units_ahead). The trajectory is engine.step's at the config's U
    (engine.relay_units): the steps read no column past a request's reservation. Should the
    FCFS pointer pass the look-ahead within the chunk (a request the bound did not cover may
    have been admitted, or rejected for want of columns), the chunk is rerun from its saved
    start at the config's U and the look-ahead doubles. Sizes in powers of four keep the
    number of compiled programs to a few (``sizes``; each compile costs ~10-30 s on a
    2-core CPU, about what a few hundred steps at a too-large U cost).
    """

    MIN_UNITS = 256
    GROWTH = 4

    def __init__(self, workload: HostWorkload, config: EngineConfig):
        self.prompt = np.asarray(workload.prompt_tokens, np.int64)
        self.output = np.asarray(workload.output_tokens, np.int64)
        self.config = config
        self.lookahead = 2 * config.admit_window
        self.sizes = set()

    def units(self, slot_request, next_request: int) -> int:
        """U for a chunk starting with these slots (numpy [R]) and FCFS pointer."""
        need = batching.units_ahead(self.prompt, self.output, slot_request, next_request,
                                    self.lookahead, self.config.page_size)
        full = self.config.units_per_slot
        units = self.MIN_UNITS
        while units < need:
            units *= self.GROWTH
        return min(units, full)

    def run_chunk(self, params, state, workload, num_steps, recorded):
        """One chunk of engine steps (as _run_chunk), on a state of any U."""
        slots, start = jax.device_get((state.slot_request, state.next_request))
        units = self.units(np.asarray(slots), int(start))
        result = self._chunk(units, params, state, workload, num_steps, recorded)
        if units < self.config.units_per_slot and \
                int(result[0].next_request) > int(start) + self.lookahead:
            self.lookahead *= 2
            result = self._chunk(self.config.units_per_slot, params, state, workload,
                                 num_steps, recorded)
        return result

    def _chunk(self, units, params, state, workload, num_steps, recorded):
        self.sizes.add(units)
        config = dataclasses.replace(self.config, units_per_slot=units)
        if recorded is not None:
            recorded = recorded[:, :units]
        # Copies: the chunk consumes (donates) its state, and a rerun needs the start.
        start = jax.tree.map(jnp.copy, engine.relay_units(state, units))
        return _run_chunk(config, params, start, workload, num_steps, recorded)


def run(params: SimParams, workload: HostWorkload, config: EngineConfig, *, seed: int = 0,
        chunk_steps: int = 256, max_steps: int | None = None, recorded=None,
        progress: bool = False, timeline: bool | None = None,
        leap_steps: int = 0, fit_units: bool = False) -> SimResult:
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

      fit_units: run each chunk with the unit axis cut to what the requests it may hold
        need (UnitSizer), off by default: the schedule is the same, but float32 sums over
        the unit axis (selected_mass, importance) change in the last bit with its width,
        and it did not pay in the measured cases (experiments/README.md "PAM at speed");
        never with the leap or a learned placement.

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
    check_slots(params, config)
    start = time.perf_counter()
    dev_workload = device_workload(workload)
    state = leap_lib.init_state(config) if leap_steps else engine.init_state(config, seed)
    sizer = None if leap_steps or not fit_units or config.placement_score is not None \
        else UnitSizer(workload, config)
    limit = max_steps or step_bound(workload)
    stats = metrics_lib.RunningStats()
    kept = []
    keep = timeline
    bar = Progress(workload.num_requests, desc="simulate", unit="req", enabled=progress)
    pending = None
    dispatched = 0
    finished = False
    # The leap's chunks take a varying number of steps: count those folded instead.
    while (stats.steps if leap_steps else dispatched) < limit and not finished:
        if leap_steps:
            state, chunk, rows, done = leap_lib.run_chunk(config, params, state, dev_workload,
                                                      chunk_steps, leap_steps, limit)
        elif sizer is not None:
            state, chunk, done = sizer.run_chunk(params, state, dev_workload, chunk_steps,
                                                 recorded)
            rows = chunk_steps
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
    if sizer is not None:
        state = engine.relay_units(state, config.units_per_slot)
    state = jax.device_get(state)
    summary = metrics_lib.summarize_stats(workload, state, stats, time.perf_counter() - start)
    stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *kept) if keep else None
    return SimResult(summary=summary, state=state, metrics=stacked, config=config, stats=stats,
                     engine="leap" if leap_steps else "step",
                     unit_sizes=tuple(sorted(sizer.sizes)) if sizer else ())


def _fold(pending, stats, kept, keep: bool, bar: Progress) -> bool:
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
    bar.moveto(done, status=f"{stats.steps} steps")
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


# ---------------------------------------------------------------------------------------------
# Many configurations at once
# ---------------------------------------------------------------------------------------------

def stack(trees):
    """Pytrees of one structure (SimParams, EngineStates, DeviceWorkloads...) stacked along a
    new leading axis C, as host (numpy) arrays: the inputs of :func:`run_batch` and of
    engine.rollout_batch.

    Args:
      trees: a sequence of C >= 1 pytrees with the same structure and leaf shapes.

    Returns:
      one pytree whose every leaf is ``[C, *leaf.shape]``.
    """
    trees = list(trees)
    if not trees:
        raise ConfigError("configurations", trees, "need at least one to stack")
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def index_config(tree, i: int):
    """Configuration ``i`` of a pytree stacked over configurations (leading axis); the
    inverse of :func:`stack`."""
    return jax.tree.map(lambda x: x[i], tree)


BATCH_TRACES = 0
"""Times the batched rollout with one workload per configuration has been traced (=
compiled) in this process (studies.sweep reports the count)."""


def _rollout_per_config(config, params, state, workload, num_steps):
    global BATCH_TRACES
    BATCH_TRACES += 1  # runs once per trace, i.e. per compilation
    return jax.vmap(engine.rollout, in_axes=(None, 0, 0, 0, None))(
        engine.vmapped(config), params, state, workload, num_steps)


rollout_per_config = jax.jit(_rollout_per_config, static_argnames=("config", "num_steps"),
                             donate_argnums=(2,))
"""engine.rollout vmapped over params, state *and* workload [C, N] (one workload per
configuration, e.g. per seed); jitted, state donated."""


def run_batch(config: EngineConfig, params, workload, num_steps: int, *, seeds=0,
              states=None, chunk_steps: int | None = None, width: int | None = None,
              devices=None, progress: str | None = None, resume: bool = False):
    """Simulate C configurations for ``num_steps`` steps each, vmapped: one compile per shape.

    The one batched runner of pamjax: the SLO search (studies.study), the sweep
    (studies.sweep) and the learned-policy judge (learn.judge) run through it.
    Configurations run in groups of ``width`` (one compiled call each, vmapped over the
    group), and each group's time runs in calls of ``chunk_steps`` steps whose metrics are
    copied to the host before the next call, so device memory holds one chunk. The vmap
    width and the chunking fix the compiled program, and XLA may round a reduction
    differently in another program (one flip can change a discrete decision), so a
    configuration's results depend on them: keep them fixed to compare runs.

    With several ``devices``, groups are dealt to them in rounds of one group per device,
    each call dispatched on every device of the round before any result is read, so the
    devices run at once. Every device runs the same one-device program, whatever the number
    of devices: a program partitioned over N > 1 devices (a sharded ``jit``) would go
    through another XLA pipeline than a one-device program and can round differently (see
    studies.sweep), so a group's results would depend on the device count.

    Args:
      config: the static EngineConfig every configuration shares.
      params: SimParams of C configurations: a list, or stacked [C] (:func:`stack`).
      workload: the requests, one host Workload or DeviceWorkload [N] for every
        configuration (engine.rollout_batch), or a list of C of them, one per configuration
        (:data:`rollout_per_config`).
      num_steps: engine steps per configuration.
      seeds: access-model seed (int) of every configuration, or a list of C; ignored when
        ``states`` is given.
      states: EngineState stacked [C] to start from (default: engine.init_state with
        ``seeds``, built per group); device arrays given here are donated.
      chunk_steps: steps per compiled call (default: all ``num_steps`` in one call).
      width: configurations per call (default: all C); the last group is padded with copies
        of the first configuration (their results dropped), so every call has one shape.
      devices: jax devices of this process to run the groups on (default: JAX's default
        device); the program is compiled once per device (traced once).
      progress: a label: show the steps done on stderr (pamjax.progress); None: silent.
      resume: start each configuration from its workload's in-flight requests
        (engine.resume, a steady-state start) before the first step.

    Returns:
      (final EngineState [C, ...], StepMetrics [C, num_steps, ...]), numpy.

    Raises:
      ConfigError: a count that is not an integer >= 1, seeds or workloads not one per
        configuration, or a device of another process.
    """
    if isinstance(params, (list, tuple)):
        params = stack(params)
    check_slots(params, config)
    count = int(np.shape(jax.tree.leaves(params)[0])[0])
    width, chunk_steps = width or count, chunk_steps or num_steps
    for field, value in (("num_steps", num_steps), ("chunk_steps", chunk_steps),
                         ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(field, value, "must be an integer >= 1")
    per_config = isinstance(workload, (list, tuple))
    if per_config and len(workload) != count:
        raise ConfigError("workload", f"{len(workload)} workloads", f"need one per "
                          f"configuration ({count})")
    devices = list(devices) if devices else [None]
    for device in devices:
        if device is not None and device.process_index != jax.process_index():
            raise ConfigError("devices", str(device), "not a device of this process")
    workload = stack([_device(w) for w in workload]) if per_config else _device(workload)
    if states is None:
        seeds = list(seeds) if np.ndim(seeds) else [seeds] * count
        if len(seeds) != count:
            raise ConfigError("seeds", f"{len(seeds)} seeds", f"need an int or one per "
                              f"configuration ({count})")
    rollout = rollout_per_config if per_config else engine.rollout_batch
    starts = list(range(0, count, width))
    bar = Progress(len(starts) * num_steps, desc=f"{progress}: {count} configurations",
                   unit="step", enabled=progress is not None)
    results = []
    for first in range(0, len(starts), len(devices)):
        groups = []
        for lo, device in zip(starts[first:first + len(devices)], devices):
            # Indices of the group; the last is padded with copies of configuration 0.
            index = np.arange(lo, lo + width)
            index = np.where(index < count, index, 0)
            take = functools.partial(_take, index=index, whole=width == count)
            state = take(states) if states is not None else \
                stack([engine.init_state(config, seeds[i]) for i in index])
            group = (take(params), state, take(workload) if per_config else workload)
            group = group if device is None else jax.device_put(group, device)
            if resume:
                group = (group[0], _resume_batch(config, *group, per_config), group[2])
            groups.append(group)
        results += _run_round(rollout, config, groups, num_steps, chunk_steps, bar)
    bar.close()
    join = functools.partial(jax.tree.map, lambda *xs: np.concatenate(xs)[:count])
    return join(*(r[0] for r in results)), join(*(r[1] for r in results))


def _run_round(rollout, config, groups, num_steps, chunk_steps, bar) -> list[tuple]:
    """Groups of :func:`run_batch`, one per device: their steps in calls of
    ``chunk_steps``, each call dispatched for every group before any of its metrics is
    fetched to the host; [(final state, metrics [W, S, ...])] per group, numpy."""
    parts = [[] for _ in groups]
    done = 0
    while done < num_steps:
        n = min(chunk_steps, num_steps - done)
        calls = [rollout(config, params, state, workload, n)
                 for params, state, workload in groups]
        groups = [(params, state, workload)
                  for (params, _, workload), (state, _) in zip(groups, calls)]
        for part, (_, chunk) in zip(parts, calls):
            part.append(jax.device_get(chunk))
        done += n
        bar.update(n * len(groups))
    concat = functools.partial(jax.tree.map, lambda *xs: np.concatenate(xs, axis=1))
    return [(jax.device_get(state), concat(*part)) for (_, state, _), part in zip(groups, parts)]


@functools.partial(jax.jit, static_argnames=("config", "per_config"))
def _resume_batch(config, params, state, workload, per_config: bool):
    """engine.resume vmapped over a group of configurations (their own workloads or one)."""
    return jax.vmap(engine.resume, in_axes=(None, 0, 0, 0 if per_config else None))(
        config, params, state, workload)


def _device(workload) -> DeviceWorkload:
    return workload if isinstance(workload, DeviceWorkload) else device_workload(workload)


def _take(tree, index, whole: bool):
    """Configurations ``index`` of a stacked pytree (the tree itself when it is all of
    them in order)."""
    return tree if whole else jax.tree.map(lambda x: np.asarray(x)[index], tree)


# ---------------------------------------------------------------------------------------------
# Several configurations until every request is done (simulate --systems)
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "num_steps"), donate_argnums=(2,))
def _run_chunk_many(config, params, state, workload, num_steps, recorded):
    """``num_steps`` engine steps of C configurations [C] at once (vmapped), with each
    one's count of finished or rejected requests (i32 [C]). A configuration that is done
    keeps stepping: engine.step then advances the step counter and reports zeros."""
    def one(p, s):
        s, chunk = engine.rollout(engine.vmapped(config), p, s, workload, num_steps, recorded)
        status = s.req_status
        return s, chunk, jnp.sum((status == STATUS_FINISHED) | (status == STATUS_REJECTED),
                                 dtype=jnp.int32)
    return jax.vmap(one)(params, state)


def run_many(params, workload: HostWorkload, config: EngineConfig, *, seed: int = 0,
             chunk_steps: int = 256, max_steps: int | None = None, recorded=None,
             progress: bool = False, timeline: bool | None = None) -> list[SimResult]:
    """:func:`run` for C configurations of one shape at once: one compiled, vmapped chunk
    function steps them all until every configuration's requests are done.

    The host loop is :func:`run`'s (chunk k+1 is dispatched before chunk k is folded), with
    one RunningStats per configuration. A configuration may differ from its own
    :func:`run` in the last bits of some step times (XLA may round a vmapped program
    differently), and the event leap is not used.

    Args:
      params: SimParams of C configurations, a list or stacked [C]; each ``max_batch``
        within ``config.num_slots`` (check_slots).
      workload, config, seed, chunk_steps, max_steps, recorded, progress, timeline: as for
        :func:`run` (every configuration gets the same workload, seed and recorded scores).

    Returns:
      one SimResult per configuration, in order; ``summary["wall_seconds"]`` is the wall
      time of the whole call, shared by its configurations.
    """
    if isinstance(params, (list, tuple)):
        params = stack(params)
    check_slots(params, config)
    for field, value in (("max_steps", max_steps), ("chunk_steps", chunk_steps)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ConfigError(field, value, "must be an integer >= 1")
    count = int(np.shape(jax.tree.leaves(params)[0])[0])
    start = time.perf_counter()
    dev_workload = device_workload(workload)
    state = stack([engine.init_state(config, seed) for _ in range(count)])
    limit = max_steps or step_bound(workload)
    stats = [metrics_lib.RunningStats() for _ in range(count)]
    kept: list[list] = [[] for _ in range(count)]
    keep = timeline
    bar = Progress(count * workload.num_requests, desc=f"simulate {count} configurations",
                   unit="req", enabled=progress)
    pending, dispatched, finished = None, 0, False
    while dispatched < limit and not finished:
        state, chunk, done = _run_chunk_many(config, params, state, dev_workload,
                                             chunk_steps, recorded)
        dispatched += chunk_steps
        if pending is not None:
            finished = _fold_many(pending, stats, kept, keep, bar)
        pending = (chunk, done)
        if keep is None:
            per_step = sum(x.nbytes for x in jax.tree.leaves(chunk)) / chunk_steps
            keep = per_step * limit <= TIMELINE_AUTO_BYTES
    _fold_many(pending, stats, kept, keep, bar)
    bar.close()
    state = jax.device_get(state)
    wall = time.perf_counter() - start
    results = []
    for i in range(count):
        final = index_config(state, i)
        stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *kept[i]) if keep else None
        results.append(SimResult(
            summary=metrics_lib.summarize_stats(workload, final, stats[i], wall),
            state=final, metrics=stacked, config=config, stats=stats[i],
            engine=f"step, vmapped over {count} configurations"))
    return results


def _fold_many(pending, stats, kept, keep: bool, bar: Progress) -> bool:
    """Fold a finished chunk of every configuration; True when all are done."""
    chunk, done = jax.device_get(pending)
    for i, s in enumerate(stats):
        mine = index_config(chunk, i)
        s.fold(mine)
        if keep:
            kept[i].append(mine)
    bar.moveto(int(np.sum(done)), status=f"{stats[0].steps} steps")
    return int(np.sum(done)) == bar.total


def simulate_systems(systems, model, workload: HostWorkload, *, max_batch: int = 64,
                     platform=None, access: AccessModel | None = None, knobs=None,
                     page_size: int | None = None, seed: int = 0, chunk_steps: int = 256,
                     max_steps: int | None = None, recorded_scores: np.ndarray | None = None,
                     progress: bool = False, timeline: bool | None = None,
                     leap: bool | None = None) -> dict[str, SimResult]:
    """Several systems on one workload (`pamjax simulate --systems`), each to completion.

    One system is exactly :func:`simulate`. With several, they share one EngineConfig
    (same workload, batch, page size and hardware), so the systems the event leap applies
    to (``leap`` None: where it applies; True: all, ConfigError where it does not; False:
    none) run one by one through it and all the others together through
    :func:`run_many` (one compiled, vmapped chunk function).

    Args:
      systems: system names or System objects (distinct names).
      model, workload, max_batch, platform, access, knobs, page_size, seed, chunk_steps,
        max_steps, recorded_scores, progress, timeline: as for :func:`simulate`.

    Returns:
      {system name: SimResult}, in the order given.

    Raises:
      CapacityError: a system can hold none of the workload's requests.
      ConfigError: duplicate names; ``leap=True`` for a system it does not apply to.
    """
    from pamjax.systems import make_params, max_bank_groups, require_a_fitting_request

    names = [getattr(s, "name", s) for s in systems]
    if len(set(names)) != len(names) or not names:
        raise ConfigError("systems", names, "need one or more distinct system names")
    common = dict(max_batch=max_batch, platform=platform, access=access, knobs=knobs,
                  page_size=page_size, seed=seed, chunk_steps=chunk_steps,
                  max_steps=max_steps, recorded_scores=recorded_scores, progress=progress,
                  timeline=timeline)
    if len(systems) == 1:
        return {names[0]: simulate(systems[0], model, workload, leap=leap, **common)}
    for system in systems:
        require_a_fitting_request(system, model, workload, platform)
    config = make_config(workload, min(max_batch, workload.num_requests), page_size=page_size,
                         padded_bank_groups=max_bank_groups(platform),
                         recorded_steps=0 if recorded_scores is None else
                         int(recorded_scores.shape[0]))
    params = {n: make_params(s, model, platform, access, max_batch=max_batch,
                             page_size=config.page_size, knobs=knobs)
              for n, s in zip(names, systems)}
    results, stepped = {}, []
    for name, system in zip(names, systems):
        reason = leap_lib.applies(params[name], config)
        if leap and reason is not None:
            raise ConfigError("engine", "leap", f"the event leap does not apply to {name}: "
                              f"{reason}")
        if leap is not False and reason is None:
            common["page_size"] = config.page_size
            results[name] = simulate(system, model, workload, leap=True, **common)
        else:
            stepped.append(name)
    if len(stepped) == 1:
        results[stepped[0]] = run(params[stepped[0]], workload, config, seed=seed,
                                  chunk_steps=chunk_steps, max_steps=max_steps,
                                  recorded=prepare_recorded(recorded_scores, config),
                                  progress=progress, timeline=timeline)
    elif stepped:
        many = run_many([params[n] for n in stepped], workload, config, seed=seed,
                        chunk_steps=chunk_steps, max_steps=max_steps,
                        recorded=prepare_recorded(recorded_scores, config), progress=progress,
                        timeline=timeline)
        results.update(zip(stepped, many))
    return {n: results[n] for n in names}
