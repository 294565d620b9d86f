"""Tests of pamjax.attention against independent references.

References: a plain-NumPy float64 softmax (GQA by repeating KV heads) and
``jax.nn.dot_product_attention`` (float32, one query token, mask from ``valid``). Reduced-precision
cases compare against the float64 reference evaluated on the same rounded inputs.

Tolerances, ``|out − ref| ≤ atol + rtol·|ref|`` elementwise:
  float32:  atol 2e-6, rtol 2e-6  (float32 accumulation error only);
  bfloat16: atol 1e-5, rtol 2^-8  (half a bfloat16 ulp: the output's own rounding);
  float16:  atol 1e-5, rtol 2^-11 (half a float16 ulp).
Merge property tests with logits scaled by 30 widen the float32 tolerance by the same factor
(float32 logits of size |s| carry an error ~|s|·2^-24); the ±1e4-logit test uses logits that
are exact in float32 and keeps the table above.

``measure_worst_error()`` prints the worst absolute error per dtype over a fixed-seed batch
(``pytest -s tests/test_attention.py -k worst``).
"""

from __future__ import annotations

import dataclasses

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from pamjax.attention import (
    Partial,
    empty_partial,
    finalize,
    flash_decoding_attention,
    local_attention,
    merge_partials,
    pam_attention,
)
from pamjax.errors import ConfigError

TOLERANCE = {"float32": (2e-6, 2e-6), "bfloat16": (1e-5, 2.0**-8), "float16": (1e-5, 2.0**-11)}
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
PROPERTY = settings(max_examples=30, deadline=None, database=None)
SHAPES = settings(max_examples=10, deadline=None, database=None)
pam_jit = jax.jit(pam_attention, static_argnames=("num_tiers", "blocks_per_tier", "mesh"))
flash_jit = jax.jit(flash_decoding_attention, static_argnames=("num_splits",))
local_per_mask = jax.jit(jax.vmap(local_attention, in_axes=(None, None, None, 0)))
merge = jax.jit(merge_partials, static_argnames=("axis",))


def reference_attention(q, k, v, valid):
    """Float64 softmax attention; ``q [B, Hq, D]``, ``k, v [B, N, Hkv, D]``, ``valid [B, N]``.

    Rows with no valid token give zeros.
    """
    q, k, v = (np.asarray(x).astype(np.float64) for x in (q, k, v))
    valid = np.asarray(valid, bool)
    group = q.shape[1] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bhd,bnhd->bhn", q, k) / np.sqrt(q.shape[-1])
    s = np.where(valid[:, None, :], s, -np.inf)
    top = s.max(-1, keepdims=True, initial=-np.inf)
    p = np.exp(s - np.where(np.isfinite(top), top, 0.0))
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bhn,bnhd->bhd", p, v)
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), 0.0)


@jax.jit
def jax_reference(q, k, v, valid):
    """``jax.nn.dot_product_attention`` in float32 with one query token and a key mask."""
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    mask = jnp.asarray(valid)[:, None, None, :]
    return jax.nn.dot_product_attention(q[:, None], k, v, mask=mask)[:, 0]


def dtype_name(dtype):
    return jnp.dtype(dtype).name


def assert_close(out, ref, dtype):
    atol, rtol = TOLERANCE[dtype_name(dtype)]
    out = np.asarray(out).astype(np.float64)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=atol, rtol=rtol)


def make_case(
    seed,
    *,
    b=2,
    n=64,
    hkv=2,
    group=4,
    d=16,
    num_tiers=3,
    density=0.7,
    tiers=None,
    dtype=jnp.float32,
):
    """Random q, k, v (rounded to ``dtype``), tier and valid arrays."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, hkv * group, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, n, hkv, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, n, hkv, d)), dtype)
    tier = rng.choice(np.arange(num_tiers) if tiers is None else np.asarray(tiers), size=(b, n))
    valid = rng.random((b, n)) < density
    return q, k, v, jnp.asarray(tier, jnp.int32), jnp.asarray(valid)


def check_exact(q, k, v, tier, valid, *, num_tiers, blocks_per_tier=4, num_splits=8):
    """pam_attention and flash_decoding_attention against both references."""
    dtype = q.dtype
    ref = reference_attention(q, k, v, valid)
    pam = pam_jit(q, k, v, tier, num_tiers=num_tiers, valid=valid, blocks_per_tier=blocks_per_tier)
    flash = flash_jit(q, k, v, valid, num_splits=num_splits)
    assert pam.dtype == q.dtype and pam.shape == q.shape
    assert flash.dtype == q.dtype and flash.shape == q.shape
    assert_close(pam, ref, dtype)
    assert_close(flash, ref, dtype)
    rows = np.asarray(valid).any(-1)
    if dtype == jnp.float32 and rows.any():
        jref = np.asarray(jax_reference(q, k, v, valid))[rows]
        np.testing.assert_allclose(np.asarray(pam)[rows], jref, atol=2e-6, rtol=2e-6)
        np.testing.assert_allclose(np.asarray(flash)[rows], jref, atol=2e-6, rtol=2e-6)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("group", "num_tiers"), [(1, 1), (1, 4), (4, 1), (4, 2), (4, 4), (8, 3), (8, 4)]
)
def test_pam_attention_exact_mha_and_gqa(group, num_tiers):
    q, k, v, tier, valid = make_case(10 * group + num_tiers, group=group, num_tiers=num_tiers)
    check_exact(q, k, v, tier, valid, num_tiers=num_tiers)


@SHAPES
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 2),
    n=st.integers(1, 40),
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 4, 8]),
    d=st.sampled_from([4, 8, 16]),
    num_tiers=st.integers(1, 4),
    blocks_per_tier=st.integers(1, 5),
    num_splits=st.integers(1, 9),
    density=st.sampled_from([1.0, 0.5, 0.05]),
)
def test_pam_attention_exact_random_shapes(
    seed, b, n, hkv, group, d, num_tiers, blocks_per_tier, num_splits, density
):
    tiers = np.random.default_rng(seed).choice(num_tiers, size=num_tiers, replace=True)
    q, k, v, tier, valid = make_case(
        seed, b=b, n=n, hkv=hkv, group=group, d=d, num_tiers=num_tiers, density=density, tiers=tiers
    )
    check_exact(
        q,
        k,
        v,
        tier,
        valid,
        num_tiers=num_tiers,
        blocks_per_tier=blocks_per_tier,
        num_splits=num_splits,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("group", [1, 8])
def test_reduced_precision_inputs(dtype, group):
    q, k, v, tier, valid = make_case(
        7 + group, b=3, n=96, hkv=1, group=group, d=32, num_tiers=4, dtype=dtype
    )
    check_exact(q, k, v, tier, valid, num_tiers=4)


def test_tiers_without_tokens():
    q, k, v, tier, valid = make_case(3, num_tiers=4, tiers=[1, 3])
    check_exact(q, k, v, tier, valid, num_tiers=4)
    check_exact(q, k, v, jnp.zeros_like(tier), valid, num_tiers=4, blocks_per_tier=8)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_heavily_masked(dtype):
    q, k, v, tier, _ = make_case(5, b=3, n=512, num_tiers=3, dtype=dtype)
    valid = np.zeros((3, 512), bool)
    valid[0, 137] = True  # one valid token of 512: the output is that token's value
    valid[2, [3, 500]] = True  # row 1 has no valid token: zeros, not NaN
    valid = jnp.asarray(valid)
    check_exact(q, k, v, tier, valid, num_tiers=3)
    out = np.asarray(pam_jit(q, k, v, tier, num_tiers=3, valid=valid))
    np.testing.assert_array_equal(out[1], 0.0)
    group = q.shape[1] // k.shape[2]
    expected = np.repeat(np.asarray(v[0, 137]), group, axis=0)
    np.testing.assert_array_equal(out[0], expected)


def large_logit_case(dtype):
    """Inputs whose logits are exactly representable, about ±1.02e4 and spread by O(1).

    With D = 16 the scale 1/4 is exact; a first component of 64·640/4 = 10240 (sign per head)
    plus quarter-integers in the other components keep every product and partial sum exact in
    float32, so the test measures the softmax, not the rounding of q·k.
    """
    rng = np.random.default_rng(11)
    b, n, hkv, hq, d = 2, 48, 2, 8, 16
    q = rng.integers(-8, 9, size=(b, hq, d)) / 4
    q[..., 0] = 64 * rng.choice([-1, 1], size=(b, hq))
    k = rng.integers(-8, 9, size=(b, n, hkv, d)) / 4
    k[..., 0] = 640
    v = rng.normal(size=(b, n, hkv, d))
    valid = rng.random((b, n)) < 0.8
    tier = rng.integers(0, 3, size=(b, n))
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k, dtype),
        jnp.asarray(v, dtype),
        jnp.asarray(tier, jnp.int32),
        jnp.asarray(valid),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
def test_large_logits_do_not_overflow(dtype):
    q, k, v, tier, valid = large_logit_case(dtype)
    logits = (
        np.einsum(
            "bhd,bnhd->bhn",
            np.asarray(q, np.float64),
            np.repeat(np.asarray(k, np.float64), 4, axis=2),
        )
        / 4
    )
    assert np.abs(logits).min() > 1e4  # exp() of these overflows/underflows in float32
    check_exact(q, k, v, tier, valid, num_tiers=3)


def test_tokens_outside_every_tier_are_not_attended():
    q, k, v, tier, valid = make_case(9, num_tiers=5)
    out = pam_jit(q, k, v, tier, num_tiers=3, valid=valid)
    assert_close(out, reference_attention(q, k, v, valid & (tier < 3)), jnp.float32)


# --------------------------------------------------------------------------- worst error


def measure_worst_error(seeds=range(8)):
    """Worst absolute error per dtype of both attention paths vs the float64 reference.

    Each seed draws a random GQA/MHA case (B=4, N=200, D=64, 3 tiers, 60% of tokens attended);
    inputs are rounded to the dtype and the reference uses the rounded inputs. Alongside, the
    error of merely rounding the float64 answer to the dtype (the unavoidable floor).

    Returns:
      ``{dtype name: (worst error of pam_attention, of flash_decoding_attention, floor)}``.
    """
    worst = {}
    for dtype in DTYPES:
        errors = np.zeros(3)
        for seed in seeds:
            q, k, v, tier, valid = make_case(
                seed,
                b=4,
                n=200,
                hkv=2,
                group=1 + 3 * (seed % 2),
                d=64,
                num_tiers=3,
                density=0.6,
                dtype=dtype,
            )
            ref = reference_attention(q, k, v, valid)
            outs = (
                pam_jit(q, k, v, tier, num_tiers=3, valid=valid),
                flash_jit(q, k, v, valid),
                jnp.asarray(ref, dtype),
            )
            errs = [np.abs(np.asarray(o).astype(np.float64) - ref).max() for o in outs]
            errors = np.maximum(errors, errs)
        worst[dtype_name(dtype)] = tuple(float(e) for e in errors)
    return worst


def test_worst_error_per_dtype():
    worst = measure_worst_error()
    print("\nworst |out - float64 reference| over 8 seeded cases")
    print(f"{'dtype':>9} {'pam':>10} {'flash':>10} {'rounding':>10}")
    for name, (pam, flash, floor) in worst.items():
        print(f"{name:>9} {pam:10.3e} {flash:10.3e} {floor:10.3e}")
    assert worst["float32"][0] < 1e-5 and worst["float32"][1] < 1e-5
    for name in ("bfloat16", "float16"):
        pam, flash, floor = worst[name]
        assert pam <= 2 * floor and flash <= 2 * floor  # at the output's rounding level


# --------------------------------------------------------------------------- partials


def random_partials(seed, parts, *, n=24, hkv=2, group=2, d=8, scale=1.0, empty_prob=0.2):
    """``parts`` partials of random disjoint token subsets, stacked on axis 0, plus the data."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(hkv * group, d)) * scale
    k = rng.normal(size=(n, hkv, d))
    v = rng.normal(size=(n, hkv, d))
    label = rng.integers(0, parts, size=n)
    label[rng.random(n) < empty_prob] = -1  # tokens nobody attends
    masks = label[None, :] == np.arange(parts)[:, None]
    stacked = local_per_mask(q, k, v, masks)
    return stacked, (q, k, v, label >= 0)


def take(partial, index):
    return jax.tree.map(lambda x: x[index], partial)


def stack(*partials):
    return jax.tree.map(lambda *x: jnp.stack(x), *partials)


def assert_same_partial(a, b, rtol=2e-6):
    np.testing.assert_array_equal(a.m, b.m)  # max is exact, whatever the order
    np.testing.assert_allclose(a.l, b.l, rtol=rtol, atol=0)
    np.testing.assert_allclose(a.o, b.o, rtol=rtol, atol=1e-6)


def test_local_attention_matches_reference():
    stacked, (q, k, v, valid) = random_partials(0, 1, empty_prob=0.3)
    out = finalize(take(stacked, 0))
    ref = reference_attention(q[None], k[None], v[None], valid[None])[0]
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-6)


def test_local_attention_under_vmap():
    q, k, v, _, valid = make_case(1, b=3, n=20, num_tiers=1, density=0.5)
    batched = jax.jit(jax.vmap(local_attention))(q, k, v, valid)
    single_jit = jax.jit(local_attention)
    for i in range(3):
        single = single_jit(q[i], k[i], v[i], valid[i])
        assert_same_partial(take(batched, i), single)


@pytest.mark.parametrize("n", [0, 5])
def test_empty_block_is_identity(n):
    rng = np.random.default_rng(n)
    k = jnp.asarray(rng.normal(size=(n, 2, 4)), jnp.bfloat16)
    partial = local_attention(jnp.ones((4, 4), jnp.bfloat16), k, k, jnp.zeros(n, bool))
    identity = empty_partial(4, 4)
    for field in ("o", "m", "l"):
        np.testing.assert_array_equal(getattr(partial, field), getattr(identity, field))
        assert getattr(partial, field).dtype == jnp.float32
    np.testing.assert_array_equal(finalize(partial), 0.0)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), parts=st.integers(1, 6), scale=st.sampled_from([1.0, 30.0]))
def test_merge_of_any_split_equals_attention_over_union(seed, parts, scale):
    stacked, (q, k, v, valid) = random_partials(seed, parts, scale=scale)
    merged = merge(stacked, axis=0)
    union = local_attention(q, k, v, valid)
    assert_same_partial(merged, union, rtol=1e-5)
    ref = reference_attention(q[None], k[None], v[None], valid[None])[0]
    # float32 logits of size |s| carry an absolute error ~|s|·2^-24, which the softmax turns
    # into a relative error of the same size: the tolerance grows with the logit scale.
    tol = 2e-6 * scale
    np.testing.assert_allclose(finalize(merged), ref, atol=tol, rtol=tol)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 30.0]))
def test_merge_is_associative(seed, scale):
    stacked, _ = random_partials(seed, 3, scale=scale, empty_prob=0.4)
    a, b, c = (take(stacked, i) for i in range(3))
    left = merge(stack(merge(stack(a, b), 0), c), 0)
    right = merge(stack(a, merge(stack(b, c), 0)), 0)
    # exp(m_a − m_ab)·exp(m_ab − m) vs exp(m_a − m): logit-sized rounding, as in the split test.
    assert_same_partial(left, right, rtol=2e-6 * scale)
    assert_same_partial(left, merge(stacked, 0), rtol=2e-6 * scale)


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), parts=st.integers(2, 6), data=st.data())
def test_merge_is_commutative(seed, parts, data):
    stacked, _ = random_partials(seed, parts, empty_prob=0.4)
    order = data.draw(st.permutations(range(parts)))
    assert_same_partial(merge(take(stacked, np.asarray(order)), 0), merge(stacked, 0))


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), parts=st.integers(1, 4), data=st.data())
def test_identity_element(seed, parts, data):
    stacked, _ = random_partials(seed, parts)
    where = data.draw(st.integers(0, parts))
    extra = data.draw(st.integers(1, 3))
    identity = empty_partial(4, 8, (extra,))
    padded = jax.tree.map(
        lambda x, e: jnp.concatenate([x[:where], e, x[where:]]), stacked, identity
    )
    merged, expected = merge(padded, 0), merge(stacked, 0)
    for field in ("o", "m", "l"):  # identities contribute exactly nothing
        np.testing.assert_array_equal(getattr(merged, field), getattr(expected, field))


def test_all_empty_merge_is_identity_without_nan():
    merged = merge_partials(empty_partial(3, 5, (4, 2)), axis=1)
    assert merged.o.shape == (4, 3, 5) and merged.m.shape == (4, 3)
    np.testing.assert_array_equal(merged.m, -np.inf)
    np.testing.assert_array_equal(merged.l, 0.0)
    np.testing.assert_array_equal(merged.o, 0.0)
    np.testing.assert_array_equal(finalize(merged), 0.0)


def test_merge_axis_counts_on_m_axes():
    stacked, _ = random_partials(4, 6)
    grid = jax.tree.map(lambda x: x.reshape(2, 3, *x.shape[1:]), stacked)
    by_rows = merge(merge(grid, axis=1), axis=0)
    by_cols = merge(merge(grid, axis=-3), axis=-2)
    assert_same_partial(by_rows, by_cols)
    assert_same_partial(by_rows, merge(stacked, 0))
    with pytest.raises(ConfigError):
        merge_partials(grid, axis=3)


def test_partial_is_a_frozen_pytree():
    partial = empty_partial(2, 3)
    assert isinstance(partial, Partial)
    assert len(jax.tree.leaves(partial)) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        partial.m = jnp.zeros(2)


# --------------------------------------------------------------------------- compilation


def test_pam_attention_compiles_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def attend(q, k, v, tier, valid):
        return pam_attention(q, k, v, tier, num_tiers=3, valid=valid, blocks_per_tier=2)

    for seed in (0, 1):
        q, k, v, tier, valid = make_case(seed, num_tiers=3)
        assert_close(attend(q, k, v, tier, valid), reference_attention(q, k, v, valid), jnp.float32)


def test_flash_decoding_compiles_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def attend(q, k, v, valid):
        return flash_decoding_attention(q, k, v, valid, num_splits=5)

    for seed in (2, 3):
        q, k, v, _, valid = make_case(seed, n=37)
        assert_close(attend(q, k, v, valid), reference_attention(q, k, v, valid), jnp.float32)


# --------------------------------------------------------------------------- errors


BAD_CALLS = {
    "num_tiers zero": lambda q, k, v, t, ok: pam_attention(q, k, v, t, num_tiers=0),
    "num_tiers float": lambda q, k, v, t, ok: pam_attention(q, k, v, t, num_tiers=2.0),
    "blocks_per_tier": lambda q, k, v, t, ok: pam_attention(
        q, k, v, t, num_tiers=3, blocks_per_tier=0
    ),
    "hq not multiple of hkv": lambda q, k, v, t, ok: pam_attention(q[:, :3], k, v, t, num_tiers=3),
    "v shape": lambda q, k, v, t, ok: pam_attention(q, k, v[:, :7], t, num_tiers=3),
    "batch": lambda q, k, v, t, ok: pam_attention(q[:1], k, v, t, num_tiers=3),
    "head dim": lambda q, k, v, t, ok: pam_attention(q[..., :3], k, v, t, num_tiers=3),
    "q rank": lambda q, k, v, t, ok: pam_attention(q[0], k, v, t, num_tiers=3),
    "tier shape": lambda q, k, v, t, ok: pam_attention(q, k, v, t[:, :7], num_tiers=3),
    "tier dtype": lambda q, k, v, t, ok: pam_attention(q, k, v, t.astype(float), num_tiers=3),
    "valid shape": lambda q, k, v, t, ok: pam_attention(q, k, v, t, num_tiers=3, valid=ok[0]),
    "valid dtype": lambda q, k, v, t, ok: pam_attention(q, k, v, t, num_tiers=3, valid=ok * 1),
    "num_splits": lambda q, k, v, t, ok: flash_decoding_attention(q, k, v, num_splits=0),
    "flash gqa": lambda q, k, v, t, ok: flash_decoding_attention(q[:, :3], k, v),
    "local valid": lambda q, k, v, t, ok: local_attention(q[0], k[0], v[0], ok[0, :5]),
    "local gqa": lambda q, k, v, t, ok: local_attention(q[0, :3], k[0], v[0], ok[0]),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_config_errors(name):
    with pytest.raises(ConfigError):
        BAD_CALLS[name](*make_case(0, b=2, n=8, hkv=2, group=2, d=4))
