"""Numerical building blocks shared by the engine, the leap and the access model.

* Counter-based random numbers: an integer hash of (seed, request, unit, salt) and two
  normal variates drawn from it, cheap per element and independent of slot assignment.
* Bisection selection: per-row thresholds by fixed-iteration bisection (no sort: XLA's CPU
  sort costs ~150 ns per element) and an exact top-count built on it.
* Exact integer sums: counts reduced in float32 where a static bound keeps them exact.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax

from pamjax.types import NUM_TIERS

# ---------------------------------------------------------------------------------------------
# Counter-based random numbers
# ---------------------------------------------------------------------------------------------

def _mix(x):
    """lowbias32 integer hash (uint32 -> uint32), a good avalanche for counters."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def unit_hash(seed, request, unit, salt):
    """uint32 hash of (seed, request id, unit index, salt), broadcasting.

    Args:
      seed: int scalar; request: int32 request ids; unit: int32 unit indices; salt: int32
        (0 for the initial draw, step + 1 for the innovation of a step). Any shapes that
        broadcast, e.g. request [R, 1] and unit [U].

    Returns:
      uint32 array of the broadcast shape.
    """
    h = _mix(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32(0x9E3779B9))
    h = _mix(h ^ jnp.asarray(request, jnp.int32).astype(jnp.uint32))
    h = _mix(h ^ (jnp.asarray(unit, jnp.int32).astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))
    return _mix(h ^ (jnp.asarray(salt, jnp.int32).astype(jnp.uint32) * jnp.uint32(0xC2B2AE35)))


def normal_from_hash(h):
    """Standard normal via Box-Muller from one uint32 hash (two 16-bit uniforms).

    Args:
      h: uint32 array, any shape.

    Returns:
      float32 array of the same shape, approximately N(0, 1).
    """
    u1 = ((h >> 16).astype(jnp.float32) + 0.5) / 65536.0
    u2 = ((h & jnp.uint32(0xFFFF)).astype(jnp.float32) + 0.5) / 65536.0
    return jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)


def small_normal_from_hash(h):
    """Approximately standard normal (Irwin-Hall sum of the hash's 4 bytes), for innovations.

    Four byte-uniforms have variance 4 * (256^2 - 1) / 12; cheaper than Box-Muller and
    exact in the first two moments, which is all an AR(1) innovation needs.

    Args:
      h: uint32 array, any shape.

    Returns:
      float32 array of the same shape, mean 0 and variance 1.
    """
    total = ((h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24)).astype(jnp.float32)
    return (total - 510.0) / np.float32(np.sqrt(4 * (256.0**2 - 1) / 12))


# ---------------------------------------------------------------------------------------------
# Bisection selection
# ---------------------------------------------------------------------------------------------

BRACKET_BLOCK_ELEMENTS = 1 << 16
"""Elements (rows x units) of the row block threshold_bracket bisects at a time: 64K
float32 values and weights are 512 KiB, inside a core's L2 cache, so the 20 masked sums
re-read the block from L2 instead of streaming the whole [R, U] table from L3 20 times
(2.8-3.7x faster at [64, 7,979] on this 2-core Xeon, experiments/README.md)."""


def threshold_bracket(values, weights, target, iters: int):
    """Per-row bracket (lo, hi) with sum(w[v >= lo]) >= target > sum(w[v >= hi]).

    A fixed-iteration bisection: no sort (XLA's CPU sort costs ~150 ns per element), so each
    iteration is one masked sum over [R, U]. Rows whose total weight is below ``target``
    keep the lowest ``lo`` (everything counts). Rows are bisected in blocks of
    BRACKET_BLOCK_ELEMENTS; under vmap the batch axes join the rows first, so the blocks
    stay that small however many configurations run (each row's arithmetic is the same
    whatever its block: the same results, bit for bit).

    Args:
      values: f32 [R, U]; weights: f32 [R, U], 0 where a unit does not count;
      target: f32 [R]; iters: bisection iterations (bracket width = span / 2**iters).

    Returns:
      (lo, hi) f32 [R] each.
    """
    return _row_blocked_bracket(iters)(values, weights, target)


@functools.cache
def _row_blocked_bracket(iters: int):
    """threshold_bracket for ``iters`` iterations, with its vmap rule (custom_vmap; the
    bisection has no gradient to carry, and custom_vmap allows none)."""

    @custom_batching.custom_vmap
    def bracket(values, weights, target):
        rows, units = values.shape
        block = min(rows, max(1, BRACKET_BLOCK_ELEMENTS // max(units, 1)))
        if block == rows:
            return _bracket_rows(values, weights, target, iters)
        blocks = -(-rows // block)
        pad = blocks * block - rows

        def in_blocks(x):  # [R, ...] -> [blocks, block, ...]; padded rows have no weight
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x
            return x.reshape(blocks, block, *x.shape[1:])

        lo, hi = lax.map(lambda b: _bracket_rows(*b, iters),
                         (in_blocks(values), in_blocks(weights), in_blocks(target)))
        return lo.reshape(-1)[:rows], hi.reshape(-1)[:rows]

    @bracket.def_vmap
    def batched(axis_size, in_batched, values, weights, target):
        # [B, R, U] -> [B * R, U]: the batch's rows are more rows (nested vmaps recurse).
        values, weights, target = (x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
                                   for x, b in zip((values, weights, target), in_batched))
        rows, units = values.shape[1:]
        lo, hi = bracket(values.reshape(-1, units), weights.reshape(-1, units),
                         target.reshape(-1))
        return (lo.reshape(axis_size, rows), hi.reshape(axis_size, rows)), (True, True)

    return bracket


def _bracket_rows(values, weights, target, iters: int):
    """threshold_bracket on one block of rows."""
    present = weights > 0
    lo = jnp.min(jnp.where(present, values, jnp.inf), axis=-1) - 1.0
    hi = jnp.max(jnp.where(present, values, -jnp.inf), axis=-1) + 1.0
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    hi = jnp.where(jnp.isfinite(hi), hi, 1.0)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        covered = jnp.sum(jnp.where(values >= mid[:, None], weights, 0.0), axis=-1)
        ok = covered >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    # Unrolled: the iterations are tiny, and a rolled loop pays per-iteration thunk overhead.
    return lax.fori_loop(0, iters, body, (lo, hi), unroll=True)


def top_count(values, present, count, iters: int):
    """Exactly ``count`` present units per row with the highest values, ties by position.

    Units at or above the bracket's upper end are taken; the units inside the bracket (equal
    or nearly equal values) are taken in position order until ``count`` is reached.

    Args:
      values: f32 [R, U]; present: bool [R, U]; count: i32 [R] (clipped to the present
        count); iters: bisection iterations.

    Returns:
      bool [R, U].
    """
    lo, hi = threshold_bracket(values, present.astype(jnp.float32),
                               count.astype(jnp.float32), iters)
    sure = present & (values >= hi[:, None])
    band = present & ~sure & (values >= lo[:, None])
    missing = count - sure.sum(-1)
    band_rank = jnp.cumsum(band, axis=-1) - 1
    return sure | (band & (band_rank < missing[:, None]))


# ---------------------------------------------------------------------------------------------
# Exact integer sums
# ---------------------------------------------------------------------------------------------

F32_EXACT_TOTAL = 1 << 24
"""Sums of non-negative integers below this are exact in float32 in any order."""


def integer_sum(x, max_total: int | None = None):
    """Sum of a non-negative integer (or boolean) array, i32 [].

    XLA:CPU reduces float32 about twice as fast as int32 over large arrays, so when
    ``max_total`` (a static bound on the sum) is below F32_EXACT_TOTAL, every partial sum is
    an integer float32 holds exactly and the float32 reduction gives the same result.
    """
    if max_total is not None and max_total < F32_EXACT_TOTAL:
        return jnp.sum(x, dtype=jnp.float32).astype(jnp.int32)
    return jnp.sum(x, dtype=jnp.int32)


def tier_units(tier):
    """Units per tier, i32 [T], from a tier table of any shape (its size bounds each count,
    see integer_sum)."""
    return jnp.stack([integer_sum(tier == t, tier.size) for t in range(NUM_TIERS)])

