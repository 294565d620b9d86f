"""The network policy with lifetime features on the SLO-goodput objective (issue 16).

The tiny steady state of tests/test_learning.py (4 slots, 512-token contexts, 2 + 4 exact
steps), HBM shrunk where placement must matter. Compiles dominate: one exact engine with
the scorer hook (shared by the exact tests through one vmapped call each), one relaxed net
step (goodput_study.net_train_step, shared by the gradient and counterfactual tests).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pamjax.errors import ConfigError
from pamjax.learn import goodput, goodput_study, policy
from pamjax.simulation import index_config
from pamjax.studies import study

TINY = goodput.GoodputSetup(max_batch=4, max_context=512, warmup=2, window=4, width=4,
                            slo_ms=1e4)
STUDY = dataclasses.replace(
    goodput_study.QUICK, goodput=TINY, relax_steps=3, episodes=1, train_workloads=2,
    iterations=2, checkpoints=2, rule_batches=(2, 4), grid_log10_x=(12.0,),
    grid_log10_y=(5.0,), grid_batches=(2, 4), budget_factor=2, rank_policies=1,
    net_iterations=2, net_hidden=8)
HOOK = goodput_study.net_hook(STUDY)
REMAINING_INPUT = 8  # UnitScorer's inputs: 4 per unit, 3 tiers, age, predicted remaining...


def _strong(net: policy.NetPolicy, scale: float = 3.0, seed: int = 1) -> policy.NetPolicy:
    """``net`` with a random (non-zero) head: a network that changes decisions."""
    head = net.net["params"]["Dense_2"]
    kernel = scale * jax.random.normal(jax.random.PRNGKey(seed), head["kernel"].shape)
    return net.replace(net={"params": dict(net.net["params"],
                                           Dense_2=dict(head, kernel=kernel))})


@pytest.fixture(scope="module")
def setting():
    """(small-HBM rule params at batch 4, steady workload, access seed, zero NetPolicy with
    the predictor fit on the training pool)."""
    pool = goodput_study.training_pool(STUDY, 0)
    workload = goodput.steady_workload(TINY, pool, 7)
    vector = goodput.rule_vector(TINY, 4.0)
    base = goodput.knob_params(TINY, vector[None], goodput.max_budget_tokens(TINY))[0]
    base = base.replace(capacity_units=jnp.asarray([20, 10**6, 10**7], jnp.int32))
    zero = policy.init_net(jax.random.PRNGKey(0), hidden=STUDY.net_hidden,
                           predictor=goodput_study.length_predictor(STUDY, 0))
    return base, workload, 7, zero


def _exact(params_list, workload, access, hook):
    """(final EngineStates, window StepMetrics) stacked over params_list, one vmapped call."""
    config = goodput.engine_config(TINY, params_list[0], hook)
    _, final, metrics = study.run_steady(config, params_list, workload, TINY.window,
                                         TINY.warmup, access, chunk_steps=TINY.chunk,
                                         width=TINY.width)
    return final, metrics


def test_zero_network_is_the_rule_bit_for_bit_with_lifetime_features(setting):
    base, workload, access, zero = setting
    rule_state, rule_m = _exact([base], workload, access, None)
    strong = _strong(zero)
    net_state, net_m = _exact([base.replace(policy=zero), base.replace(policy=strong)],
                              workload, access, HOOK)
    # The zero head over the new features (age, predicted remaining, occupancy, link load):
    # every placement, every step time of the resumed steady state and its refills.
    np.testing.assert_array_equal(net_state.unit_tier[0], rule_state.unit_tier[0])
    np.testing.assert_array_equal(net_m.step_time_s[0], rule_m.step_time_s[0])
    np.testing.assert_array_equal(net_m.output_tokens[0], rule_m.output_tokens[0])
    # Control: a non-zero head moves units (the features reach the decisions).
    assert np.sum(net_state.unit_tier[1] != rule_state.unit_tier[0]) > 0
    # Only a system with a learned score carries the previous step's moves.
    assert rule_state.migrated_tokens is None
    assert net_state.migrated_tokens.shape == (2, 3, 3)


def test_predicted_remaining_reads_the_prompt_not_the_true_output(setting):
    base, workload, access, zero = setting
    steps = TINY.warmup + TINY.window
    generated = workload.generated_tokens
    # Counterfactual: every in-flight request that outlives the run gets another true
    # output length (still outliving it), so the simulation itself cannot tell.
    survives = (generated > 0) & (workload.output_tokens - generated > steps + 2)
    assert survives.sum() >= 2
    other = dataclasses.replace(workload, output_tokens=np.where(
        survives, generated + steps + 2, workload.output_tokens))
    assert np.any(other.output_tokens != workload.output_tokens)
    # A network that weighs the predicted remaining length strongly (first-layer row of
    # that input, UnitScorer's feature 8, scaled up).
    strong = _strong(zero, scale=6.0)
    layer = strong.net["params"]["Dense_0"]
    kernel = layer["kernel"].at[REMAINING_INPUT].multiply(30.0)
    strong = strong.replace(net={"params": dict(strong.net["params"],
                                                Dense_0=dict(layer, kernel=kernel))})
    # Control: the same network with another predictor (100x the bucket means) decides
    # differently, so the predicted remaining length is read.
    longer = strong.replace(predictor=strong.predictor.replace(
        mean_output=100.0 * strong.predictor.mean_output))
    states, metrics = _exact([base.replace(policy=strong), base.replace(policy=longer)],
                             workload, access, HOOK)
    states_cf, metrics_cf = _exact([base.replace(policy=strong)], other, access, HOOK)
    np.testing.assert_array_equal(states_cf.unit_tier[0], states.unit_tier[0])
    np.testing.assert_array_equal(metrics_cf.step_time_s[0], metrics.step_time_s[0])
    assert np.any(states.unit_tier[1] != states.unit_tier[0]) or \
        np.any(metrics.step_time_s[1] != metrics.step_time_s[0])
    # The predictor: bucket mean minus generated, floored; it takes no output at all.
    pred = policy.fit_length_predictor([10, 20, 30, 40], [5, 7, 100, 300], buckets=2)
    np.testing.assert_allclose(pred.remaining(jnp.asarray([15, 35, 35]),
                                              jnp.asarray([2, 50, 500])), [4.0, 150.0, 1.0])


def _net_value_and_grad(params, vector, net, episodes, tau=0.5):
    optimizer, step = goodput_study.net_train_step(STUDY)
    out = step(params, jnp.asarray(vector, jnp.float32), net.net, net.predictor,
               optimizer.init(net.net), episodes, jnp.float32(tau), jnp.float32(1.0))
    return float(out[2]), out[3]


def test_relaxed_goodput_gradient_wrt_the_network_matches_finite_difference(setting):
    base, _, _, zero = setting
    _, episodes = goodput_study.training_data(STUDY, 0)
    episodes = jax.tree.map(lambda x: x[:1], episodes)
    vector = goodput.rule_vector(TINY, 3.0)
    vector[:4] = [np.log(1e2), np.log(0.5), 0.4, np.log(64.0)]  # HBM holds a part only
    net = _strong(zero, scale=0.5)
    value, grad = _net_value_and_grad(base, vector, net, episodes)
    leaves = jax.tree.leaves(grad)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)  # every layer learns
    # One random direction d: (f(w + h d) - f(w - h d)) / 2h against <grad, d>.
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    treedef = jax.tree.structure(grad)
    d = jax.tree.unflatten(treedef, [jax.random.normal(k, g.shape)
                                     for k, g in zip(keys, leaves)])
    norm = np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(d)))
    d = jax.tree.map(lambda x: x / norm, d)
    directional = sum(float(jnp.sum(g * x)) for g, x in zip(leaves, jax.tree.leaves(d)))
    h = 0.05

    def at(sign):
        moved = jax.tree.map(lambda w, x: w + sign * h * x, net.net, d)
        return _net_value_and_grad(base, vector, net.replace(net=moved), episodes)[0]

    fd = (at(1.0) - at(-1.0)) / (2 * h)
    assert abs(directional) > 1e-3, directional
    assert fd == pytest.approx(directional, rel=0.1, abs=1e-3), (fd, directional, value)
    # The relaxation's lifetime truth (``remaining``) of requests that outlive the episode
    # is not a feature: changing it leaves the relaxed goodput as it was.
    long = episodes.replace(remaining=jnp.maximum(episodes.remaining, 50))
    longer = long.replace(remaining=long.remaining + 100)
    assert _net_value_and_grad(base, vector, net, long)[0] == pytest.approx(
        _net_value_and_grad(base, vector, net, longer)[0], rel=1e-6)


def test_network_policy_trains_on_goodput_and_is_judged_by_the_exact_engine():
    result = goodput_study.run_study(STUDY, seeds=1, methods=())
    net = goodput_study.NET_POLICY
    run, = result["per_seed"]
    value = result["heldout_goodput_tokens_per_s"][net]
    assert np.isfinite(value) and value > 0  # the SLO is loose: every policy serves
    lo, hi = result["heldout_goodput_ci95"][net]
    assert lo == hi == value  # one seed
    per_workload = [run["heldout"][w][net]["goodput_tokens_per_s"] for w in run["heldout"]]
    assert value == pytest.approx(np.mean(per_workload), rel=1e-12)
    ev = run["evaluations"]
    marks = len(goodput_study.checkpoint_indices(STUDY, STUDY.net_iterations))
    assert ev[net] == pytest.approx(
        ev["learned"] + STUDY.net_iterations * STUDY.episodes
        * run["relaxed_net_rollout_in_exact_rollouts"] + marks)
    assert run["knobs"][net] == run["knobs"]["learned"]
    # Its first checkpoint is the zero network on the learned knobs: the exact engine
    # scores it as the knob policy itself on the same workload.
    curve = run["sample_efficiency"]
    assert curve[net][0][1] == curve["learned"][-1][1]
    assert curve[net][0][0] == pytest.approx(ev["learned"])
    assert len(run["relaxed_net_training_curve"]) == STUDY.net_iterations
    for key in ("heldout_goodput_tokens_per_s", "heldout_goodput_ci95"):
        assert set(result[key]) == {"pam_rule", "learned", "grid_best", net}


def test_bad_network_settings_name_field_and_value():
    with pytest.raises(ConfigError, match="study.net_iterations"):
        dataclasses.replace(STUDY, net_iterations=-1)
    with pytest.raises(ConfigError, match="study.net_learning_rate"):
        dataclasses.replace(STUDY, net_learning_rate=0.0)
    with pytest.raises(ConfigError, match="predictor.buckets"):
        policy.fit_length_predictor([1, 2], [3, 4], buckets=0)
    with pytest.raises(ConfigError, match="predictor.requests"):
        policy.fit_length_predictor([], [])


def test_steady_episode_tells_a_policy_the_prompt_and_progress_as_the_engine_does():
    # engine.resume holds prompt + generated - 1 tokens of an in-flight request's KV; the
    # relaxed episode's LifetimeView inputs must be the same workload's numbers.
    exact, episodes = goodput_study.training_data(STUDY, 0)
    one = index_config(episodes, 1)
    workload = exact[1][0]
    r = TINY.max_batch
    np.testing.assert_array_equal(one.prompt, workload.prompt_tokens[:r])
    np.testing.assert_array_equal(one.generated, workload.generated_tokens[:r])
    np.testing.assert_array_equal(one.context, one.prompt + one.generated - 1)
