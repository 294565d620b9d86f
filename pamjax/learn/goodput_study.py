"""The learned-scheduling study on SLO goodput (issue 16; behind ``pamjax train-policy``).

For each training seed:

1. **Workloads.** Training: ``train_workloads`` steady-state draws (goodput.steady_workload)
   from a pool of the training dataset; held out: another pool and draw of the training
   dataset, the same of ``heldout_dataset`` and, when given, the trace.
2. **PAM rule.** PAM's own knobs; its batch is the SLO search's answer over ``rule_batches``
   on the first training workload (as studies/study.py picks a batch), costing
   len(rule_batches) exact rollouts. Their TPOT p99 also calibrates the relaxation's TPOT
   level (:func:`tpot_calibration`, the median exact / relaxed ratio; no extra rollouts).
3. **Learned (gradient).** Adam on the relaxed loop (learn/relaxed_loop.py) from the rule's
   point, ``episodes`` training episodes vmapped per iteration, temperature annealed
   geometrically; ``checkpoints`` iterates are then judged in the exact engine on the
   first training workload (one vmapped call) and the best kept. Its budget: the rule's
   batch search + the relaxed rollouts with their backward pass, each counted as its
   measured time (:func:`cost_clock`: CPU time on a CPU) over an exact rollout's, + the
   checkpoint rollouts.
3b. **Learned network** (``learned_net``; ``net_iterations`` > 0): a UnitScorer
   (learn/policy.py: per-unit features plus the lifetime ones: request age, remaining
   length predicted from the prompt by a LengthPredictor fit on the seed's training pool,
   tier occupancy, link load) on top of the learned knobs, which stay fixed. Adam on the
   network's weights through the same relaxed loop from the zero network (= the learned
   knobs exactly), the same annealing; ``checkpoints`` iterates (the zero network among
   them) judged in the exact engine with the scorer as ``EngineConfig.placement_score``
   on the first training workload, the best kept. Its budget: the learned knobs' budget +
   its own relaxed rollouts (priced by their own measured cost) + its checkpoint rollouts.
4. **Grid**: the exact engine over a (x, y, batch) grid on the first training workload.
5. **Black box** (learn/blackbox.py): CMA-ES and random search, each given ``budget_factor``
   x the learned budget (+ the rule's batch search, whose answer CMA-ES starts from).
6. **Judging**: every policy's goodput on every held-out workload, exact engine only; the
   sample-efficiency curve (held-out goodput of each method's incumbent against the
   evaluations it had spent); the relaxation's rank correlation with the exact engine over
   ``rank_policies`` random policies plus the policies found.

Every evaluation count is in exact-rollout equivalents: one policy x one workload x
(warmup + window) steps.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.learn import blackbox, goodput, policy, relaxed, relaxed_loop
from pamjax.progress import Progress
from pamjax.traces import load_trace
from pamjax.workload import DATASETS, Workload

POLICIES = ("pam_rule", "learned", "grid_best", "black_box_best")
"""Policies that are knob vectors (goodput.KNOB_NAMES)."""
NET_POLICY = "learned_net"
"""The network policy's key in the results (absent when ``net_iterations`` is 0)."""
TRAIN_POOL_BASE = 1000  # training pools/draws use seeds from here, held-out ones from 1


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """Everything the study depends on ([D] choices, fixed before any result was seen).

    Fields:
      goodput: goodput.GoodputSetup (model, dataset, max batch, window, SLO).
      relax_steps: S, decode steps of a relaxed episode.
      episodes: relaxed episodes vmapped per iteration.
      train_workloads: training steady-state draws (episodes and black-box generations
        cycle through them).
      iterations: Adam steps.
      learning_rate: peak rate (cosine decay to 10%), clip_norm: global-norm clip.
      tau_start, tau_end: temperature schedule (geometric).
      checkpoints: iterates judged exactly at the end of training (<= goodput.width).
      rule_batches: batch grid of the rule's SLO search.
      grid_log10_x, grid_log10_y, grid_batches: the grid baseline.
      budget_factor: black-box budget / learned budget.
      heldout_dataset: the second held-out dataset.
      rank_policies: random policies of the rank-correlation set.
      net_iterations: Adam steps of the network policy (0 = no network policy).
      net_learning_rate: its peak rate (learn/train.py's finding: the knobs' rates
        saturate the tanh layers; 0.01 is the usual MLP setting).
      net_hidden, net_depth: UnitScorer width and depth.
      predictor_buckets: prompt-length buckets of the LengthPredictor.
    """

    goodput: goodput.GoodputSetup = dataclasses.field(default_factory=goodput.GoodputSetup)
    relax_steps: int = 16
    episodes: int = 2
    train_workloads: int = 4
    iterations: int = 24
    learning_rate: float = 0.2
    clip_norm: float = 1.0
    tau_start: float = 0.5
    tau_end: float = 0.05
    checkpoints: int = 8
    rule_batches: tuple = (8, 16, 24, 32, 40, 48, 56, 64)
    grid_log10_x: tuple = (2.0, 6.0, 12.0)
    grid_log10_y: tuple = (1.0, 5.0)
    grid_batches: tuple = (16, 24, 32, 40)
    budget_factor: int = 10
    heldout_dataset: str = "write-doc"
    rank_policies: int = 16
    net_iterations: int = 24
    net_learning_rate: float = 0.01
    net_hidden: int = 16
    net_depth: int = 2
    predictor_buckets: int = 8

    def __post_init__(self):
        for field in ("relax_steps", "episodes", "train_workloads", "iterations",
                      "checkpoints", "budget_factor", "rank_policies", "net_hidden",
                      "net_depth", "predictor_buckets"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"study.{field}", value, "must be an integer >= 1")
        if isinstance(self.net_iterations, bool) or not isinstance(self.net_iterations, int) \
                or self.net_iterations < 0:
            raise ConfigError("study.net_iterations", self.net_iterations,
                              "must be an integer >= 0")
        if not (np.isfinite(self.net_learning_rate) and self.net_learning_rate > 0):
            raise ConfigError("study.net_learning_rate", self.net_learning_rate,
                              "must be a finite number > 0")
        if self.checkpoints > self.goodput.width:
            raise ConfigError("study.checkpoints", self.checkpoints,
                              f"must be <= goodput.width ({self.goodput.width})")
        for field in ("rule_batches", "grid_batches"):
            values = getattr(self, field)
            if not values or not all(1 <= b <= self.goodput.max_batch for b in values):
                raise ConfigError(f"study.{field}", values,
                                  f"need batches in [1, {self.goodput.max_batch}]")
        if self.heldout_dataset not in DATASETS:
            raise UnknownNameError("workload", self.heldout_dataset, DATASETS)

    def loop_config(self) -> relaxed_loop.LoopConfig:
        g = self.goodput
        return relaxed_loop.LoopConfig(
            relaxed.RelaxConfig(batch=g.max_batch, units_per_request=g.units,
                                page_size=g.page_size, steps=self.relax_steps),
            window=g.window, slo_ms=g.slo_ms, tau_end=self.tau_end)


QUICK = StudySetup()
FULL = dataclasses.replace(QUICK, iterations=60, episodes=4, train_workloads=8,
                           goodput=dataclasses.replace(goodput.GoodputSetup(), window=64),
                           rank_policies=32)


# ---------------------------------------------------------------------------------------------
# Workloads and episodes
# ---------------------------------------------------------------------------------------------

def loop_episode(setup: StudySetup, workload: Workload, pool: Workload, seed: int):
    """The relaxed episode of a steady-state workload: its max_batch in-flight requests."""
    r = setup.goodput.max_batch
    gen = workload.generated_tokens[:r]
    prompts = pool.prompt_tokens.astype(np.float64)
    return relaxed_loop.LoopEpisode(
        context=jnp.asarray(workload.prompt_tokens[:r] + gen - 1, jnp.int32),
        remaining=jnp.asarray(workload.output_tokens[:r] - gen, jnp.int32),
        seed=jnp.uint32(seed), refill_prompt=jnp.float32(prompts.mean()),
        refill_pairs=jnp.float32((prompts * (prompts + 1) / 2).mean()),
        mean_output=jnp.float32(pool.output_tokens.mean()),
        prompt=jnp.asarray(workload.prompt_tokens[:r], jnp.int32),
        generated=jnp.asarray(gen, jnp.int32))


def stack_episodes(episodes):
    return jax.tree.map(lambda *x: jnp.stack(x), *episodes)


def training_pool(setup: StudySetup, seed: int) -> Workload:
    """The seed's training pool (clipped as the engine sees it)."""
    g = setup.goodput
    return goodput.dataset_pool(g, g.dataset, TRAIN_POOL_BASE + 97 * seed)


def length_predictor(setup: StudySetup, seed: int) -> policy.LengthPredictor:
    """The network policy's remaining-length predictor, fit on the seed's training pool
    (its prompts and outputs; nothing held out)."""
    pool = training_pool(setup, seed)
    return policy.fit_length_predictor(pool.prompt_tokens, pool.output_tokens,
                                       setup.predictor_buckets)


def training_data(setup: StudySetup, seed: int):
    """(exact workloads [(Workload, access seed)], stacked LoopEpisodes [W]) of a seed."""
    g = setup.goodput
    base = TRAIN_POOL_BASE + 97 * seed
    pool = training_pool(setup, seed)
    exact, eps = [], []
    for i in range(setup.train_workloads):
        w = goodput.steady_workload(g, pool, base + i)
        exact.append((w, base + i))
        eps.append(loop_episode(setup, w, pool, base + i))
    return exact, stack_episodes(eps)


def heldout_data(setup: StudySetup, seed: int, trace: str | None) -> dict:
    """{name: (Workload, access seed, pool)} of a seed's held-out workloads: pools and
    draws seeded 1 + seed and 101 + seed (disjoint from training's); names do not depend on
    the seed, so results aggregate over seeds by name."""
    g = setup.goodput
    pools = {g.dataset: goodput.dataset_pool(g, g.dataset, 1 + seed),
             setup.heldout_dataset: goodput.dataset_pool(g, setup.heldout_dataset, 1 + seed)}
    if trace:
        pools[f"trace/{pathlib.Path(trace).name}"] = goodput.clipped_pool(
            g, load_trace(trace, max_requests=goodput.POOL_SIZE))
    return {name: (goodput.steady_workload(g, pool, 101 + seed), 101 + seed, pool)
            for name, pool in pools.items()}


# ---------------------------------------------------------------------------------------------
# The gradient method
# ---------------------------------------------------------------------------------------------

def temperature_at(setup: StudySetup, i: int, iterations: int | None = None) -> float:
    """Geometric annealing from tau_start (iteration 0) to tau_end (the last of
    ``iterations``, default setup.iterations)."""
    frac = i / max((setup.iterations if iterations is None else iterations) - 1, 1)
    return float(setup.tau_start * (setup.tau_end / setup.tau_start) ** frac)


_STEPS: dict = {}


def train_step(setup: StudySetup):
    """(optimizer, jitted step(params, theta, opt_state, episodes [E], tau, tpot_scale) ->
    (theta, opt_state, mean relaxed goodput, its gradient at the input theta)); one compile
    per setup."""
    schedule = optax.cosine_decay_schedule(setup.learning_rate, setup.iterations, alpha=0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(setup.clip_norm), optax.adam(schedule))
    if setup not in _STEPS:
        config = setup.loop_config()

        def loss(theta, params, episodes, tau, scale):
            values = jax.vmap(lambda e: relaxed_loop.relaxed_goodput(
                config, params, relaxed_loop.vector_to_knobs(theta), e, tau,
                tpot_scale=scale))(episodes)
            return -jnp.mean(values) / 100.0  # tokens/s in hundreds: O(1) gradients

        def step(params, theta, opt_state, episodes, tau, scale):
            value, grads = jax.value_and_grad(loss)(theta, params, episodes, tau, scale)
            updates, opt_state = optimizer.update(grads, opt_state, theta)
            return (optax.apply_updates(theta, updates), opt_state, -100.0 * value,
                    -100.0 * grads)

        _STEPS[setup] = jax.jit(step)
    return optimizer, _STEPS[setup]


_VALUES: dict = {}


def relaxed_terms(setup: StudySetup, params, vector, episode, tau,
                  tpot_scale: float = 1.0) -> dict:
    """Relaxed loop terms (relaxed_loop.loop_terms) of one policy on one episode, floats."""
    if setup not in _VALUES:
        config = setup.loop_config()
        _VALUES[setup] = jax.jit(lambda p, v, e, t, c: relaxed_loop.loop_terms(
            config, p, relaxed_loop.vector_to_knobs(v), e, t, tpot_scale=c))
    out = _VALUES[setup](params, jnp.asarray(vector, jnp.float32), episode, jnp.float32(tau),
                         jnp.float32(tpot_scale))
    return {k: float(v) for k, v in out.items()}


def train(setup: StudySetup, params, start, episodes, progress: bool = False,
          tpot_scale: float = 1.0):
    """Adam from knob vector ``start`` on the stacked LoopEpisodes (batches of
    setup.episodes taken in turn), the relaxed TPOT scaled by ``tpot_scale``. Returns
    (iterates [I + 1, K], relaxed goodput per iteration [I], seconds per iteration after
    the first, by :func:`cost_clock`)."""
    optimizer, step = train_step(setup)
    theta = jnp.asarray(start, jnp.float32)
    opt_state = optimizer.init(theta)
    count = int(episodes.context.shape[0])
    iterates, values, costs = [np.asarray(theta)], [], []
    with Progress(setup.iterations, desc="train", unit="it", enabled=progress) as bar:
        for i in range(setup.iterations):
            idx = (np.arange(setup.episodes) + i * setup.episodes) % count
            batch = jax.tree.map(lambda x, idx=idx: x[idx], episodes)
            t0 = cost_clock()
            theta, opt_state, value, _ = step(params, theta, opt_state, batch,
                                              jnp.float32(temperature_at(setup, i)),
                                              jnp.float32(tpot_scale))
            value = float(value)
            costs.append(cost_clock() - t0)
            iterates.append(np.asarray(theta))
            values.append(value)
            bar.update(status=f"relaxed goodput {value:.0f} tok/s")
    return np.stack(iterates), values, costs[1:] or costs


def checkpoint_indices(setup: StudySetup, iterations: int | None = None) -> np.ndarray:
    """Iterates judged at the end of training (of ``iterations``, default
    setup.iterations): evenly spaced, the first and the last included."""
    n = setup.iterations if iterations is None else iterations
    return np.unique(np.linspace(0, n, setup.checkpoints).round().astype(int))


# ---------------------------------------------------------------------------------------------
# The network policy (gradient through the same relaxed loop, on top of the learned knobs)
# ---------------------------------------------------------------------------------------------

def net_hook(setup: StudySetup):
    """The exact engine's placement_score of the study's UnitScorer shape."""
    return policy.net_engine_hook(setup.net_hidden, setup.net_depth, setup.goodput.page_size)


_NET_STEPS: dict = {}


def net_train_step(setup: StudySetup):
    """(optimizer, jitted step(params, vector, weights, predictor, opt_state, episodes [E],
    tau, tpot_scale) -> (weights, opt_state, mean relaxed goodput, its gradient at the
    input weights)): Adam on the UnitScorer's weights, knobs ``vector`` fixed; one compile
    per setup."""
    schedule = optax.cosine_decay_schedule(setup.net_learning_rate, setup.net_iterations,
                                           alpha=0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(setup.clip_norm), optax.adam(schedule))
    if setup not in _NET_STEPS:
        config = setup.loop_config()
        score = policy.make_scorer(setup.net_hidden, setup.net_depth, setup.goodput.page_size)

        def loss(weights, params, vector, predictor, episodes, tau, scale):
            net = policy.NetPolicy(net=weights, predictor=predictor)
            values = jax.vmap(lambda e: relaxed_loop.relaxed_goodput(
                config, params, relaxed_loop.vector_to_knobs(vector), e, tau, score, net,
                tpot_scale=scale))(episodes)
            return -jnp.mean(values) / 100.0  # as train_step: O(1) gradients

        def step(params, vector, weights, predictor, opt_state, episodes, tau, scale):
            value, grads = jax.value_and_grad(loss)(weights, params, vector, predictor,
                                                    episodes, tau, scale)
            updates, opt_state = optimizer.update(grads, opt_state, weights)
            return (optax.apply_updates(weights, updates), opt_state, -100.0 * value,
                    jax.tree.map(lambda g: -100.0 * g, grads))

        _NET_STEPS[setup] = jax.jit(step)
    return optimizer, _NET_STEPS[setup]


def train_net(setup: StudySetup, params, vector, start: policy.NetPolicy, episodes,
              progress: bool = False, tpot_scale: float = 1.0):
    """Adam on the weights of ``start`` (a NetPolicy) with the knobs of ``vector`` fixed,
    on the stacked LoopEpisodes (taken in turn as :func:`train`). Returns (NetPolicy
    iterates [I + 1], relaxed goodput per iteration [I], seconds per iteration after the
    first, by :func:`cost_clock`)."""
    optimizer, step = net_train_step(setup)
    weights, predictor = start.net, start.predictor
    vector = jnp.asarray(vector, jnp.float32)
    opt_state = optimizer.init(weights)
    count = int(episodes.context.shape[0])
    iterates, values, costs = [start], [], []
    with Progress(setup.net_iterations, desc="train net", unit="it", enabled=progress) as bar:
        for i in range(setup.net_iterations):
            idx = (np.arange(setup.episodes) + i * setup.episodes) % count
            batch = jax.tree.map(lambda x, idx=idx: x[idx], episodes)
            t0 = cost_clock()
            weights, opt_state, value, _ = step(
                params, vector, weights, predictor, opt_state, batch,
                jnp.float32(temperature_at(setup, i, setup.net_iterations)),
                jnp.float32(tpot_scale))
            value = float(value)
            costs.append(cost_clock() - t0)
            iterates.append(policy.NetPolicy(net=weights, predictor=predictor))
            values.append(value)
            bar.update(status=f"relaxed goodput {value:.0f} tok/s")
    return iterates, values, costs[1:] or costs


def learn_net(setup: StudySetup, params, vector, episodes, workload, seed: int,
              progress: bool, tpot_scale: float, exact_s: float) -> dict:
    """The network policy of one seed on the knobs of ``vector`` (see the module
    docstring, 3b): its best checkpoint by exact goodput on ``workload`` [(Workload,
    access seed)], and what it cost (its own part; the caller adds the knobs' budget)."""
    start = policy.init_net(jax.random.PRNGKey(seed), hidden=setup.net_hidden,
                            depth=setup.net_depth, predictor=length_predictor(setup, seed))
    iterates, curve, costs = train_net(setup, params, vector, start, episodes, progress,
                                       tpot_scale)
    per_relaxed = float(np.median(costs)) / setup.episodes / exact_s
    marks = checkpoint_indices(setup, setup.net_iterations)
    checked = goodput.net_goodput(setup.goodput, vector, [iterates[i] for i in marks],
                                  workload, net_hook(setup))
    best = int(marks[int(np.argmax(checked))])
    return {"best": iterates[best], "best_iteration": best, "iterates": iterates,
            "marks": marks, "relaxed_curve": curve, "per_relaxed": per_relaxed,
            "evaluations": setup.net_iterations * setup.episodes * per_relaxed + len(marks)}


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def cost_clock() -> float:
    """The clock that prices rollouts against each other, seconds: the process's CPU time
    (all threads) on a CPU backend, where other jobs on a shared machine would swing wall
    time by 2-10x; wall time on an accelerator, where the host mostly waits for the device."""
    return time.process_time() if jax.default_backend() == "cpu" else time.perf_counter()


def exact_rollout_seconds(setup: StudySetup, workload) -> float:
    """Measured seconds (:func:`cost_clock`) of one exact rollout (a full population call /
    its width; the engine compiled already)."""
    g = setup.goodput
    vectors = np.stack([goodput.rule_vector(g, b) for b in
                        np.linspace(2, g.max_batch, g.width).round()])
    t0 = cost_clock()
    goodput.goodput(g, vectors, [workload])
    return (cost_clock() - t0) / g.width


def rule_batch(setup: StudySetup, workload, access: int) -> tuple[float, int, list]:
    """(the rule's batch: the highest-goodput batch of rule_batches meeting the SLO on
    ``workload``, or the smallest; exact rollouts spent; their rows)."""
    g = setup.goodput
    vectors = np.stack([goodput.rule_vector(g, b) for b in setup.rule_batches])
    rows = goodput.evaluate(g, goodput.knob_params(g, vectors, goodput.max_budget_tokens(g)),
                            workload, access)
    values = np.array([r["goodput_tokens_per_s"] for r in rows])
    best = int(np.argmax(values)) if values.max() > 0 else 0
    return float(setup.rule_batches[best]), len(setup.rule_batches), rows


def tpot_calibration(setup: StudySetup, params, rows, episode) -> float:
    """Median over the rule's batch search of exact TPOT p99 / relaxed TPOT p99 (at
    tau_end, uncalibrated) on the same training workload: the relaxation's TPOT level
    corrected by exact rollouts already spent (no new ones)."""
    ratios = [r["tpot_p99_ms"] / relaxed_terms(setup, params, goodput.rule_vector(
                  setup.goodput, b), episode, setup.tau_end)["tpot_p99_ms"]
              for b, r in zip(setup.rule_batches, rows) if np.isfinite(r["tpot_p99_ms"])]
    return float(np.median(ratios)) if ratios else 1.0


def grid_search(setup: StudySetup, start, workload):
    """(best knob vector of the (x, y, batch) grid, lambda and budget of ``start``;
    rollouts)."""
    g = setup.goodput
    vectors = np.array([[np.log(10.0**lx), np.log(10.0**ly), start[2], start[3],
                         goodput.batch_logit_of(g, b)]
                        for lx in setup.grid_log10_x for ly in setup.grid_log10_y
                        for b in setup.grid_batches])
    values = goodput.goodput(g, vectors, [workload])
    return vectors[int(np.argmax(values))], len(vectors)


def judge(setup: StudySetup, policies: dict, heldout: dict) -> dict:
    """{workload: {policy: row of goodput.evaluate}} (exact engine, policies vmapped)."""
    g = setup.goodput
    names = list(policies)
    params = goodput.knob_params(g, np.stack([policies[n] for n in names]),
                                 goodput.max_budget_tokens(g))
    return {w: dict(zip(names, goodput.evaluate(g, params, wl, s)))
            for w, (wl, s, _) in heldout.items()}


def rank_correlation(setup: StudySetup, params, policies: dict, heldout: dict, seed: int,
                     tpot_scale: float = 1.0):
    """Spearman rank correlation of relaxed (at tau_end, TPOT scaled by ``tpot_scale``) and
    exact goodput over random policies of the black-box box plus ``policies``, on the first
    held-out workload; and
    the relative gaps (relaxed - exact) / exact of throughput and TPOT p99 there. A
    correlation is None where either side ranks nothing (all values equal)."""
    g = setup.goodput
    rng = np.random.default_rng(seed)
    vectors = np.concatenate([blackbox.to_knobs(setup.goodput,
                                                rng.random((setup.rank_policies, 5))),
                              np.stack(list(policies.values()))])
    name, (workload, access, pool) = next(iter(heldout.items()))
    exact = goodput.evaluate(g, goodput.knob_params(g, vectors, goodput.max_budget_tokens(g)),
                             workload, access)
    episode = loop_episode(setup, workload, pool, access)
    relax = [relaxed_terms(setup, params, v, episode, setup.tau_end, tpot_scale)
             for v in vectors]

    def rho(key):  # None where either side is constant (no ranking to compare)
        a, b = [r[key] for r in relax], [e[key] for e in exact]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return None
        return float(stats.spearmanr(a, b).statistic)

    def gap(key):
        return float(np.mean([(r[key] - e[key]) / e[key] for r, e in zip(relax, exact)
                              if e[key] > 0 and np.isfinite(e[key])]))

    return {"workload": name, "policies": len(vectors),
            "goodput": rho("goodput_tokens_per_s"),
            "throughput": rho("throughput_tokens_per_s"), "tpot_p99": rho("tpot_p99_ms"),
            "gap_at_tau_end": {"throughput": gap("throughput_tokens_per_s"),
                               "tpot_p99": gap("tpot_p99_ms")}}


def run_seed(setup: StudySetup, seed: int, eval_trace: str | None, progress: bool,
             methods=blackbox.METHODS) -> dict:
    """The study for one training seed (see the module docstring); ``methods`` = () runs
    no black-box search (then no black_box_best: evosax is not needed)."""
    g = setup.goodput
    params = goodput.rule_params(g)
    exact_train, episodes = training_data(setup, seed)
    heldout = heldout_data(setup, seed, eval_trace)
    curve_workload = [next(iter(heldout.values()))[:2]]

    batch, rule_evals, rule_rows = rule_batch(setup, *exact_train[0])
    rule = goodput.rule_vector(g, batch)
    exact_s = exact_rollout_seconds(setup, exact_train[0])
    scale = tpot_calibration(setup, params, rule_rows, jax.tree.map(lambda x: x[0], episodes))

    iterates, relaxed_curve, costs = train(setup, params, rule, episodes, progress, scale)
    relaxed_s = float(np.median(costs)) / setup.episodes
    per_relaxed = relaxed_s / exact_s  # exact-rollout equivalents of one relaxed rollout
    marks = checkpoint_indices(setup)
    checked = goodput.goodput(g, iterates[marks], [exact_train[0]])
    learned = iterates[marks[int(np.argmax(checked))]]
    learned_evals = rule_evals + setup.iterations * setup.episodes * per_relaxed \
        + len(marks)

    net = None
    if setup.net_iterations:
        net = learn_net(setup, params, learned, episodes, [exact_train[0]], seed, progress,
                        scale, exact_s)
        net["evaluations"] += learned_evals  # it starts from the learned knobs

    grid_best, grid_evals = grid_search(setup, rule, exact_train[0])
    bb_budget = int(np.ceil(setup.budget_factor * learned_evals))
    searches = {m: blackbox.search(g, m, rule, exact_train, bb_budget, seed, progress)
                for m in methods}
    policies = {"pam_rule": rule, "learned": learned, "grid_best": grid_best}
    bb_name = max(searches, key=lambda m: searches[m]["best_goodput"]) if searches else None
    if searches:
        policies["black_box_best"] = searches[bb_name]["best"]
        policies.update({m: s["best"] for m, s in searches.items()})
    per_workload = judge(setup, policies, heldout)
    curves = sample_efficiency(setup, rule_evals, per_relaxed, iterates, marks, learned_evals,
                               learned, searches, curve_workload)
    net_fields = {}
    if net is not None:
        base = goodput.knob_params(g, learned[None], goodput.max_budget_tokens(g))[0]
        for w, (wl, access, _) in heldout.items():
            per_workload[w][NET_POLICY] = goodput.evaluate(
                g, [base.replace(policy=net["best"])], wl, access, hook=net_hook(setup))[0]
        policies[NET_POLICY] = learned
        curves[NET_POLICY] = net_curve(setup, learned, learned_evals, net, curve_workload)
        net_fields = {"net_best_iteration": net["best_iteration"],
                      "relaxed_net_rollout_in_exact_rollouts": net["per_relaxed"],
                      "relaxed_net_training_curve": net["relaxed_curve"]}
    corr = rank_correlation(setup, params, {k: policies[k] for k in POLICIES
                                            if k in policies}, heldout, seed, scale)
    evaluations = {"learned": learned_evals, "grid": grid_evals,
                   "black_box": bb_budget if searches else 0,
                   "rule_batch_search": rule_evals,
                   **{m: s["evaluations"] for m, s in searches.items()}}
    if net is not None:
        evaluations[NET_POLICY] = net["evaluations"]
    return {"seed": seed, "rule_batch": batch, "black_box_method": bb_name,
            "tpot_calibration": scale,
            "knobs": {k: dict(zip(goodput.KNOB_NAMES, map(float, v)))
                      for k, v in policies.items()},
            "heldout": {w: {p: r for p, r in rows.items()} for w, rows in per_workload.items()},
            "evaluations": evaluations,
            "relaxed_rollout_in_exact_rollouts": per_relaxed,
            "exact_rollout_s": exact_s, "relaxed_rollout_with_gradient_s": relaxed_s,
            "relaxed_training_curve": relaxed_curve,
            "sample_efficiency": curves, "relaxation": corr, **net_fields}


def net_curve(setup: StudySetup, vector, learned_evals, net, workload) -> list:
    """The network policy's sample-efficiency points [(evaluations, exact goodput)] on
    ``workload``: its checkpoints at what they had cost (from the learned knobs' budget),
    the chosen one last at its full budget."""
    marks = net["marks"]
    spent = [learned_evals + i * setup.episodes * net["per_relaxed"] for i in marks[:-1]]
    nets = [net["iterates"][i] for i in marks[:-1]] + [net["best"]]
    values = goodput.net_goodput(setup.goodput, vector, nets, workload, net_hook(setup))
    return [[float(e), float(v)] for e, v in zip(spent + [net["evaluations"]], values)]


def sample_efficiency(setup, rule_evals, per_relaxed, iterates, marks, learned_evals,
                      learned, searches, workload) -> dict:
    """{method: [(evaluations spent, held-out goodput of its incumbent)]} on ``workload``
    (exact engine). The gradient's incumbent at iteration i is its iterate; its final point
    is the checkpoint chosen exactly. A black-box incumbent is its best evaluation so far."""
    g = setup.goodput
    points = {"learned": [(rule_evals + i * setup.episodes * per_relaxed, iterates[i])
                          for i in marks[:-1]] + [(learned_evals, learned)]}
    for m, s in searches.items():
        take = np.unique(np.linspace(0, len(s["trace"]) - 1, g.width).round().astype(int))
        points[m] = [s["trace"][i] for i in take]
    out = {}
    for m, pts in points.items():
        values = goodput.goodput(g, np.stack([v for _, v in pts]), workload)
        out[m] = [[float(e), float(v)] for (e, _), v in zip(pts, values)]
    return out


def ci95(values) -> list[float]:
    """Student-t 95% interval of the mean of ``values`` ([lo, hi]; the mean twice for one)."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return [mean, mean]
    half = float(stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1)
                 / np.sqrt(values.size))
    return [mean - half, mean + half]


def run_study(setup: StudySetup, *, seeds: int = 3, eval_trace: str | None = None,
              progress: bool = False, methods=blackbox.METHODS) -> dict:
    """The whole study over training seeds 0..seeds-1; the JSON of ``pamjax train-policy``.

    ``methods``: the black-box methods to run (blackbox.METHODS; () for none, e.g. without
    evosax: black_box_best is then absent).

    Returns:
      dict with heldout_goodput_tokens_per_s {pam_rule, learned, grid_best, black_box_best,
      learned_net (when setup.net_iterations > 0)} (mean over seeds of each seed's mean
      over its held-out workloads), heldout_goodput_ci95 (t interval over seeds),
      heldout_by_workload (mean over seeds), evaluations {learned, grid, black_box,
      learned_net} (mean over seeds, exact-rollout equivalents), seeds,
      relaxation_rank_correlation (goodput; mean over the seeds where it is defined, else
      None), relaxation (per seed),
      sample_efficiency (per seed), per_seed, setup and wall_seconds.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError("seeds", seeds, "must be an integer >= 1")
    start = time.perf_counter()
    runs = [run_seed(setup, s, eval_trace, progress, methods) for s in range(seeds)]
    names = list(runs[0]["heldout"])
    judged = [p for p in POLICIES + (NET_POLICY,) if p in runs[0]["heldout"][names[0]]]
    per_seed = {p: [float(np.mean([r["heldout"][w][p]["goodput_tokens_per_s"]
                                   for w in names])) for r in runs] for p in judged}
    by_workload = {w: {p: float(np.mean([r["heldout"][w][p]["goodput_tokens_per_s"]
                                         for r in runs])) for p in judged} for w in names}
    rule = np.asarray(per_seed["pam_rule"])
    return {
        "objective": f"exact-engine goodput: output tokens/s of the steady-state window when "
                     f"TPOT p99 <= {setup.goodput.slo_ms:g} ms (else 0)",
        "heldout_goodput_tokens_per_s": {p: float(np.mean(v)) for p, v in per_seed.items()},
        "heldout_goodput_ci95": {p: ci95(v) for p, v in per_seed.items()},
        "heldout_goodput_per_seed": per_seed,
        "learned_over_rule": float(np.mean(np.asarray(per_seed["learned"])
                                           / np.maximum(rule, 1e-9))),
        **({"learned_net_over_rule": float(np.mean(np.asarray(per_seed[NET_POLICY])
                                                   / np.maximum(rule, 1e-9)))}
           if NET_POLICY in per_seed else {}),
        "heldout_by_workload": by_workload,
        "evaluations": {k: float(np.mean([r["evaluations"][k] for r in runs]))
                        for k in runs[0]["evaluations"]},
        "evaluation_unit": "exact-rollout equivalents (one policy x one workload x "
                           "(warmup + window) steps)",
        "seeds": list(range(seeds)),
        "relaxation_rank_correlation": _mean_or_none([r["relaxation"]["goodput"]
                                                      for r in runs]),
        "relaxation": [r["relaxation"] for r in runs],
        "sample_efficiency": [r["sample_efficiency"] for r in runs],
        "per_seed": runs,
        "setup": _jsonable(dataclasses.asdict(setup)),
        "wall_seconds": time.perf_counter() - start,
    }


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value
