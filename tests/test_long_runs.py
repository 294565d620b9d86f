"""Bounded-memory runs: running statistics against the full timeline, the quantile sketch."""

from __future__ import annotations

import numpy as np
import pytest

from pamjax import metrics, simulation
from pamjax.simulation import simulate
from pamjax.workload import synthetic


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_running_stats_equal_the_full_timeline():
    wl = synthetic("sharegpt", 12, seed=4, rate_per_s=40.0)
    # Small chunks: the statistics are folded over many chunks.
    kept = simulate("pam", "llama3-8b", wl, max_batch=4, chunk_steps=16, timeline=True)
    dropped = simulate("pam", "llama3-8b", wl, max_batch=4, chunk_steps=16, timeline=False)
    assert dropped.metrics is None and kept.metrics is not None
    assert kept.stats.steps == kept.metrics.step_time_s.shape[0] > 3 * 16
    full = metrics.summarize(wl, kept.state, kept.metrics, kept.summary["wall_seconds"])
    a, b, c = _flatten(kept.summary), _flatten(dropped.summary), _flatten(full)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        if key == "wall_seconds":
            continue
        assert a[key] == b[key], key  # the same fold whether or not the timeline is kept
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(c[key], rel=1e-12, abs=1e-300, nan_ok=True), key
        else:
            assert a[key] == c[key], key
    assert kept.summary["requests_finished"] == wl.num_requests

    # The bounded-memory summary against numpy on the full timeline (not through the fold).
    m, got = kept.metrics, dropped.summary
    step_time = np.asarray(m.step_time_s, np.float64)
    busy = step_time > 0
    tokens = int(np.sum(m.output_tokens))
    clock = float(kept.state.clock_whole) + float(kept.state.clock_frac)
    # The clock's fraction is float32 in [0, 1): each of a step's two additions rounds by at
    # most half an ulp of 1 (2**-24).
    assert clock == pytest.approx(np.sum(step_time) + np.sum(m.idle_s, dtype=np.float64),
                                  rel=0, abs=len(step_time) * 2**-24)
    assert got["output_tokens"] == tokens
    assert got["throughput_tokens_per_s"] == pytest.approx(tokens / clock, rel=1e-12)
    assert got["decode_steps"] == int(np.sum(busy & (np.asarray(m.decode_requests) > 0)))
    assert got["step_time_ms"]["mean"] == pytest.approx(1e3 * step_time[busy].mean(),
                                                        rel=1e-12)
    energy_j = np.sum(np.asarray(m.energy_pj, np.float64)) * 1e-12
    assert got["energy_j_per_token"] == pytest.approx(energy_j / tokens, rel=1e-12)
    held = np.sum(np.asarray(m.tier_units, np.float64) * step_time[:, None], axis=0)
    assert list(got["tier_token_share"].values()) == pytest.approx(held / held.sum(),
                                                                   rel=1e-12, abs=1e-15)
    # Quantiles: within the sketch's stated error of the exact order statistic.
    for q in (50, 99):
        exact = np.percentile(step_time[busy], q, method="inverted_cdf") * 1e3
        assert abs(got["step_time_ms"][f"p{q}"] / exact - 1) <= \
            metrics.HIST_RELATIVE_ERROR * (1 + 1e-9)
    assert got["step_time_ms"]["max"] == pytest.approx(step_time[busy].max() * 1e3,
                                                       rel=1e-12)


def test_quantile_sketch_error_bound():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(np.log(0.02), 2.0, size=20_000))  # 20 ms, spread over decades
    stats = metrics.RunningStats()
    for part in np.array_split(values, 7):
        stats.step_time_hist += np.bincount(metrics._hist_bins(part),
                                            minlength=stats.step_time_hist.size)
    errors = []
    for q in (0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0):
        exact = np.percentile(values, 100 * q, method="inverted_cdf")
        errors.append(abs(stats.step_time_quantile(q) / exact - 1))
    assert max(errors) <= metrics.HIST_RELATIVE_ERROR
    assert max(errors) > metrics.HIST_RELATIVE_ERROR / 10  # the bound is not vacuous
    assert np.isnan(metrics.RunningStats().step_time_quantile(0.5))


def test_long_runs_drop_the_timeline_by_default(monkeypatch):
    wl = synthetic("sharegpt", 4, seed=1)
    monkeypatch.setattr(simulation, "TIMELINE_AUTO_BYTES", 1024)
    result = simulate("vllm-offload", "llama3-8b", wl, max_batch=4, chunk_steps=16)
    assert result.metrics is None and result.summary["requests_finished"] == 4
