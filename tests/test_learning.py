"""Learned KV scheduling: the relaxation, the policies, training and exact-engine judging.

Everything runs on a tiny case (4 requests of ~1.4K-2K tokens, 16-token units, 3 decode
steps) whose HBM is shrunk to 150 units so that KV spills and placement matters.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import policy, relaxed, train
from pamjax.errors import ConfigError, UnknownNameError

SETUP = dataclasses.replace(
    train.QUICK, batch=4, steps=3, max_context=2048, episodes=2, episode_pool=2,
    iterations=3, grid_log10_x=(4.0, 12.0), grid_log10_y=(7.0,), grid_episodes=1,
    slo_batches=(2, 4), slo_steps=8, hidden=8)


@pytest.fixture(scope="module")
def params():
    p = train.base_params(SETUP)
    return p.replace(capacity_units=jnp.asarray([150, 10**6, 10**7], jnp.int32))


@pytest.fixture(scope="module")
def episodes():
    return train.make_episodes(SETUP, "arxiv-sum", [train.TRAIN_SEED_BASE,
                                                    train.TRAIN_SEED_BASE + 1])


def _knob_objective(params, episodes, tau):
    def f(vec):
        knobs = policy.KnobParams(*vec)
        return train.relaxed_loss(SETUP, params, "knobs", knobs, episodes, tau)
    return jax.jit(f)


def test_gradient_matches_finite_differences(params, episodes):
    # A point inside the interesting region (the rule's x is saturated at 1e12).
    start = jnp.asarray([np.log(1e8), np.log(1e5), 0.4, np.log(4.0)], jnp.float32)
    f = _knob_objective(params, episodes, jnp.float32(0.5))
    grad = np.asarray(jax.grad(f)(start))
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-3, grad
    h = 0.02
    for i in range(4):
        e = jnp.zeros(4).at[i].set(h)
        fd = (float(f(start + e)) - float(f(start - e))) / (2 * h)
        assert fd == pytest.approx(grad[i], rel=0.1, abs=2e-3), (i, fd, grad)


def test_relaxation_gap_shrinks_with_temperature(params, episodes):
    episode = train._index(episodes, 0)
    exact = train.exact_decode_ms(SETUP, [params], episode)[0]
    knobs = policy.knobs_from_params(params)
    one = jax.tree.map(lambda x: x[:1], episodes)
    gaps = [abs(float(train.relaxed_loss_jit(SETUP, params, "knobs", knobs, one,
                                             jnp.float32(tau))) - exact)
            for tau in (2.0, 0.5, 0.05)]
    assert gaps[2] < gaps[0], gaps
    assert gaps[2] <= gaps[1] + 1e-3 * exact, gaps


def test_smooth_max_bounds_the_max():
    x = jnp.asarray([3.0, 1.0, 2.5])
    for tau in (1.0, 0.1, 0.01):
        value = float(relaxed.smooth_max(x, tau))
        assert 3.0 <= value <= 3.0 + 3.0 * tau * np.log(3) + 1e-6
    assert float(relaxed.smooth_max(x, 0.01)) < float(relaxed.smooth_max(x, 0.1))


def test_soft_counts_placement_holds_counts():
    key = jnp.asarray(np.random.default_rng(0).lognormal(0, 2, (3, 40)), jnp.float32)
    present = jnp.arange(40)[None, :] < jnp.asarray([[40], [25], [10]])
    q = relaxed.soft_counts_placement(key, present, jnp.asarray([12.0, 5.0, 3.0]),
                                      jnp.asarray([8.0, 10.0, 0.0]), jnp.float32(0.05), 40)
    np.testing.assert_allclose(np.asarray(q.sum(-1)), np.asarray(present, np.float32),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(q[..., 0].sum(-1)), [12, 5, 3], atol=0.05)
    np.testing.assert_allclose(np.asarray(q[..., 2].sum(-1)), [8, 10, 0], atol=0.5)


def test_train_step_traces_once_and_is_deterministic(params, episodes):
    chex.clear_trace_counter()
    optimizer, step = train.make_train_step(SETUP, params, "knobs", max_traces=1)
    theta = policy.knobs_from_params(params)
    state = optimizer.init(theta)
    for tau in (0.5, 0.3, 0.1):  # annealing must not retrace
        theta, state, loss = step(theta, state, episodes, jnp.float32(tau))
        assert np.isfinite(float(loss))
    a = train.train(SETUP, "knobs", seed=3, params=params)[0]
    b = train.train(SETUP, "knobs", seed=3, params=params)[0]
    chex.assert_trees_all_equal(a, b)


def test_checkpoint_round_trip(tmp_path):
    net = policy.init_net(jax.random.PRNGKey(1), hidden=8)
    net = jax.tree.map(lambda x: x + 0.25, net)
    knobs = policy.KnobParams(*(jnp.float32(v) for v in (1.5, -2.0, 0.3, 1.1)))
    for name, tree in (("net", net), ("knobs", knobs)):
        path = train.save_checkpoint(tmp_path / f"{name}.msgpack", tree)
        like = jax.tree.map(jnp.zeros_like, tree)
        chex.assert_trees_all_equal(train.load_checkpoint(path, like), tree)


def test_untrained_net_in_the_exact_engine_is_the_rule(params, episodes):
    # The zero-head network scores units by normalised importance, which the x:y:1 rule
    # treats exactly as the importance itself: the hook is wired and changes nothing else.
    episode = train._index(episodes, 1)
    net = policy.init_net(jax.random.PRNGKey(0), hidden=SETUP.hidden)
    rule = train.exact_decode_ms(SETUP, [params], episode)[0]
    hooked = train.exact_decode_ms(SETUP, [params], episode, net=net)[0]
    assert hooked == pytest.approx(rule, rel=1e-4)


def test_reported_numbers_are_exact_engine_numbers(params, tmp_path):
    result = train.run_study(SETUP, family="knobs", seed=0, out_dir=str(tmp_path),
                             params=params)
    theta = train.load_checkpoint(tmp_path / "policy_knobs.msgpack",
                                  policy.knobs_from_params(params))
    learned = policy.knobs_to_params(params, theta, train.MAX_SWAPS)
    measured = []
    for name in result["heldout_by_workload"]:
        dataset, seed = name.split("/seed")
        episode = train._index(train.make_episodes(SETUP, dataset, [int(seed)]), 0)
        measured.append(train.exact_decode_ms(SETUP, [learned, params], episode))
    measured = np.mean(measured, axis=0)
    reported = result["heldout_step_time_ms"]
    assert reported["learned"] == reported["learned_knobs"]
    assert reported["learned"] == pytest.approx(measured[0], rel=1e-6)
    assert reported["pam_rule"] == pytest.approx(measured[1], rel=1e-6)
    assert result["simulator_evaluations"] == dict(
        result["simulator_evaluations"], gradient=SETUP.iterations * SETUP.episodes,
        grid=2 * SETUP.grid_episodes)
    assert set(result["slo_throughput_tokens_per_s"]) == {"pam_rule", "grid_best",
                                                          "learned_knobs"}
    assert (tmp_path / "training_curve.csv").read_text().count("\n") == SETUP.iterations + 1


def test_bad_input_names_field_and_value():
    with pytest.raises(UnknownNameError, match="policy family"):
        policy.check_family("bandit")
    with pytest.raises(ConfigError, match="train.iterations"):
        dataclasses.replace(SETUP, iterations=0)
    with pytest.raises(ConfigError, match="train.tau_end"):
        dataclasses.replace(SETUP, tau_end=-1.0)
    with pytest.raises(ConfigError, match="relax.steps"):
        relaxed.RelaxConfig(4, 8, 16, 0)
