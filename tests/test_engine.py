"""Engine invariants, determinism and physics (PAM_SPEC §3, §5, §7)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from pamjax import engine
from pamjax.errors import CapacityError
from pamjax.hardware import get_platform
from pamjax.models import get_model
from pamjax.simulation import device_workload, make_config, run, simulate
from pamjax.systems import SYSTEMS, Knobs, hbm_kv_bytes, make_params
from pamjax.testing import InvariantError, check_invariants
from pamjax.types import STATUS_FINISHED, STATUS_REJECTED
from pamjax.workload import Workload, synthetic


def small_workload(n=12, seed=0, arrivals=False):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(8, 120, n)
    output = rng.integers(2, 30, n)
    arrival = np.cumsum(rng.exponential(0.05, n)) if arrivals else np.zeros(n)
    return Workload(arrival, prompt, output, name="tiny")


def squeezed(params, hbm_units, ddr_units):
    capacity = np.asarray(params.capacity_units).copy()
    capacity[0], capacity[1] = hbm_units, ddr_units
    return params.replace(capacity_units=np.asarray(capacity, np.int32))


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_every_system_conserves_tokens_and_requests(system):
    wl = small_workload(arrivals=True)
    config = make_config(wl, 4, page_size=4, padded_bank_groups=256)
    params = make_params(system, "llama3-8b", max_batch=4, page_size=4)
    if system != "attacc":  # squeeze HBM and DDR so spilling, displacement and swaps happen
        params = squeezed(params, hbm_units=40, ddr_units=30)
    result = run(params, wl, config, chunk_steps=64)
    check_invariants(config, params, result.state, wl, result.metrics)
    status = np.asarray(result.state.req_status)
    assert np.all((status == STATUS_FINISHED) | (status == STATUS_REJECTED))
    s = result.summary
    assert s["requests_finished"] + s["requests_rejected"] == wl.num_requests
    assert s["output_tokens"] == int(np.sum(wl.output_tokens[status == STATUS_FINISHED]))


def test_invariant_checker_catches_a_broken_state():
    wl = small_workload()
    config = make_config(wl, 4)
    params = make_params("pam", "llama3-8b", max_batch=4)
    result = run(params, wl, config, max_steps=8, chunk_steps=8)
    broken = result.state.replace(unit_tier=np.where(
        np.asarray(result.state.unit_tier) >= 0, np.int8(-1), np.asarray(result.state.unit_tier)))
    with pytest.raises(InvariantError, match="presence"):
        check_invariants(config, params, broken, wl)


def test_deterministic_for_a_seed_and_seed_matters():
    wl = synthetic("sharegpt", 16, seed=3)
    a = simulate("pam", "llama3-8b", wl, max_batch=8, seed=1)
    b = simulate("pam", "llama3-8b", wl, max_batch=8, seed=1)
    c = simulate("pam", "llama3-8b", wl, max_batch=8, seed=2)
    for field in ("step_time_s", "selected_units", "energy_pj", "migrated_units"):
        np.testing.assert_array_equal(getattr(a.metrics, field), getattr(b.metrics, field))
    # The seed draws which units are attended (counts are fixed by the selector's budget).
    assert not np.array_equal(a.metrics.selected_mass, c.metrics.selected_mass)
    assert not np.array_equal(a.metrics.persisted_units, c.metrics.persisted_units)


def test_rollout_compiles_once_per_shape():
    wl = small_workload()
    config = make_config(wl, 4)
    params = make_params("ls-pim", "llama3-8b", max_batch=4)
    dev = device_workload(wl)
    engine.rollout_jit.clear_cache()
    state = engine.init_state(config, 0)
    state, _ = engine.rollout_jit(config, params, state, dev, 8)
    other = make_params("pam", "llama3-8b", max_batch=2)  # other values, same shapes
    state, _ = engine.rollout_jit(config, other, state, dev, 8)
    assert engine.rollout_jit._cache_size() == 1


def test_simulate_refuses_a_workload_that_can_never_fit():
    # OPT-175B's 4.7 MB per token: 3.8M tokens fit PAM's three tiers, 57K AttAcc's HBM.
    wl = Workload(np.zeros(2), np.array([100_000, 200_000]), np.array([10, 10]), name="long")
    with pytest.raises(CapacityError, match="none of its 2 request"):
        simulate("attacc", "opt-175b", wl, max_batch=2)


def test_request_that_can_never_fit_is_rejected_and_counted():
    wl = Workload(np.zeros(3), np.array([50, 50, 50]), np.array([5, 5, 5]))
    config = make_config(wl, 2)
    params = make_params("attacc", "llama3-8b", max_batch=2)
    params = squeezed(params, hbm_units=40, ddr_units=0)  # 54 units needed, 40 exist
    result = run(params, wl, config)
    assert result.summary["requests_rejected"] == 3
    assert result.summary["requests_finished"] == 0


def test_attacc_out_of_memory_exactly_when_kv_exceeds_net_hbm():
    """AttAcc holds KV in HBM only: B requests fit iff B x KV(request) <= HBM - weights - reserve."""
    model = get_model("llama3-70b")
    net = hbm_kv_bytes(get_platform(), model)
    tokens = 4000  # prompt + output - 1 tokens of KV per request
    per_request = tokens * model.kv_bytes_per_token
    fit = int(net // per_request)
    batches = [fit, fit + 1]
    wl = Workload(np.zeros(2 * batches[-1]), np.full(2 * batches[-1], 3990),
                  np.full(2 * batches[-1], 11))
    config = make_config(wl, batches[-1], page_size=1000)
    knobs = Knobs(prefill_token_budget=10**8)  # admit everything that fits in one step
    params = [make_params("attacc", model, max_batch=b, page_size=1000, knobs=knobs)
              for b in batches]
    stacked = jax.tree.map(lambda *x: np.stack(x), *params)
    state = jax.tree.map(lambda *x: np.stack(x), *[engine.init_state(config, 0)] * 2)
    _, m = engine.rollout_batch(config, stacked, state, device_workload(wl), 6)
    peak = (np.asarray(m.decode_requests) + np.asarray(m.prefill_requests)).max(1)
    assert peak[0] == fit  # the batch that fits runs in full
    assert peak[1] == fit  # one more request does not: out of memory for batch fit + 1


def test_more_tier_bandwidth_never_slows_a_system():
    wl = small_workload(n=10, seed=4)
    config = make_config(wl, 4, page_size=2)
    for system in ("l-pim", "pam", "vllm-offload"):
        base = squeezed(make_params(system, "llama3-8b", max_batch=4, page_size=2), 60, 60)
        times = []
        for factor in (1.0, 2.0, 8.0):
            rate = np.asarray(base.device_rate) * np.array([1.0, factor, factor])
            link = np.asarray(base.link_rate) * np.array([1.0, factor, factor])
            p = base.replace(device_rate=rate.astype(np.float32), link_rate=link.astype(np.float32))
            times.append(run(p, wl, config).summary["simulated_seconds"])
        assert times[0] >= times[1] >= times[2], (system, times)


def test_dense_fastest_first_step_bounded_by_slowest_tier():
    """With dense attention and fastest-first fill, tiers run in parallel: every decode step
    lasts at least as long as its slowest tier's attention."""
    wl = small_workload(n=8, seed=5)
    config = make_config(wl, 4, page_size=2)
    params = squeezed(make_params("l-pim", "llama3-8b", max_batch=4, page_size=2), 30, 30)
    m = run(params, wl, config).metrics
    busy = np.asarray(m.step_time_s) > 0
    slowest = np.asarray(m.tier_attention_s).max(-1)
    assert np.all(np.asarray(m.step_time_s)[busy] >= slowest[busy] * (1 - 1e-6))
    assert np.any(slowest[busy] > 0) and np.any(np.asarray(m.tier_units)[:, 2] > 0)


def test_pam_without_scheduling_equals_zero_swap_budget():
    wl = small_workload(n=10, seed=6)
    config = make_config(wl, 4, page_size=2)
    off = squeezed(make_params("pam-no-scheduling", "llama3-8b", max_batch=4, page_size=2),
                   40, 40)
    zero = squeezed(make_params("pam", "llama3-8b", max_batch=4, page_size=2), 40, 40)
    zero = zero.replace(swap_budget=np.int32(0))
    a, b = run(off, wl, config), run(zero, wl, config)
    for field in dataclasses.fields(a.metrics):
        np.testing.assert_array_equal(getattr(a.metrics, field.name),
                                      getattr(b.metrics, field.name))
    # ...and scheduling is not a no-op when it is on.
    on = run(squeezed(make_params("pam", "llama3-8b", max_batch=4, page_size=2), 40, 40), wl,
             config)
    assert np.sum(on.metrics.migrated_units) > 0


def test_energy_components_sum_to_total():
    wl = small_workload(n=6)
    s = simulate("pam", "llama3-8b", wl, max_batch=4).summary
    parts = s["energy_j_per_token_by_component"]
    assert sum(parts.values()) == pytest.approx(s["energy_j_per_token"], rel=1e-12)
    assert all(v >= 0 for v in parts.values()) and s["energy_j_per_token"] > 0


def test_recorded_scores_drive_selection():
    wl = Workload(np.zeros(2), np.array([64, 64]), np.array([6, 6]))
    scores = np.full((4, 80), -10.0, np.float32)
    scores[:, :8] = 5.0  # a user's model attends the first 8 tokens at every step
    result = simulate("ls-pim", "llama3-8b", wl, max_batch=2, recorded_scores=scores)
    m = result.metrics
    decode = np.asarray(m.decode_requests) > 0
    # 1/8 of 65..69 tokens = 9 tokens: the 8 recorded hot tokens plus one more per request.
    assert np.all(np.asarray(m.selected_units)[decode] == 9 * np.asarray(m.decode_requests)[decode])
    assert result.summary["selection_persistence"] > 0.8


def test_a_configuration_does_not_depend_on_its_vmap_neighbours():
    """PAM's rollout is bit-identical alone and vmapped beside the other systems (sweeps
    batch configurations; a result must not change with the batch it ran in)."""
    import jax

    from pamjax import engine
    from pamjax.simulation import device_workload, make_config
    from pamjax.systems import MAIN_SYSTEMS, make_params, max_bank_groups

    wl = synthetic("sharegpt", 8, seed=3)
    config = make_config(wl, 4, page_size=16, padded_bank_groups=max_bank_groups())
    dev = device_workload(wl)
    # Small tiers, so that PAM spreads KV over all three and its scheduler moves units.
    every = [make_params(s, "llama3-8b", max_batch=4, page_size=16).replace(
        capacity_units=np.asarray([60, 150, 5000], np.int32)) for s in MAIN_SYSTEMS]

    def rollout(params_list, seeds):
        params = jax.tree.map(lambda *xs: np.stack(xs), *params_list)
        one = jax.device_get(engine.init_state(config, 0))
        state = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], len(seeds), 0), one)
        state = state.replace(seed=np.asarray(seeds, np.uint32))
        return jax.device_get(engine.rollout_batch(config, params, state, dev, 48))

    pam = MAIN_SYSTEMS.index("pam")
    alone_state, alone = rollout([every[pam]], [5])
    seeds = [5 if i == pam else 9 for i in range(len(every))]
    state, beside = rollout(every, seeds)
    for a, b in zip(jax.tree.leaves((alone_state, alone)), jax.tree.leaves((state, beside))):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[pam])
    assert np.asarray(alone.migrated_units).sum() > 0  # PAM's scheduler did move units
