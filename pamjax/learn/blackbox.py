"""Black-box search of policy knobs on the exact engine: CMA-ES and random search (evosax).

Both search the box :data:`BOX` of goodput.KNOB_NAMES in normalised coordinates u in
[0, 1]^K (CMA-ES starts at the rule's point with a step of ``CMA_STD`` of the box; random
search samples the box uniformly). Every generation is one population of
``setup.width`` policies evaluated by the exact engine in one vmapped call per chunk of
steps (goodput.evaluate) on one training workload, the workloads taken in turn, so one
evaluation is one exact rollout. ``evosax`` is an optional extra (``pip install
pamjax[learn]``); importing this module does not need it, :func:`search` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pamjax.errors import ConfigError
from pamjax.learn import goodput
from pamjax.progress import Progress

METHODS = ("cma_es", "random_search")
CMA_STD = 0.15  # CMA-ES initial step, in units of the box's width


def box(setup: goodput.GoodputSetup) -> np.ndarray:
    """f64 [2, K]: low and high of each knob coordinate (goodput.KNOB_NAMES): x in [1e-2,
    1e12], y in [1e-2, 1e10], lambda in sigmoid([-4, 4]), swap budget in [1, the most one
    phase can move] tokens, batch in 1 + (R - 1) sigmoid([-4, 4])."""
    top = np.log(max(goodput.max_budget_tokens(setup), 2))
    return np.array([[np.log(1e-2), np.log(1e-2), -4.0, 0.0, -4.0],
                     [np.log(1e12), np.log(1e10), 4.0, top, 4.0]])


def to_knobs(setup, u) -> np.ndarray:
    """Normalised points u [P, K] (clipped to the box) -> knob vectors [P, K]."""
    lo, hi = box(setup)
    return lo + np.clip(np.asarray(u, np.float64), 0.0, 1.0) * (hi - lo)


def to_unit(setup, vectors) -> np.ndarray:
    """Knob vectors [P, K] -> normalised points, clipped to [0, 1]."""
    lo, hi = box(setup)
    return np.clip((np.asarray(vectors, np.float64) - lo) / (hi - lo), 0.0, 1.0)


_STRATEGIES: dict = {}


def _strategy(method: str, pop: int):
    """(evosax strategy, its params, jitted ask, jitted tell) of a method and population
    size, cached so that every search of that shape shares one compile."""
    if (method, pop) not in _STRATEGIES:
        from evosax.algorithms import CMA_ES, RandomSearch

        dims = len(goodput.KNOB_NAMES)
        dummy = jnp.zeros(dims, jnp.float32)
        if method == "cma_es":
            es = CMA_ES(population_size=pop, solution=dummy)
            params = es.default_params.replace(std_init=CMA_STD)
        else:
            es = RandomSearch(population_size=pop, solution=dummy,
                              sampling_fn=lambda k: jax.random.uniform(k, (dims,)))
            params = es.default_params
        _STRATEGIES[method, pop] = (es, params, jax.jit(es.ask), jax.jit(es.tell))
    return _STRATEGIES[method, pop]


def search(setup: goodput.GoodputSetup, method: str, start, workloads, budget: int,
           seed: int, progress: bool = False) -> dict:
    """Run one black-box method for ``budget`` exact evaluations.

    Args:
      setup: GoodputSetup (setup.width = the population size).
      method: "cma_es" or "random_search".
      start: knob vector [K] CMA-ES starts at (the rule's).
      workloads: [(Workload, access seed)] training workloads, one per generation in turn.
      budget: exact rollouts to spend (rounded up to whole generations).
      seed: PRNG seed of the search.
      progress: a progress bar over generations on stderr.

    Returns:
      {"best": knob vector [K] of the best evaluation, "best_goodput": its training goodput,
      "trace": [(evaluations spent, best knob vector so far)] after each generation,
      "evaluations": rollouts spent}.

    Raises:
      ConfigError: unknown method or budget < 1. ImportError: evosax is not installed.
    """
    if method not in METHODS:
        raise ConfigError("method", method, f"must be one of {METHODS}")
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError("budget", budget, "must be an integer >= 1")
    pop = setup.width
    es, params, ask, tell = _strategy(method, pop)
    if method == "cma_es":
        mean = jnp.asarray(to_unit(setup, np.asarray(start)[None])[0], jnp.float32)
    else:
        mean = jnp.full(len(goodput.KNOB_NAMES), 0.5, jnp.float32)
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)
    state = es.init(sub, mean, params)
    best, best_value, spent, trace, g = None, -np.inf, 0, [], 0
    bar = Progress(-(-budget // pop), desc=method, unit="gen", enabled=progress)
    while spent < budget:
        key, k_ask, k_tell = jax.random.split(key, 3)
        population, state = ask(k_ask, state, params)
        vectors = to_knobs(setup, np.asarray(population))
        values = goodput.goodput(setup, vectors, [workloads[g % len(workloads)]])
        g += 1
        spent += pop
        i = int(np.argmax(values))
        if values[i] > best_value:
            best, best_value = vectors[i], float(values[i])
        trace.append((spent, best.copy()))
        bar.update(status=f"best {best_value:.0f} tok/s")
        # evosax minimises.
        state, _ = tell(k_tell, population, -jnp.asarray(values, jnp.float32), state, params)
    bar.close()
    return {"best": best, "best_goodput": best_value, "trace": trace, "evaluations": spent}
