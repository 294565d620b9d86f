"""The exact engine as the judge of learned placement policies.

Every number reported for a policy is measured here, in the exact engine with hard
decisions, never in the relaxation it was trained through (learn/relaxed.py):

* **Decode-step time on an episode** (:func:`exact_decode_ms`): the episode's R requests
  are admitted and prefilled at step 0, then decode for ``setup.steps`` steps; the mean
  time of the decode-only steps.
* **Throughput under an SLO** (:func:`slo_throughput`): continuous batching over
  ``setup.slo_batches`` with the TPOT p99 and peak-under-SLO rules of studies/study.py.

Every exact run of a setup has one static EngineConfig per hook (:func:`engine_config`),
fixed-width vmapped groups and scans of ``steps + 1`` steps (simulation.run_batch), so a
setup compiles the engine once per hook.

``setup`` is a learn.train.TrainSetup throughout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from pamjax.errors import ConfigError
from pamjax.learn import policy, relaxed
from pamjax.simulation import index_config, run_batch
from pamjax.studies import study
from pamjax.systems import make_params
from pamjax.types import EngineConfig
from pamjax.workload import Workload, synthetic

if TYPE_CHECKING:  # annotations only: train imports this module
    from pamjax.learn.train import TrainSetup

SLO_MS = (100.0, 150.0, 200.0)  # PAM_SPEC §8
EXACT_CHUNK = 4  # exact-engine configurations vmapped per call


def episode_workload(setup: TrainSetup, episode: relaxed.Episode) -> Workload:
    """The exact-engine workload of one episode: R requests at t = 0, prompt = the episode's
    context, outputs long enough that nobody finishes within the steps."""
    ctx = np.asarray(episode.context)
    return Workload(np.zeros(ctx.size), ctx, np.full(ctx.size, setup.steps + 2), name="episode")


NEVER_S = 1e9
"""Arrival time (s) of the padding requests of :func:`engine_config`'s fixed workload size."""


def engine_config(setup: TrainSetup, padded_bank_groups: int, net: bool = False
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


def padded_workload(setup: TrainSetup, workload: Workload) -> Workload:
    """``workload`` padded to setup.exact_requests with one-token requests arriving at
    NEVER_S (admitted only after the engine's idle clock jump to NEVER_S, i.e. once no real
    request is left to run)."""
    pad = setup.exact_requests - workload.num_requests
    return Workload(np.concatenate([workload.arrival_s, np.full(pad, NEVER_S)]),
                    np.concatenate([workload.prompt_tokens, np.ones(pad, np.int64)]),
                    np.concatenate([workload.output_tokens, np.ones(pad, np.int64)]),
                    name=workload.name)


def _run_exact(setup: TrainSetup, params_list, workload: Workload, seed: int, chunks: int,
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


def exact_rollouts(setup: TrainSetup, params_list, episode, *, net=None):
    """Exact engine on one episode: step 0 admits and prefills every request, steps 1..S
    decode. With ``net`` (UnitScorer parameters) the engine ranks units with the network
    through ``EngineConfig.placement_score``, at admission and in the online swaps.

    Returns:
      (final EngineState, StepMetrics [S + 1]) as numpy pytrees stacked over
      ``params_list`` [P].
    """
    return _run_exact(setup, params_list, episode_workload(setup, episode),
                      int(episode.seed), 1, net)


def exact_decode_ms(setup: TrainSetup, params_list, episode, *, net=None) -> np.ndarray:
    """Exact engine: mean decode-step time (ms) of each SimParams in ``params_list``, f64
    [P] (:func:`exact_rollouts`; the prefill step 0 is left out)."""
    _, metrics = exact_rollouts(setup, params_list, episode, net=net)
    step_time = np.asarray(metrics.step_time_s, np.float64)
    decode_only = np.asarray(metrics.prefill_requests) == 0
    return np.array([1e3 * t[d].mean() for t, d in zip(step_time, decode_only)])


def params_at_batch(setup: TrainSetup, params, batch: int, *, rule: bool):
    """SimParams of one policy at an SLO-search batch.

    Every policy gets max batch ``batch`` and the default prefill token budget (the
    episodes' params prefill everything at once). With ``rule`` (policies that use PAM's own
    x:y:1 targets: pam_rule, learned_net) the targets are also rebuilt for ``batch`` by
    systems.make_params, as study.run_sweep does (systems.pam_targets depends on the batch);
    without it (learned knobs, grid best) the given x and y are the policy and are kept.
    Every other field of ``params`` (e.g. a capacity override) is kept.

    Args:
      setup: TrainSetup (model and page size).
      params: the policy's SimParams at ``setup.batch``.
      batch: the SLO-search batch.
      rule: rebuild the x:y:1 targets for ``batch``.

    Raises:
      ConfigError: ``rule`` and ``params`` do not carry PAM's targets at setup.batch for the
        setup's model on the default platform, so they cannot be rebuilt for ``batch``.
    """
    fresh = make_params("pam", setup.model, max_batch=batch, page_size=setup.page_size)
    out = params.replace(max_batch=jnp.int32(batch),
                         prefill_token_budget=fresh.prefill_token_budget)
    if not rule:
        return out
    own = make_params("pam", setup.model, max_batch=setup.batch, page_size=setup.page_size)
    given = (float(params.target_x), float(params.target_y))
    if given != (float(own.target_x), float(own.target_y)):
        raise ConfigError("params.target_x/target_y", given,
                          f"are not PAM's targets at batch {setup.batch} for {setup.model} on "
                          "the default platform, so the rule cannot be rebuilt per batch")
    return out.replace(target_x=fresh.target_x, target_y=fresh.target_y)


def slo_throughput(setup: TrainSetup, params_by_name: dict, *, dataset: str, seed: int,
                   rule_names=(), net_names=(), net=None) -> dict:
    """Peak output tokens/s under each SLO for each policy (exact engine, studies/study.py rules).

    Each policy runs ``setup.slo_batches`` (its params per batch: :func:`params_at_batch`,
    PAM's targets rebuilt for the policies in ``rule_names``) with ``2 x max batch``
    requests of ``dataset`` queued at t = 0, their prompts and outputs each clipped to
    ``max_context // 2`` tokens, under continuous batching with the default prefill budget,
    for ``setup.slo_steps`` steps rounded up to whole scans of steps + 1 (the episodes'
    compiled scan, :func:`_run_exact`). TPOT p99 follows studies/study.py; throughput = output
    tokens / simulated seconds over the steps before the first idle clock jump (all real
    requests arrive at t = 0, so the clock only jumps once none is left to run, to the
    padding's NEVER_S arrival: what follows is not the workload's). Policies in
    ``net_names`` run with the ``net`` hook.

    Returns:
      {policy: {"<slo>ms": tokens/s for each SLO_MS, "rows": per-batch rows}}.
    """
    workload = synthetic(dataset, 2 * max(setup.slo_batches), seed=seed)
    workload = Workload(workload.arrival_s * 0.0, np.minimum(workload.prompt_tokens,
                                                             setup.max_context // 2),
                        np.minimum(workload.output_tokens, setup.max_context // 2),
                        name=dataset)
    chunks = -(-setup.slo_steps // (setup.steps + 1))
    rows = {name: [] for name in params_by_name}
    for uses_net in (False, True):
        runs = [(name, b, params_at_batch(setup, params, b, rule=name in rule_names))
                for name, params in params_by_name.items() if (name in net_names) == uses_net
                for b in setup.slo_batches]
        if not runs:
            continue
        states, m = _run_exact(setup, [p for _, _, p in runs], workload, seed, chunks,
                               net if uses_net else None)
        for i, (name, b, _) in enumerate(runs):
            mi, si = index_config(m, i), index_config(states, i)
            tpot = _request_tpot_s(si, padded_workload(setup, workload))
            real = np.cumsum(mi.idle_s, dtype=np.float64) == 0  # before the first idle jump
            elapsed = float(np.sum(mi.step_time_s[real], dtype=np.float64))
            concurrency = np.asarray(mi.decode_requests) + np.asarray(mi.prefill_requests)
            rows[name].append({
                "system": name, "batch": b,
                "throughput_tokens_per_s": float(np.sum(mi.output_tokens[real])) / elapsed
                if elapsed > 0 else 0.0,
                "tpot_p99_ms": float(np.percentile(tpot, 99) * 1e3)
                if tpot.size else float("nan"),
                "oom": int(concurrency[real].max(initial=0)) < b,
                # study's roofline-bound columns are not computed here.
                **{c: None for c in study.BOUND_COLUMNS}})
    out = {}
    for name, mine in rows.items():
        out[name] = {f"{slo:g}ms": study.peak_under_slo(mine, slo)[name]
                     ["throughput_tokens_per_s"] for slo in SLO_MS}
        out[name]["rows"] = mine
    return out




def _request_tpot_s(state, workload: Workload) -> np.ndarray:
    """TPOT (s) of every request with at least two output tokens at the end of a run from
    an empty system: (finish - first token) / (output - 1) for finished requests, (end -
    first token) / (generated - 1) for running ones.

    Args:
      state: final EngineState of one configuration (host arrays).
      workload: the workload it ran.

    Returns:
      f64 [n] seconds per output token after the first: finished requests, then running
      ones.
    """
    now = float(state.clock_whole) + float(state.clock_frac)
    first = np.asarray(state.req_first_token_s, np.float64)
    finish = np.asarray(state.req_finish_s, np.float64)
    out = np.asarray(workload.output_tokens)
    done = np.isfinite(finish) & (out > 1)
    tpot = [(finish[done] - first[done]) / (out[done] - 1)]
    slots = np.asarray(state.slot_request)
    generated = np.asarray(state.slot_generated)
    live = (slots >= 0) & (generated >= 2)
    tpot.append((now - first[slots[live]]) / (generated[live] - 1))
    return np.concatenate(tpot)
