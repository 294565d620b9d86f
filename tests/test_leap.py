"""The event leap (pamjax.leap) against engine.step: the same trajectory, step for step.

Both engines run the same configuration through simulation.run with the full timeline kept;
every step's metrics must agree (integers exactly, float32 times and energies within rtol
1e-6), and so must every request's status, first-token and finish time and the summary.
The leap skips the engine's idle padding after the last request (the engine's lagged
completion check runs whole chunks), so the engine's timeline is the leap's followed by
all-zero rows. ``selected_mass`` is compared with atol 1e-5: the leap counts each decoding
request's attention mass as exactly 1, the engine sums float32 softmax terms.

Cases: a tiny fixed-shape configuration (one compile per engine) run on many workloads
that exercise every path the leap must stop at or get right: bursts and idle gaps, tight
KV capacity spilling prompts and new units to DDR and SSD, HBM disabled, a batch cap below
the slots, the prefill token budget, requests that can never fit (rejected), one-token
outputs and page boundaries; then the Azure conversation trace's first 300 requests.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import leap, simulation, systems
from pamjax.errors import ConfigError
from pamjax.traces import default_azure_trace_path, load_trace
from pamjax.types import STATUS_REJECTED, EngineConfig
from pamjax.workload import Workload

MODEL = "llama3-8b"
SLOTS, REQUESTS, PAGE, UNITS = 6, 24, 4, 40  # contexts < 160 tokens


def tiny_config() -> EngineConfig:
    return EngineConfig(num_slots=SLOTS, units_per_slot=UNITS, page_size=PAGE,
                        num_requests=REQUESTS, padded_bank_groups=systems.max_bank_groups(None),
                        admit_window=SLOTS)


def tiny_params(capacity, max_batch=SLOTS, budget=8192):
    params = systems.make_params("vllm-offload", MODEL, max_batch=max_batch, page_size=PAGE)
    return params.replace(capacity_units=jnp.asarray(capacity, jnp.int32),
                          prefill_token_budget=jnp.asarray(budget, jnp.int32))


def tiny_workload(seed: int) -> Workload:
    """Bursts separated by idle gaps; some one-token outputs; one request that can never fit
    a 40-unit slot (a 170-token prompt) when the seed asks for it."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice([0.0, 0.0, 0.002, 0.01, 0.3], REQUESTS)
    arrival = np.cumsum(gaps) - gaps[0]
    prompt = rng.integers(1, 90, REQUESTS)
    output = rng.integers(1, 60, REQUESTS)
    output[rng.random(REQUESTS) < 0.15] = 1
    if seed % 2:
        prompt[REQUESTS // 2] = 170
    return Workload(arrival, prompt, output, name=f"leap-{seed}")


def both(params, workload, config, **kwargs):
    step = simulation.run(params, workload, config, timeline=True, chunk_steps=64, **kwargs)
    leaped = simulation.run(params, workload, config, timeline=True, chunk_steps=64,
                            leap_steps=leap.LEAP_STEPS, **kwargs)
    return step, leaped


def assert_same_trajectory(step, leaped):
    a, b = step.metrics, leaped.metrics
    n = len(b.step_time_s)
    assert n == leaped.stats.steps and n > 0
    for field in dataclasses.fields(a):
        x, y = np.asarray(getattr(a, field.name)), np.asarray(getattr(b, field.name))
        assert not np.any(x[n:]), f"{field.name}: the engine did work after the leap stopped"
        if field.name == "selected_mass":
            # The leap counts each decoding request's mass as exactly 1; the engine sums
            # float32 softmax terms, within 1e-6 per request (so relative to the count).
            np.testing.assert_allclose(x[:n], y, rtol=1e-6, atol=1e-5, err_msg=field.name)
        elif np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(x[:n], y, err_msg=field.name)
        else:
            np.testing.assert_allclose(x[:n], y, rtol=1e-6, atol=0, err_msg=field.name)
    np.testing.assert_array_equal(step.state.req_status, leaped.state.req_status)
    for name in ("req_first_token_s", "req_finish_s", "clock_whole", "clock_frac"):
        np.testing.assert_allclose(getattr(step.state, name), getattr(leaped.state, name),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    assert bool(step.state.overflow) == bool(leaped.state.overflow) is False
    for key, value in step.summary.items():
        if key == "wall_seconds":
            continue
        if key == "selected_mass_share":
            assert leaped.summary[key] == pytest.approx(value, abs=1e-6)
        else:
            assert leaped.summary[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key


CAPACITIES = {
    "roomy": dict(capacity=(4000, 4000, 4000)),
    "spills": dict(capacity=(25, 30, 400)),  # prompts and new units reach DDR and SSD
    "no-hbm": dict(capacity=(0, 45, 400)),  # every new unit off HBM: the leap stops at each
    "capped": dict(capacity=(60, 60, 400), max_batch=3, budget=96),
}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("case", sorted(CAPACITIES))
def test_leap_follows_the_engine_step_for_step(case, seed):
    config = tiny_config()
    params = tiny_params(**CAPACITIES[case])
    workload = tiny_workload(seed)
    step, leaped = both(params, workload, config)
    assert_same_trajectory(step, leaped)
    if seed % 2:
        assert np.sum(leaped.state.req_status == STATUS_REJECTED) >= 1
    if case == "roomy":  # it did leap: a general step per 3 or more steps
        assert 3 * int(leaped.state.iterations) <= leaped.stats.steps


def test_the_cases_reach_every_tier_and_leap_far():
    """The spilling case really spills, and the roomy case takes long leaps."""
    config = tiny_config()
    _, spilled = both(tiny_params(**CAPACITIES["spills"]), tiny_workload(0), config)
    assert np.all(spilled.metrics.tier_units.max(0) > 0)
    _, roomy = both(tiny_params(**CAPACITIES["roomy"]), tiny_workload(0), config)
    assert roomy.metrics.tier_units[:, 1:].max() == 0


@pytest.mark.parametrize("max_steps", [1, 37, 200])
def test_step_limit_is_exact(max_steps):
    """The leap stops after exactly ``max_steps`` steps (the engine runs whole chunks), and
    those steps are the engine's first ones."""
    config = tiny_config()
    params = tiny_params(**CAPACITIES["spills"])
    workload = tiny_workload(2)
    step = simulation.run(params, workload, config, timeline=True, chunk_steps=64)
    limited = simulation.run(params, workload, config, timeline=True, chunk_steps=64,
                             leap_steps=leap.LEAP_STEPS, max_steps=max_steps)
    assert limited.stats.steps == max_steps == int(limited.state.step)
    for field in dataclasses.fields(step.metrics):
        np.testing.assert_allclose(np.asarray(getattr(limited.metrics, field.name)),
                                   np.asarray(getattr(step.metrics, field.name))[:max_steps],
                                   rtol=1e-6, atol=1e-5 if field.name == "selected_mass" else 0,
                                   err_msg=field.name)
    clock = float(limited.state.clock_whole) + float(limited.state.clock_frac)
    elapsed = np.sum(step.metrics.step_time_s[:max_steps] + step.metrics.idle_s[:max_steps],
                     dtype=np.float64)
    assert clock == pytest.approx(elapsed, rel=1e-6)


def test_azure_trace_prefix_matches_the_engine():
    path = default_azure_trace_path()
    if path is None or not path.is_file():
        pytest.skip("Azure trace not found beside the repository (see test_workload.py)")
    workload = load_trace(path, max_requests=300)
    config = simulation.make_config(workload, 64, page_size=256, padded_bank_groups=256)
    params = systems.make_params("vllm-offload", "llama3-70b", max_batch=64, page_size=256)
    step = simulation.run(params, workload, config, timeline=True, chunk_steps=2048)
    leaped = simulation.run(params, workload, config, timeline=True, chunk_steps=2048,
                            leap_steps=leap.LEAP_STEPS)
    assert_same_trajectory(step, leaped)
    assert leaped.summary["requests_finished"] == 300


def test_only_systems_it_reproduces_may_leap():
    config = tiny_config()
    assert leap.applies(tiny_params(capacity=(10, 10, 10)), config) is None
    reasons = {name: leap.applies(systems.make_params(name, MODEL, max_batch=4), config)
               for name in systems.SYSTEMS if name != "vllm-offload"}
    assert all(reasons.values()), reasons
    assert reasons["attacc"] == "attention runs in PIM"
    workload = tiny_workload(0)
    with pytest.raises(ConfigError, match="engine=.leap.*to pam: attention runs in PIM"):
        simulation.simulate("pam", MODEL, workload, max_batch=4, leap=True)
    assert isinstance(simulation.simulate("vllm-offload", MODEL, workload, max_batch=4,
                                          max_steps=5).state, leap.LeapState)
    assert not isinstance(simulation.simulate("vllm-offload", MODEL, workload, max_batch=4,
                                              max_steps=5, leap=False).state, leap.LeapState)
    with pytest.raises(ConfigError, match="leap_steps"):
        simulation.run(tiny_params(capacity=(10, 10, 10)), workload, config, leap_steps=1)


def test_chunks_share_one_compilation():
    config = dataclasses.replace(tiny_config(), admit_window=SLOTS - 1)  # a config of its own
    params = tiny_params(**CAPACITIES["spills"])
    before = leap.run_chunk._cache_size()
    result = simulation.run(params, tiny_workload(3), config, chunk_steps=leap.LEAP_STEPS,
                            leap_steps=leap.LEAP_STEPS, timeline=False)
    assert result.stats.steps > 4 * leap.LEAP_STEPS  # many chunks
    assert leap.run_chunk._cache_size() == before + 1
