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

The unit axis is ragged in the same way: U covers the workload's longest request, but most
running requests hold far fewer units (the conversation trace at token granularity: U =
7,979, nine in ten requests end below 2,100 tokens). With :class:`Columns`, the rows whose
units all lie in the first W columns (``EngineConfig.narrow_units``) run the phase on those
W columns alone, the others on all U, each group in its own row bucket. A phase is
width-generic (it reads U from its inputs' shapes) and gives, on a row's columns past its
units, what ``inactive`` holds there: then the columns it does not run are already right.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pamjax.batching import units_needed

MIN_BUCKET = 4
"""Smallest bucket, rows: below it the gather costs more than the rows it saves."""


def row_buckets(num_slots: int) -> tuple[int, ...]:
    """Bucket sizes for R slots: powers of two from MIN_BUCKET below R, then R itself."""
    sizes, size = [], MIN_BUCKET
    while size < num_slots:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (num_slots,)


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where a phase's unit tables may be cut to their first ``width`` columns.

    Fields:
      width: W, static; below the tables' U.
      need: i32 [R], the columns each row's units reach (its unit count, after the step's
        decode): a row with ``need <= width`` runs on the first W columns.
      tables_in, tables_out: pytree prefixes of the phase's ``rows`` and of ``inactive``,
        True on the [R, U] unit tables (cut to W), False on the rest (kept whole).
    """

    width: int
    need: Any
    tables_in: Any
    tables_out: Any


WIDE_BUCKETS = 4
"""Largest row bucket, in rows, for the rows wider than ``Columns.width``: they are few,
and every bucket is one more branch to compile; when more of them run, all rows run."""


def narrow_width(config) -> int | None:
    """W, the narrow columns' width, or None where the config runs every row on all U
    columns (``narrow_units`` off, or not below U)."""
    width = config.narrow_units
    return width if 0 < width < config.units_per_slot else None


def narrow_columns(config, context, tables_in, tables_out) -> Columns | None:
    """The :class:`Columns` of a step's per-request phases, or None where the config runs
    every row on all U columns (:func:`narrow_width`).

    Args:
      config: EngineConfig (``narrow_units``, ``units_per_slot``, ``page_size``);
      context: i32 [R] tokens per slot after the step's decode;
      tables_in, tables_out: as :class:`Columns`.
    """
    width = narrow_width(config)
    if width is None:
        return None
    return Columns(width=width, need=units_needed(context, config.page_size),
                   tables_in=tables_in, tables_out=tables_out)


def on_active_rows(active, phase, rows, inactive, columns: Columns | None = None,
                   largest_bucket: int | None = None):
    """``phase`` on the rows where ``active`` holds; ``inactive`` elsewhere.

    Args:
      active: bool [R], the rows the phase works on.
      phase: a function of a pytree like ``rows`` (leading axis S, any S) returning a
        pytree like ``inactive`` (leading axis S); row i of its output may depend only on
        row i of its input, or also on the rows before it where an inactive row changes
        nothing for the rows after it (the active rows are taken in row order, padded with
        copies of an inactive row). With ``columns`` it must also take unit tables of any
        width and give ``inactive``'s values on a row's columns past its ``need`` (and its
        rows may not depend on each other: the narrow and the wide rows run apart).
      rows: pytree of arrays with leading axis R, the phase's per-row inputs.
      inactive: pytree of arrays with leading axis R, what the phase gives on rows where
        ``active`` is False (it must: when every bucket is too small, the phase runs on all
        rows and its own output is returned).
      columns: None (every row on all columns), or the narrow columns (:class:`Columns`).
      largest_bucket: None (every bucket of row_buckets), or the largest bucket, in rows,
        before all rows (without ``columns``): each bucket compiles the phase once more.

    Returns:
      pytree like ``inactive``: the phase's rows where active, ``inactive``'s elsewhere.
    """
    if columns is None:
        return _on_rows(active, phase, rows, inactive, largest_bucket)
    fits = active & (columns.need <= columns.width)

    def cut(tree, tables):
        return jax.tree.map(lambda table, x: _cut(x, columns.width) if table else x,
                            tables, tree)

    narrow = _on_rows(fits, phase, cut(rows, columns.tables_in),
                      cut(inactive, columns.tables_out))
    # The narrow rows' results over ``inactive``'s columns past W (the phase's own values
    # there, by its contract), then the wide rows on all columns.
    inactive = jax.tree.map(
        lambda table, full, part: _paste(full, part, columns.width) if table else part,
        columns.tables_out, inactive, narrow)
    return _on_rows(active & ~fits, phase, rows, inactive, WIDE_BUCKETS)


def _cut(tables, width: int):
    """The first ``width`` columns of every [R, U] leaf of ``tables``."""
    return jax.tree.map(lambda x: x[:, :width], tables)


def _paste(full, part, width: int):
    """``full`` ([R, U] leaves) with its first ``width`` columns replaced by ``part``'s."""
    return jax.tree.map(lambda f, p: f.at[:, :width].set(p), full, part)


def _on_rows(active, phase, rows, inactive, largest_bucket: int | None = None):
    """:func:`on_active_rows` on all columns: the active rows gathered into the smallest
    bucket that holds them (none when no row is active; buckets up to ``largest_bucket``
    rows, then all rows)."""
    num_slots = active.shape[0]
    buckets = row_buckets(num_slots)
    if largest_bucket is not None:
        buckets = tuple(b for b in buckets[:-1] if b <= largest_bucket) + (num_slots,)

    def no_rows(rows, inactive):
        del rows
        return inactive

    def all_rows(rows, inactive):
        # The phase itself gives ``inactive`` on inactive rows (the caller's contract).
        del inactive
        return phase(rows)

    def bucket(size):
        def compacted(rows, inactive):
            # Active rows first, in row order; the padding rows repeat an inactive row (one
            # exists: a bucket is smaller than R) and are dropped.
            index = jnp.nonzero(active, size=size, fill_value=num_slots)[0]
            source = jnp.where(index < num_slots, index, jnp.argmin(active))
            taken = jax.tree.map(lambda x: x[source], rows)
            out = phase(taken)
            return jax.tree.map(lambda full, part: full.at[index].set(part, mode="drop"),
                                inactive, out)
        return compacted

    count = jnp.sum(active.astype(jnp.int32))
    # 0 rows: branch 0; up to the k-th bucket's size: branch k + 1; more: all rows.
    which = jnp.where(count == 0, 0,
                      1 + jnp.searchsorted(jnp.asarray(buckets[:-1]), count, side="left"))
    branches = [no_rows] + [bucket(size) for size in buckets[:-1]] + [all_rows]
    return lax.switch(which, branches, rows, inactive)
