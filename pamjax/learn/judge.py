"""The exact engine as the judge of fixed-batch episodes (learn/train.py).

**Decode-step time on an episode** (:func:`exact_decode_ms`): the episode's R requests are
admitted and prefilled at step 0, then decode for ``setup.steps`` steps; the mean time of
the decode-only steps, in the exact engine with hard decisions, never in the relaxation a
policy was trained through (learn/relaxed.py). SLO goodput of the serving loop is judged
by learn/goodput.py.

Every exact run of a setup has one static EngineConfig per hook (:func:`engine_config`),
fixed-width vmapped groups and scans of ``steps + 1`` steps (simulation.run_batch), so a
setup compiles the engine once per hook.

``setup`` is a learn.train.TrainSetup throughout.
"""

from __future__ import annotations

import numpy as np

from pamjax.learn import policy, relaxed
from pamjax.simulation import run_batch
from pamjax.types import EngineConfig
from pamjax.workload import Workload

EXACT_CHUNK = 4  # exact-engine configurations vmapped per call


def episode_workload(setup, episode: relaxed.Episode) -> Workload:
    """The exact-engine workload of one episode: R requests at t = 0, prompt = the episode's
    context, outputs long enough that nobody finishes within the steps."""
    ctx = np.asarray(episode.context)
    return Workload(np.zeros(ctx.size), ctx, np.full(ctx.size, setup.steps + 2), name="episode")


NEVER_S = 1e9
"""Arrival time (s) of the padding requests of :func:`engine_config`'s fixed workload size."""


def engine_config(setup, padded_bank_groups: int, net: bool = False
                  ) -> EngineConfig:
    """The exact engine's static config for every run of a setup (episodes and SLO search).

    Sized by the setup, not by a workload, so every exact run of a setup shares one compile
    per hook and platform: R = setup.exact_slots, N = setup.exact_requests (shorter
    workloads are padded with requests arriving at NEVER_S), U covers max_context + steps + 2
    tokens (the largest reservation of either), the admission window is R (so step 0 admits
    a whole episode), G = ``padded_bank_groups`` (the largest bank-group count of any tier
    of the platform run: max of ``SimParams.bank_groups_per_device``). ``net`` installs the
    UnitScorer hook (policy.net_engine_hook).
    """
    hook = policy.net_engine_hook(setup.hidden, setup.depth, setup.page_size) if net else None
    units = -(-(setup.max_context + setup.steps + 2) // setup.page_size)
    return EngineConfig(num_slots=setup.exact_slots, units_per_slot=units,
                        page_size=setup.page_size, num_requests=setup.exact_requests,
                        padded_bank_groups=padded_bank_groups,
                        admit_window=setup.exact_slots,
                        placement_score=hook)


def padded_workload(setup, workload: Workload) -> Workload:
    """``workload`` padded to setup.exact_requests with one-token requests arriving at
    NEVER_S (admitted only after the engine's idle clock jump to NEVER_S, i.e. once no real
    request is left to run)."""
    pad = setup.exact_requests - workload.num_requests
    return Workload(np.concatenate([workload.arrival_s, np.full(pad, NEVER_S)]),
                    np.concatenate([workload.prompt_tokens, np.ones(pad, np.int64)]),
                    np.concatenate([workload.output_tokens, np.ones(pad, np.int64)]),
                    name=workload.name)


def _run_exact(setup, params_list, workload: Workload, seed: int, chunks: int,
               net=None):
    """Exact-engine runs of ``chunks`` x (steps + 1) steps of each SimParams on a workload.

    Points run in fixed-width vmapped groups of EXACT_CHUNK (the last padded with copies)
    and time in scans of steps + 1 (simulation.run_batch), so a setup compiles once per
    hook. ``net`` (UnitScorer parameters) goes to every point through ``SimParams.policy``.

    Returns:
      (final EngineState, StepMetrics [chunks x (steps + 1)]) as numpy pytrees stacked over
      ``params_list`` [P].
    """
    padded_bank_groups = max(int(np.max(np.asarray(p.bank_groups_per_device)))
                             for p in params_list)
    config = engine_config(setup, padded_bank_groups, net=net is not None)
    if net is not None:
        params_list = [p.replace(policy=net) for p in params_list]
    return run_batch(config, params_list, padded_workload(setup, workload),
                     chunks * (setup.steps + 1), seeds=seed, chunk_steps=setup.steps + 1,
                     width=EXACT_CHUNK)


def exact_rollouts(setup, params_list, episode, *, net=None):
    """Exact engine on one episode: step 0 admits and prefills every request, steps 1..S
    decode. With ``net`` (UnitScorer parameters) the engine ranks units with the network
    through ``EngineConfig.placement_score``, at admission and in the online swaps.

    Returns:
      (final EngineState, StepMetrics [S + 1]) as numpy pytrees stacked over
      ``params_list`` [P].
    """
    return _run_exact(setup, params_list, episode_workload(setup, episode),
                      int(episode.seed), 1, net)


def exact_decode_ms(setup, params_list, episode, *, net=None) -> np.ndarray:
    """Exact engine: mean decode-step time (ms) of each SimParams in ``params_list``, f64
    [P] (:func:`exact_rollouts`; the prefill step 0 is left out)."""
    _, metrics = exact_rollouts(setup, params_list, episode, net=net)
    step_time = np.asarray(metrics.step_time_s, np.float64)
    decode_only = np.asarray(metrics.prefill_requests) == 0
    return np.array([1e3 * t[d].mean() for t, d in zip(step_time, decode_only)])
