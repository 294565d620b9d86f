"""The bisection selection in pamjax/_numerics.py against brute force, and its row blocking
(threshold_bracket bisects L2-sized blocks of rows) against the unblocked bisection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import _numerics
from pamjax._numerics import threshold_bracket, top_count


def _case(rows, units, seed, integer_weights=True):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, units)).astype(np.float32)
    values[:, ::7] = values[:, :1]  # ties
    if integer_weights:
        weights = rng.integers(0, 17, size=(rows, units)).astype(np.float32)
    else:
        weights = (rng.random((rows, units)) * (rng.random((rows, units)) < 0.8)).astype(
            np.float32)
    weights[0] = 0.0  # an empty row
    target = np.ceil(0.3 * weights.sum(-1)).astype(np.float32)
    target[1] = weights[1].sum() + 5  # a row whose total is below its target
    return values, weights, target


def _covered(values, weights, threshold):
    return (weights * (values >= threshold[:, None])).sum(-1)


def test_bracket_brackets_the_target_by_brute_force():
    values, weights, target = _case(12, 300, 0)
    lo, hi = map(np.asarray, jax.jit(threshold_bracket, static_argnums=3)(
        values, weights, target, 20))
    reachable = weights.sum(-1) >= target
    assert np.all(_covered(values, weights, lo)[reachable] >= target[reachable])
    assert np.all(_covered(values, weights, hi)[target > 0] < target[target > 0])
    # Unreachable rows keep a lo below every present value: everything counts.
    assert np.all(_covered(values, weights, lo)[~reachable] == weights.sum(-1)[~reachable])
    span = values.max(-1) - values.min(-1) + 2.0
    assert np.all((hi - lo)[reachable] <= span[reachable] / 2**20 * 1.01)


@pytest.mark.parametrize("rows", [10, 16])
@pytest.mark.parametrize("integer_weights", [True, False])
def test_row_blocks_change_no_bit(monkeypatch, rows, integer_weights):
    """Blocks of 3 rows (10 rows: the last block padded) give the unblocked bisection's
    bracket bit for bit, alone and under vmap (the study's path)."""
    values, weights, target = _case(rows, 500, 1, integer_weights)
    whole = jax.jit(_numerics._bracket_rows, static_argnums=3)(values, weights, target, 20)
    monkeypatch.setattr(_numerics, "BRACKET_BLOCK_ELEMENTS", 3 * 500)
    blocked = jax.jit(threshold_bracket, static_argnums=3)(values, weights, target, 20)
    for a, b in zip(blocked, whole):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stacked = [np.stack([x, x[::-1]]) for x in (values, weights, target)]
    batched = jax.jit(jax.vmap(lambda v, w, t: threshold_bracket(v, w, t, 20)))(*stacked)
    for a, b in zip(batched, whole):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b)[::-1])


def test_blocking_counterfactual(monkeypatch):
    """The comparison above can fail: a bracket of fewer iterations differs."""
    values, weights, target = _case(10, 500, 1)
    whole = jax.jit(_numerics._bracket_rows, static_argnums=3)(values, weights, target, 20)
    monkeypatch.setattr(_numerics, "BRACKET_BLOCK_ELEMENTS", 3 * 500)
    fewer = jax.jit(threshold_bracket, static_argnums=3)(values, weights, target, 12)
    assert not np.array_equal(np.asarray(fewer[1]), np.asarray(whole[1]))


def test_top_count_is_exact_with_ties_by_position(monkeypatch):
    monkeypatch.setattr(_numerics, "BRACKET_BLOCK_ELEMENTS", 2 * 200)
    rng = np.random.default_rng(3)
    values = rng.integers(0, 20, size=(7, 200)).astype(np.float32)  # many ties
    present = rng.random((7, 200)) < 0.7
    count = rng.integers(0, 150, size=7).astype(np.int32)
    chosen = np.asarray(jax.jit(top_count, static_argnums=3)(jnp.asarray(values), present,
                                                             count, 20))
    for r in range(7):
        order = [u for u in np.lexsort((np.arange(200), -values[r])) if present[r, u]]
        expect = np.zeros(200, bool)
        expect[order[:count[r]]] = True
        np.testing.assert_array_equal(chosen[r], expect)
