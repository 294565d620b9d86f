"""The retrieval selector (locality.select) against a plain sort-based numpy selector.

The reference orders each request's units by logit (highest first, ties by position) and
takes them while the tokens taken before a unit are below the target
``max(ceil(select_fraction x tokens), 1)``. Logits are drawn from a few integer levels, so
ties are common and both of select's paths run: the band of tied units fitting the target
whole, and the position-order prefix sum when it does not.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

from pamjax import locality, systems
from pamjax.types import EngineConfig

ROWS, UNITS = 3, 24
ITERS = EngineConfig(num_slots=1, units_per_slot=1).bisection_iters


def reference_select(logits, tokens, fraction):
    chosen = np.zeros(tokens.shape, bool)
    for r in range(tokens.shape[0]):
        present = tokens[r] > 0
        if fraction >= 1.0:
            chosen[r] = present
            continue
        target = max(np.ceil(np.float32(fraction) * np.float32(tokens[r].sum())), 1.0)
        order = sorted(np.flatnonzero(present), key=lambda u: (-logits[r, u], u))
        taken = 0
        for u in order:
            if taken >= target:
                break
            chosen[r, u] = True
            taken += tokens[r, u]
    return chosen


_select = jax.jit(locality.select, static_argnums=3)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fraction=st.sampled_from([0.125, 0.3, 0.5, 1.0]),
       levels=st.integers(1, 4))
def test_select_matches_a_sorting_reference(seed, fraction, levels):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 5, (ROWS, UNITS)).astype(np.int32)
    tokens[rng.random((ROWS, UNITS)) < 0.2] = 0
    logits = rng.integers(0, levels, (ROWS, UNITS)).astype(np.float32)
    params = systems.make_params("ls-pim", "llama3-8b").replace(
        select_fraction=jnp.float32(fraction))
    got = np.asarray(_select(params, jnp.asarray(logits), jnp.asarray(tokens), ITERS))
    np.testing.assert_array_equal(got, reference_select(logits, tokens, fraction))
