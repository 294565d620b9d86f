"""Skipping idle work (EngineConfig.skip_idle, active_rows.py) changes no schedule: every
integer and boolean result and the clock are the same bit for bit, other float32 values
within their last bits (XLA may compile a phase on fewer rows with different fusions).

The per-request phases run on the decoding rows alone, gathered into the smallest bucket
that holds them; prompt placement runs only in steps that admit. Counterfactual for the
helper: a phase that is *not* row-wise (it mixes rows) gives a different answer when
compacted, so the trajectory checks below could fail."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import active_rows, engine, simulation, systems
from pamjax.errors import ConfigError
from pamjax.testing import schedule_difference
from pamjax.workload import synthetic


def test_buckets_are_powers_of_two_then_all_rows():
    assert active_rows.row_buckets(64) == (4, 8, 16, 32, 64)
    assert active_rows.row_buckets(12) == (4, 8, 12)
    assert active_rows.row_buckets(3) == (3,)


@pytest.mark.parametrize("count", [0, 1, 4, 5, 9, 17, 24])
def test_a_row_wise_phase_on_active_rows_equals_it_on_all_rows(count):
    rng = np.random.default_rng(count)
    rows, units = 24, 37
    values = jnp.asarray(rng.normal(size=(rows, units)).astype(np.float32))
    scale = jnp.asarray(rng.uniform(1, 2, size=rows).astype(np.float32))
    active = jnp.asarray(rng.permutation(rows) < count)

    def phase(xs):  # row sums, softmax and a per-row scale: row-wise, float reductions
        v, s, on = xs  # as the contract asks, rows that are off give the inactive values
        return (jnp.where(on[:, None], jax.nn.softmax(v * s[:, None], axis=-1), 0.0),
                jnp.where(on, jnp.sum(v, -1), -1.0))

    inactive = (jnp.zeros((rows, units)), jnp.full(rows, -1.0))
    got = jax.jit(lambda a, xs: active_rows.on_active_rows(a, phase, xs, inactive))(
        active, (values, scale, active))
    full = jax.jit(phase)((values, scale, active))  # compiled, as the engine's phases are
    for g, f in zip(got, full):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(f))


def test_a_phase_that_mixes_rows_is_not_reproduced():
    # The counterfactual: the helper's contract (row-wise phases) is what makes it exact.
    values = jnp.arange(8.0)[:, None] * jnp.ones((8, 3))
    active = jnp.arange(8) < 3

    def mixing(v):
        return v - jnp.mean(v, 0, keepdims=True)

    got = active_rows.on_active_rows(active, mixing, values, jnp.zeros((8, 3)))
    assert not np.array_equal(np.asarray(got)[:3], np.asarray(mixing(values))[:3])


def _trajectory(config, params, workload, chunks, steps):
    dev = simulation.device_workload(workload)
    state, out = engine.init_state(config, 3), []
    for _ in range(chunks):
        state, metrics = engine.rollout_jit(config, params, state, dev, steps)
        out.append(jax.device_get(metrics))
    return jax.device_get(state), out


def _assert_same_run(fast, plain):
    """The same schedule (every integer and boolean of the final state and of every step's
    metrics, and the clock, bit for bit); other float32 values within their last bits."""
    pairs = [(fast[0], plain[0])] + list(zip(fast[1], plain[1]))
    for a, b in pairs:
        diff = schedule_difference(a, b)
        assert diff["schedule_fields"] == []
        assert diff["float_max_relative"] < 1e-6


@pytest.mark.parametrize("system,page", [("pam", 1), ("pam", 16), ("ls-pim", 1)])
def test_skipping_idle_work_gives_the_same_schedule(system, page):
    # Arrivals spread so the number of running requests moves through several buckets
    # (1 to 12 of 12 slots), with admissions in some steps and not in others.
    workload = synthetic("sharegpt", 40, seed=5, rate_per_s=40.0)
    config = simulation.make_config(workload, 12, page_size=page,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params(system, "llama3-8b", max_batch=12, page_size=page)
    assert config.skip_idle  # the default
    fast = _trajectory(config, params, workload, 3, 96)
    plain = _trajectory(dataclasses.replace(config, skip_idle=False), params, workload, 3, 96)
    running = np.concatenate([m.decode_requests for m in fast[1]])
    assert running.min() < 4 and running.max() > 8  # buckets 4, 8 and all rows were used
    assert np.concatenate([m.prefill_requests for m in fast[1]]).sum() > 10
    if system == "pam":
        assert np.concatenate([m.migrated_units for m in fast[1]]).sum() > 0
    _assert_same_run(fast, plain)


def test_skip_idle_must_be_a_bool():
    config = simulation.make_config(synthetic("sharegpt", 2, seed=0), 2)
    with pytest.raises(ConfigError, match="skip_idle"):
        dataclasses.replace(config, skip_idle=1)


def test_a_learned_placement_score_on_the_decoding_rows_gives_the_same_schedule():
    # The scheduler's hook sees its rows' slice of the LifetimeView (prompt, generated) and
    # the system-wide fields whole; a random non-zero network, so the score decides things.
    from pamjax.learn import policy

    workload = synthetic("sharegpt", 40, seed=5, rate_per_s=40.0)
    hook = policy.net_engine_hook(hidden=8, depth=2, page_size=1)
    config = simulation.make_config(workload, 12, page_size=1, placement_score=hook,
                                    padded_bank_groups=systems.max_bank_groups())
    net = policy.init_net(jax.random.PRNGKey(0), hidden=8, predictor=policy.fit_length_predictor(
        workload.prompt_tokens, workload.output_tokens))
    head = net.net["params"]["Dense_2"]
    kernel = 3.0 * jax.random.normal(jax.random.PRNGKey(1), head["kernel"].shape)
    net = net.replace(net={"params": dict(net.net["params"], Dense_2=dict(head, kernel=kernel))})
    params = systems.make_params("pam", "llama3-8b", max_batch=12, page_size=1).replace(
        policy=net)
    fast = _trajectory(config, params, workload, 2, 96)
    plain = _trajectory(dataclasses.replace(config, skip_idle=False), params, workload, 2, 96)
    assert np.concatenate([m.migrated_units for m in fast[1]]).sum() > 0
    _assert_same_run(fast, plain)
