"""The benchmark's phase breakdown runs engine.step's own phases (bench.step_prefix)."""

import functools

import jax
import numpy as np
import pytest

from pamjax import engine, simulation, systems
from pamjax.errors import ConfigError
from pamjax.studies import bench
from pamjax.workload import synthetic


def test_step_prefix_is_engine_step():
    wl = synthetic("sharegpt", 6, seed=0)
    config = simulation.make_config(wl, 4, page_size=4,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params("pam", "llama3-8b", max_batch=4, page_size=4)
    dev = simulation.device_workload(wl)
    state, _ = engine.rollout_jit(config, params, engine.init_state(config, 1), dev, 5)
    state = jax.device_get(state)
    want_state, want = jax.jit(functools.partial(engine.step, config))(params, state, dev)
    got_state, got = jax.jit(functools.partial(bench.step_prefix, config,
                                               upto=len(bench.PHASES) - 1))(params, state, dev)
    for a, b in zip(jax.tree.leaves((want_state, want)), jax.tree.leaves((got_state, got)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(jax.jit(functools.partial(bench.step_prefix, config, upto=0))(
        params, state, dev)) == 1


def test_unit_table_bytes_counts_every_unit_table_twice():
    config = simulation.make_config(synthetic("sharegpt", 4, seed=0), 4, page_size=1)
    # tier i8 + bank group i16 + latent f32 + importance f32 + selected bool = 12 B/unit.
    assert bench.unit_table_bytes(config) == 2 * 12 * 4 * config.units_per_slot


def test_shortcut_comparison_reports_the_same_schedule_and_a_speed_up():
    out = bench.shortcut_comparison(None, 12, 16, chunks=3, shortcut="skip_idle",
                                    chunk_steps=32)
    assert out["same_schedule"] and out["float_max_relative_difference"] < 1e-6
    assert len(out["chunks"]) == 3 and out["speedup"] > 0
    assert sum(b["chunks"] for b in out["bands"]) == 2  # the first chunk (compiling) is left out
    assert all(r["running"] >= 0 for r in out["chunks"])
    with pytest.raises(ConfigError, match="shortcut"):
        bench.shortcut_comparison(None, 12, 16, chunks=1, shortcut="fast")


def test_bracket_blocking_reports_identical_brackets_and_both_timings():
    out = bench.bracket_blocking(rows=24, units=5000, repeats=2)
    assert out["identical"] and out["speedup"] > 0
    assert 0 < out["blocked_ms"][0] <= out["blocked_ms"][1]
    assert 0 < out["whole_table_ms"][0] <= out["whole_table_ms"][1]
