"""Host driver: size the engine for a workload, run it in jitted chunks, summarise.

The loop over chunks is the only host-side loop: each chunk is one compiled ``lax.scan`` of
``chunk_steps`` steps with the state donated, and the host only looks at the state between
chunks to decide whether every request is done.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pamjax import engine
from pamjax import metrics as metrics_lib
from pamjax.errors import ConfigError
from pamjax.locality import AccessModel, recorded_unit_logits
from pamjax.types import STATUS_FINISHED, STATUS_REJECTED, DeviceWorkload, EngineConfig, SimParams
from pamjax.workload import Workload as HostWorkload

MAX_TRACKED_UNITS = 1 << 21
"""Default bound on R x U tracked units; beyond it the page size grows (powers of two)."""


@dataclasses.dataclass
class SimResult:
    """Outcome of :func:`run`: the summary dict, final state and per-step metrics."""

    summary: dict
    state: object
    metrics: object
    config: EngineConfig


def choose_page_size(num_slots: int, max_context: int,
                     max_units: int = MAX_TRACKED_UNITS) -> int:
    """Token granularity unless slots x units would exceed ``max_units``; then the smallest
    power-of-two page that fits."""
    page = 1
    while num_slots * -(-max_context // page) > max_units:
        page *= 2
    return page


def make_config(workload: HostWorkload, num_slots: int, *, page_size: int | None = None,
                bank_groups: int = 256, recorded_steps: int = 0, **overrides) -> EngineConfig:
    """EngineConfig sized for a workload: U covers its longest request."""
    if num_slots < 1:
        raise ConfigError("num_slots", num_slots, "must be >= 1")
    page = page_size or choose_page_size(num_slots, workload.max_context)
    units = -(-workload.max_context // page)
    admit = min(num_slots, 64, workload.num_requests)
    return EngineConfig(num_slots=num_slots, units_per_slot=units, page_size=page,
                        num_requests=workload.num_requests, bank_groups=bank_groups,
                        admit_window=max(admit, 1), recorded_steps=recorded_steps,
                        **overrides)


def device_workload(workload: HostWorkload) -> DeviceWorkload:
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


def run(params: SimParams, workload: HostWorkload, config: EngineConfig, *, seed: int = 0,
        chunk_steps: int = 256, max_steps: int | None = None, recorded=None,
        progress: bool = False) -> SimResult:
    """Simulate one configuration until every request is finished or rejected.

    Args:
      params: SimParams of one configuration (from systems.make_params).
      workload: host workload.
      config: EngineConfig (see make_config).
      seed: access-model seed.
      chunk_steps: steps per compiled chunk.
      max_steps: stop after this many steps (default: a bound no run can exceed).
      recorded: f32 [S, U] recorded unit logits (prepare_recorded), if config asks for them.
      progress: print a progress line per chunk to stderr.

    Returns:
      SimResult.
    """
    start = time.perf_counter()
    dev_workload = device_workload(workload)
    state = engine.init_state(config, seed)
    limit = max_steps or step_bound(workload)
    chunks = []
    steps = 0
    while steps < limit:
        state, chunk = engine.rollout_jit(config, params, state, dev_workload, chunk_steps,
                                          recorded)
        chunks.append(jax.device_get(chunk))
        steps += chunk_steps
        status = np.asarray(state.req_status)
        done = int(np.sum((status == STATUS_FINISHED) | (status == STATUS_REJECTED)))
        if progress:
            print(f"\r  steps {steps:>8d}  requests done {done}/{status.size}", end="",
                  file=sys.stderr, flush=True)
        if done == status.size:
            break
    if progress:
        print(file=sys.stderr)
    stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
    state = jax.device_get(state)
    summary = metrics_lib.summarize(workload, state, stacked, time.perf_counter() - start)
    return SimResult(summary=summary, state=state, metrics=stacked, config=config)


def simulate(system: str, model: str, workload: HostWorkload, *, max_batch: int = 64,
             platform=None, access: AccessModel | None = None, knobs=None,
             page_size: int | None = None, seed: int = 0, chunk_steps: int = 256,
             max_steps: int | None = None, recorded_scores: np.ndarray | None = None,
             progress: bool = False) -> SimResult:
    """One system on one workload: the convenience entry point behind `pamjax simulate`.

    Args:
      system, model: names (systems.SYSTEMS, models.MODELS).
      workload: host workload (pamjax.workload.synthetic or load_trace).
      max_batch: largest number of concurrent requests.
      platform, access, knobs: hardware, access model and modelling knobs (defaults).
      page_size: tokens per KV unit (default: token granularity when it fits).
      seed: access-model seed.
      recorded_scores: f32 [S, N] recorded per-step token logits (locality.load_recorded_scores).
    """
    from pamjax.systems import make_params, max_bank_groups

    config = make_config(workload, max_batch, page_size=page_size,
                         bank_groups=max_bank_groups(platform),
                         recorded_steps=0 if recorded_scores is None else
                         int(recorded_scores.shape[0]))
    params = make_params(system, model, platform, access, max_batch=max_batch,
                         page_size=config.page_size, knobs=knobs)
    return run(params, workload, config, seed=seed, chunk_steps=chunk_steps,
               max_steps=max_steps, recorded=prepare_recorded(recorded_scores, config),
               progress=progress)
