"""Run a per-request phase on the running requests' rows only.

A trace replay keeps R slots (the largest batch) but often runs few requests: the Azure
conversation trace at 64 slots has 3-25 running. The access model and PAM's scheduler are
per-request (no value of one row depends on another row), so their [R, U] work can be done on
the running rows alone: :func:`on_active_rows` gathers them into the smallest bucket of
``row_buckets`` rows that holds them, runs the phase there and writes the rows back. The
bucket is picked by ``lax.switch``, so each bucket compiles once, and the rows a phase does
not run keep the values the caller says the phase gives them (``inactive``).

Every row is computed by the same operations on the same values as on all R rows, so the
schedules are the same: every integer and boolean result (tiers, bank groups, selections,
swaps, counts) and the clock. A float32 value may differ in its last bit (relative 2e-7
measured on the importance EMA), because XLA compiles a phase on fewer rows with different
fusions; as under ``vmap``, and within the tolerance the event leap is held to
(tests/test_active_rows.py checks whole trajectories; ``pamjax bench --sections pam``
compares long replays).
Under ``vmap`` a switch on a batched index runs every branch, so batched rollouts turn the
compaction off (``EngineConfig.skip_idle``, engine.vmapped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MIN_BUCKET = 4
"""Smallest bucket, rows: below it the gather costs more than the rows it saves."""


def row_buckets(num_slots: int) -> tuple[int, ...]:
    """Bucket sizes for R slots: powers of two from MIN_BUCKET below R, then R itself."""
    sizes, size = [], MIN_BUCKET
    while size < num_slots:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (num_slots,)


def on_active_rows(active, phase, rows, inactive):
    """``phase`` on the rows where ``active`` holds; ``inactive`` elsewhere.

    Args:
      active: bool [R], the rows the phase works on.
      phase: a function of a pytree like ``rows`` (leading axis S, any S) returning a
        pytree like ``inactive`` (leading axis S); row i of its output may depend only on
        row i of its input.
      rows: pytree of arrays with leading axis R, the phase's per-row inputs.
      inactive: pytree of arrays with leading axis R, what the phase gives on rows where
        ``active`` is False (it must: when every bucket is too small, the phase runs on all
        rows and its own output is returned).

    Returns:
      pytree like ``inactive``: the phase's rows where active, ``inactive``'s elsewhere.
    """
    num_slots = active.shape[0]
    buckets = row_buckets(num_slots)

    def all_rows(rows, inactive):
        # The phase itself gives ``inactive`` on inactive rows (the caller's contract).
        del inactive
        return phase(rows)

    def bucket(size):
        def compacted(rows, inactive):
            # Active rows first (in row order); the padding rows repeat row 0 and are dropped.
            index = jnp.nonzero(active, size=size, fill_value=num_slots)[0]
            taken = jax.tree.map(lambda x: x[jnp.minimum(index, num_slots - 1)], rows)
            out = phase(taken)
            return jax.tree.map(lambda full, part: full.at[index].set(part, mode="drop"),
                                inactive, out)
        return compacted

    count = jnp.sum(active.astype(jnp.int32))
    which = jnp.searchsorted(jnp.asarray(buckets[:-1]), count, side="left")
    branches = [bucket(size) for size in buckets[:-1]] + [all_rows]
    return lax.switch(which, branches, rows, inactive)
