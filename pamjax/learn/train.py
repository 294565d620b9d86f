"""Training placement policies through the fixed-batch relaxation (learn/relaxed.py).

The tools below train a policy family (PAM's knobs, or the UnitScorer network) on the mean
decode-step time of a fixed batch of requests caught mid-stream, and compare with an
exact-engine (x, y) grid. The study behind ``pamjax train-policy`` optimises SLO goodput of
the whole serving loop instead (learn/goodput_study.py); it shares the relaxation's
placement and cost model with this module.

1. **Episodes.** A workload episode is R requests decoding together, each caught mid-stream:
   context = prompt + a uniform fraction of its output, drawn from a synthetic dataset with a
   seed (:func:`make_episodes`).
2. **Training** (:func:`train`): Adam with global-norm gradient clipping and a cosine
   learning-rate schedule (optax); every iteration vmaps the relaxed objective over a batch
   of episodes (workloads and access-model seeds) in one jitted step; the relaxation
   temperature is annealed geometrically from ``tau_start`` to ``tau_end`` (it is an
   argument of the step, so annealing does not recompile).
3. **Grid search** baseline (:func:`grid_search`): the exact engine over a log-spaced (x, y)
   grid on training episodes, vmapped (learn/judge.py).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.learn import policy, relaxed
from pamjax.learn.judge import exact_decode_ms
from pamjax.progress import Progress
from pamjax.simulation import index_config
from pamjax.systems import make_params
from pamjax.types import EngineConfig
from pamjax.workload import DATASETS, Workload, synthetic

TRAIN_SEED_BASE = 1000  # training episodes use seeds TRAIN_SEED_BASE + i
MAX_SWAPS = EngineConfig(num_slots=1, units_per_slot=1).max_swaps  # the engine's static bound


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything a training run depends on (all documented defaults are [D] choices).

    Fields:
      model: model preset.
      batch: R, requests decoding together (and the exact engine's max batch in the
        episodes).
      page_size: tokens per KV unit (16 keeps U ~ 500 for 8K-token contexts).
      steps: decode steps per episode (relaxed and exact).
      max_context: contexts are capped here; fixes U = ceil((max_context + steps) / page).
      train_dataset: dataset of the training episodes.
      episodes: episodes vmapped per training iteration.
      episode_pool: batches of ``episodes`` training episodes cycled through (the pool
        holds episode_pool x episodes distinct episodes; iteration i uses batch
        i mod episode_pool).
      iterations: optimiser steps per family.
      learning_rate: Adam peak learning rate of the knobs (cosine-decayed to 10% of it).
      net_learning_rate: the same for the UnitScorer. Adam moves every weight by about the
        learning rate per step whatever its gradient, so the knobs' 0.3 saturated the tanh
        layers within a few iterations and the network's output collapsed to a constant per
        request (which changes no decision): found on the training episodes of the first
        quick run (its correction spread was exactly 0); 0.01 is the usual MLP setting.
      clip_norm: global-norm gradient clip.
      tau_start, tau_end: relaxation temperature schedule (geometric).
      hidden, depth: UnitScorer width and depth.
      grid_log10_x, grid_log10_y: the (x, y) grid of the baseline search (log10 values).
      grid_episodes: training episodes the grid search is scored on.
      slo_batches: batches of the SLO throughput search.
      slo_steps: simulated steps per SLO point (rounded up to whole scans of steps + 1).
    """

    model: str = "opt-175b"
    batch: int = 64
    page_size: int = 16
    steps: int = 16
    max_context: int = 8192
    train_dataset: str = "arxiv-sum"
    episodes: int = 2
    episode_pool: int = 8
    iterations: int = 30
    learning_rate: float = 0.3
    net_learning_rate: float = 0.01
    clip_norm: float = 1.0
    tau_start: float = 0.5
    tau_end: float = 0.05
    hidden: int = 32
    depth: int = 2
    grid_log10_x: tuple = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
    grid_log10_y: tuple = (1.0, 3.0, 5.0, 7.0, 9.0)
    grid_episodes: int = 1
    slo_batches: tuple = (32, 64)
    slo_steps: int = 64

    def __post_init__(self):
        for field in ("batch", "page_size", "steps", "max_context", "episodes",
                      "episode_pool", "iterations", "hidden", "depth", "grid_episodes",
                      "slo_steps"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{field}", value, "must be an integer >= 1")
        for field in ("learning_rate", "net_learning_rate", "clip_norm", "tau_start",
                      "tau_end"):
            value = getattr(self, field)
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"train.{field}", value, "must be a finite number > 0")
        if self.train_dataset not in DATASETS:
            raise UnknownNameError("workload", self.train_dataset, DATASETS)
        if not self.grid_log10_x or not self.grid_log10_y:
            raise ConfigError("train.grid", (self.grid_log10_x, self.grid_log10_y),
                              "needs at least one x and one y")
        if not self.slo_batches or min(self.slo_batches) < 1:
            raise ConfigError("train.slo_batches", self.slo_batches, "need batches >= 1")

    @property
    def units(self) -> int:
        return -(-(self.max_context + self.steps) // self.page_size)

    @property
    def exact_slots(self) -> int:
        """Request slots of the exact engine: the largest batch of the episodes and the SLO
        search."""
        return max(self.batch, max(self.slo_batches))

    @property
    def exact_requests(self) -> int:
        """Requests N of the exact engine's workload arrays: the larger of an episode's
        (batch) and the SLO search's (2 x its largest batch)."""
        return max(self.batch, 2 * max(self.slo_batches))

    def relax_config(self) -> relaxed.RelaxConfig:
        return relaxed.RelaxConfig(batch=self.batch, units_per_request=self.units,
                                   page_size=self.page_size, steps=self.steps)


QUICK = TrainSetup()
FULL = dataclasses.replace(QUICK, episodes=4, episode_pool=16, iterations=120, steps=24,
                           slo_batches=(8, 16, 32, 64, 96), slo_steps=160,
                           grid_log10_x=tuple(np.arange(2.0, 12.5, 1.0).tolist()),
                           grid_log10_y=tuple(np.arange(1.0, 9.5, 1.0).tolist()),
                           grid_episodes=4)


# ---------------------------------------------------------------------------------------------
# Episodes
# ---------------------------------------------------------------------------------------------

def episode_contexts(workload: Workload, batch: int, seed: int, max_context: int):
    """Contexts [batch] of requests caught mid-generation: prompt + U(0,1) x output."""
    rng = np.random.default_rng(seed)
    n = min(batch, workload.num_requests)
    idx = np.arange(batch) % n
    frac = rng.uniform(0.0, 1.0, batch)
    ctx = workload.prompt_tokens[idx] + np.floor(frac * workload.output_tokens[idx])
    return np.clip(ctx, 1, max_context).astype(np.int32)


def make_episodes(setup: TrainSetup, dataset: str, seeds) -> relaxed.Episode:
    """Episodes stacked on a leading axis [K]: one per seed (workload and access seed)."""
    ctx = [episode_contexts(synthetic(dataset, setup.batch, seed=int(s)), setup.batch, int(s),
                            setup.max_context) for s in seeds]
    return relaxed.Episode(context=jnp.asarray(np.stack(ctx)),
                           seed=jnp.asarray(np.asarray(seeds, np.uint32)))


# ---------------------------------------------------------------------------------------------
# Parameters of the system and the policies
# ---------------------------------------------------------------------------------------------

def base_params(setup: TrainSetup):
    """PAM's SimParams for the setup, all requests prefilled in one step (decode episodes)."""
    params = make_params("pam", setup.model, max_batch=setup.batch, page_size=setup.page_size)
    return params.replace(prefill_token_budget=jnp.int32(2**30))


def init_policy(setup: TrainSetup, params, family: str, key):
    """Initial trainable parameters: the rule's own knobs, or a zero-head network (= rule)."""
    if family == "knobs":
        return policy.knobs_from_params(params)
    return policy.init_net(key, hidden=setup.hidden, depth=setup.depth)


def relaxed_loss(setup: TrainSetup, params, family: str, theta, episodes, temperature):
    """Mean relaxed decode-step time (ms) over the episodes [K], vmapped."""
    config = setup.relax_config()
    if family == "knobs":
        knobs, score_fn, net = policy.soft_knobs(theta), None, None
    else:
        knobs = policy.soft_knobs(policy.knobs_from_params(params))
        score_fn, net = policy.make_scorer(setup.hidden, setup.depth, setup.page_size), theta
    per_episode = jax.vmap(lambda ep: relaxed.objective_ms(
        config, params, knobs, ep, temperature, score_fn, net))(episodes)
    return jnp.mean(per_episode)


def make_optimizer(setup: TrainSetup, family: str):
    """Adam with global-norm clipping and a cosine schedule (the family's peak rate)."""
    peak = setup.net_learning_rate if family == "net" else setup.learning_rate
    schedule = optax.cosine_decay_schedule(peak, setup.iterations, alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(setup.clip_norm), optax.adam(schedule))


def _train_step(setup, family, params, theta, opt_state, episodes, temperature):
    loss, grads = jax.value_and_grad(
        lambda th: relaxed_loss(setup, params, family, th, episodes, temperature))(theta)
    updates, opt_state = make_optimizer(setup, family).update(grads, opt_state, theta)
    return optax.apply_updates(theta, updates), opt_state, loss, grads


_TRAIN_STEPS: dict = {}


def make_train_step(setup: TrainSetup, params, family: str):
    """(optimizer, jitted ``step(theta, opt_state, episodes, temperature) -> (theta,
    opt_state, loss, grads)``); ``loss`` (ms) and ``grads`` are taken at the input theta.

    One jitted step per (setup, family), cached for the process and wrapped in
    ``chex.assert_max_traces(n=1)``: the temperature and the params are traced arguments,
    so annealing and other SimParams of the same structure never recompile, and anything
    that would (another episode count, params of another structure) raises instead of
    silently paying a compile. ``episodes`` must have ``setup.episodes`` rows.
    """
    key = (setup, family)
    if key not in _TRAIN_STEPS:
        def step(params, theta, opt_state, episodes, temperature):
            return _train_step(setup, family, params, theta, opt_state, episodes, temperature)

        # chex counts traces per name (and source): one counter per (setup, family).
        step.__name__ = f"train_step_{family}_{len(_TRAIN_STEPS)}"
        _TRAIN_STEPS[key] = jax.jit(chex.assert_max_traces(step, n=1))
    return make_optimizer(setup, family), functools.partial(_TRAIN_STEPS[key], params)


def relaxed_value(setup: TrainSetup, params, family: str, theta, episode,
                  temperature) -> float:
    """Relaxed mean decode-step time (ms) of one episode, f32 -> float.

    Evaluated through the cached train step (its update is discarded), so judging a policy
    in the relaxation reuses the compile training paid; the episode is tiled to the step's
    ``setup.episodes`` rows (a mean of copies).
    """
    optimizer, step = make_train_step(setup, params, family)
    tiled = jax.tree.map(lambda x: jnp.repeat(x[None], setup.episodes, axis=0), episode)
    return float(step(theta, optimizer.init(theta), tiled, jnp.float32(temperature))[2])


def temperature_at(setup: TrainSetup, i: int) -> float:
    """Geometric annealing from tau_start (iteration 0) to tau_end (the last)."""
    frac = i / max(setup.iterations - 1, 1)
    return float(setup.tau_start * (setup.tau_end / setup.tau_start) ** frac)


def train(setup: TrainSetup, family: str, *, seed: int = 0, progress: bool = False,
          params=None):
    """Train one policy family; returns (theta, history rows, relaxed evaluations used).

    Deterministic for a seed: episodes, initialisation and the schedule depend on it alone.
    """
    policy.check_family(family)
    if family == "both":
        raise ConfigError("family", family, "train one family at a time (knobs or net)")
    params = base_params(setup) if params is None else params
    key = jax.random.PRNGKey(seed)
    theta = init_policy(setup, params, family, key)
    optimizer, step = make_train_step(setup, params, family)
    opt_state = optimizer.init(theta)
    pool_seeds = TRAIN_SEED_BASE + 97 * seed + np.arange(setup.episode_pool * setup.episodes)
    pool = make_episodes(setup, setup.train_dataset, pool_seeds)
    batches = setup.episode_pool
    history = []
    with Progress(setup.iterations, desc=f"train {family}", unit="it",
                  enabled=progress) as bar:
        for i in range(setup.iterations):
            b = i % batches
            episodes = jax.tree.map(
                lambda x, b=b: x[b * setup.episodes:(b + 1) * setup.episodes], pool)
            tau = temperature_at(setup, i)
            theta, opt_state, loss, _ = step(theta, opt_state, episodes, jnp.float32(tau))
            history.append({"family": family, "iteration": i, "temperature": tau,
                            "relaxed_step_ms": float(loss)})
            bar.update(status=f"loss {float(loss):.2f} ms, tau {tau:.3f}")
    return theta, history, setup.iterations * setup.episodes


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path, theta) -> pathlib.Path:
    """Write a parameter pytree with flax.serialization (msgpack bytes)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes(jax.device_get(theta)))
    return path


def load_checkpoint(path, like):
    """Read parameters saved by :func:`save_checkpoint` into the structure of ``like``."""
    return serialization.from_bytes(like, pathlib.Path(path).read_bytes())


# ---------------------------------------------------------------------------------------------
# The grid-search baseline
# ---------------------------------------------------------------------------------------------

def grid_points(setup: TrainSetup, params):
    return [params.replace(target_x=jnp.float32(10.0**lx), target_y=jnp.float32(10.0**ly))
            for lx in setup.grid_log10_x for ly in setup.grid_log10_y]


def grid_search(setup: TrainSetup, params, episodes):
    """Exact-engine grid over (x, y) on training episodes; returns (best params, table,
    simulator evaluations)."""
    points = grid_points(setup, params)
    scores = np.mean([exact_decode_ms(setup, points, index_config(episodes, k))
                      for k in range(int(episodes.context.shape[0]))], axis=0)
    table = [{"log10_x": lx, "log10_y": ly, "train_step_ms": float(s)}
             for (lx, ly), s in zip([(a, b) for a in setup.grid_log10_x
                                     for b in setup.grid_log10_y], scores)]
    best = int(np.argmin(scores))
    return points[best], table, len(points) * int(episodes.context.shape[0])
