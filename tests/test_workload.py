"""Tests for pamjax.workload: synthetic datasets and Workload validation.

Statistical checks use fixed seeds, so they are deterministic; the tolerances state how far a
correct generator may drift with the given sample size (about three standard errors).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pamjax.errors import ConfigError, UnknownNameError
from pamjax.workload import DATASETS, DatasetStats, Workload, synthetic

# Sample size and relative tolerance for mean checks: the heaviest-tailed length (WildChat
# prompts) has a coefficient of variation near 1.3, so the standard error of a 4,000-sample
# mean is ~2 %, and ±5 % is about 2.5 standard errors; with fixed seeds the test never flakes.
N_SAMPLES = 4_000
MEAN_TOL = 0.05

ONLINE = ("sharegpt", "wildchat", "humaneval")
OFFLINE = ("arxiv-sum", "write-doc")


def test_dataset_table_covers_the_spec_names():
    assert set(DATASETS) == set(ONLINE + OFFLINE)
    for name, stats in DATASETS.items():
        assert stats.name == name
        assert stats.mode == ("online" if name in ONLINE else "offline")


def test_declared_means_match_pam_spec():
    online = [DATASETS[n] for n in ONLINE]
    assert sum(s.prompt_mean for s in online) / 3 == pytest.approx(183)
    assert sum(s.output_mean for s in online) / 3 == pytest.approx(299)
    assert DATASETS["sharegpt"].mean_context == pytest.approx(534)
    assert DATASETS["wildchat"].mean_context == pytest.approx(738)
    for name in OFFLINE:
        s = DATASETS[name]
        assert s.prompt_min + s.output_min >= 1500
        assert s.prompt_max + s.output_max <= 8000


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_synthetic_is_deterministic_for_a_seed(name):
    a = synthetic(name, 500, seed=7, rate_per_s=3.0)
    b = synthetic(name, 500, seed=7, rate_per_s=3.0)
    for field in ("arrival_s", "prompt_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.name == name


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_different_seeds_differ(name):
    a = synthetic(name, 500, seed=1, rate_per_s=3.0)
    b = synthetic(name, 500, seed=2, rate_per_s=3.0)
    assert not np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.output_tokens, b.output_tokens)
    assert not np.array_equal(a.arrival_s, b.arrival_s)


def test_lengths_do_not_depend_on_the_arrival_rate():
    closed = synthetic("sharegpt", 300, seed=3)
    open_loop = synthetic("sharegpt", 300, seed=3, rate_per_s=10.0)
    np.testing.assert_array_equal(closed.prompt_tokens, open_loop.prompt_tokens)
    np.testing.assert_array_equal(closed.output_tokens, open_loop.output_tokens)


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_sample_means_match_targets(name):
    stats = DATASETS[name]
    w = synthetic(name, N_SAMPLES, seed=0)
    assert w.mean_prompt == pytest.approx(stats.prompt_mean, rel=MEAN_TOL)
    assert w.mean_output == pytest.approx(stats.output_mean, rel=MEAN_TOL)


def test_sample_means_match_the_online_aggregates():
    ws = {n: synthetic(n, N_SAMPLES, seed=0) for n in ONLINE}
    assert np.mean([w.mean_prompt for w in ws.values()]) == pytest.approx(183, rel=MEAN_TOL)
    assert np.mean([w.mean_output for w in ws.values()]) == pytest.approx(299, rel=MEAN_TOL)
    for name, target in (("sharegpt", 534), ("wildchat", 738)):
        w = ws[name]
        assert w.mean_prompt + w.mean_output == pytest.approx(target, rel=MEAN_TOL)


@pytest.mark.parametrize("name", ONLINE + OFFLINE)
def test_lengths_within_bounds(name):
    stats = DATASETS[name]
    w = synthetic(name, N_SAMPLES, seed=5)
    assert w.prompt_tokens.dtype == np.int32 and w.output_tokens.dtype == np.int32
    assert stats.prompt_min <= w.prompt_tokens.min() <= w.prompt_tokens.max() <= stats.prompt_max
    assert stats.output_min <= w.output_tokens.min() <= w.output_tokens.max() <= stats.output_max
    # Heavy tails: the longest prompt is well above the mean (not a narrow bell).
    assert w.prompt_tokens.max() > 1.5 * stats.prompt_mean
    if stats.mode == "offline":
        context = w.prompt_tokens.astype(np.int64) + w.output_tokens
        assert context.min() >= 1500 and context.max() <= 8000


def test_poisson_arrivals_match_the_rate():
    rate = 20.0
    w = synthetic("wildchat", N_SAMPLES, seed=11, rate_per_s=rate)
    assert w.arrival_s.dtype == np.float64
    assert w.arrival_s[0] > 0
    gaps = np.diff(np.concatenate([[0.0], w.arrival_s]))
    assert (gaps >= 0).all()
    assert w.num_requests / w.arrival_s[-1] == pytest.approx(rate, rel=MEAN_TOL)
    # Exponential gaps have a coefficient of variation of 1 (a regular clock would have 0).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("name", ("humaneval", "arxiv-sum"))
def test_closed_loop_arrivals_are_all_zero(name):
    w = synthetic(name, 100, seed=0)
    assert w.arrival_s.dtype == np.float64
    assert (w.arrival_s == 0).all()


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UnknownNameError) as info:
        synthetic("alpaca", 10, seed=0)
    assert info.value.kind == "workload" and info.value.name == "alpaca"
    assert set(info.value.choices) == set(DATASETS)
    assert "sharegpt" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_requests": 0}, "num_requests"),
        ({"num_requests": -3}, "num_requests"),
        ({"num_requests": 2.5}, "num_requests"),
        ({"rate_per_s": 0.0}, "rate_per_s"),
        ({"rate_per_s": -1.0}, "rate_per_s"),
        ({"rate_per_s": math.nan}, "rate_per_s"),
        ({"rate_per_s": math.inf}, "rate_per_s"),
        ({"seed": -1}, "seed"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, field):
    args = {"num_requests": 10, "seed": 0, "rate_per_s": None} | kwargs
    num = args.pop("num_requests")
    with pytest.raises(ConfigError) as info:
        synthetic("sharegpt", num, **args)
    assert info.value.field == field


def test_workload_properties_and_head():
    w = Workload(np.array([0.0, 1.0, 1.0, 2.5]), [10, 20, 30, 40], [5, 6, 7, 100], "demo")
    assert w.num_requests == 4
    assert w.mean_prompt == pytest.approx(25.0)
    assert w.mean_output == pytest.approx(29.5)
    assert w.max_context == 140
    assert w.prompt_tokens.dtype == np.int32 and w.arrival_s.dtype == np.float64
    h = w.head(2)
    assert h.num_requests == 2 and h.name == "demo"
    np.testing.assert_array_equal(h.prompt_tokens, [10, 20])
    assert w.head(99).num_requests == 4
    with pytest.raises(ConfigError):
        w.head(0)
    assert "num_requests=4" in repr(w)


def test_workload_arrays_are_copied_and_read_only():
    prompt = np.array([3, 4])
    w = Workload(np.zeros(2), prompt, np.array([1, 1]))
    prompt[0] = 99
    assert w.prompt_tokens[0] == 3
    with pytest.raises(ValueError):
        w.prompt_tokens[0] = 5


@pytest.mark.parametrize(
    "arrival, prompt, output, field",
    [
        ([0.0, 1.0], [1, 2, 3], [1, 2], "Workload.prompt_tokens"),
        ([0.0, 1.0], [1, 2], [1], "Workload.output_tokens"),
        ([], [], [], "Workload.arrival_s"),
        ([0.0, 1.0], [1, 0], [1, 1], "Workload.prompt_tokens"),
        ([0.0, 1.0], [1, 1], [-2, 1], "Workload.output_tokens"),
        ([0.0, 1.0], [1.5, 1], [1, 1], "Workload.prompt_tokens"),
        ([2.0, 1.0], [1, 1], [1, 1], "Workload.arrival_s"),
        ([-1.0, 1.0], [1, 1], [1, 1], "Workload.arrival_s"),
        ([0.0, math.nan], [1, 1], [1, 1], "Workload.arrival_s"),
        ([[0.0, 1.0]], [1, 1], [1, 1], "Workload.arrival_s"),
        ([0.0], [2**30], [2**30], "Workload.prompt_tokens+output_tokens"),
    ],
)
def test_workload_validation(arrival, prompt, output, field):
    with pytest.raises(ConfigError) as info:
        Workload(np.asarray(arrival, dtype=np.float64), np.asarray(prompt), np.asarray(output))
    assert info.value.field == field


def test_dataset_stats_validation():
    with pytest.raises(ConfigError):
        DatasetStats("x", "online", 5000, 1.0, 1, 100, 10, 1.0, 1, 100, "mean above max")
    with pytest.raises(ConfigError):
        DatasetStats("x", "batch", 50, 1.0, 1, 100, 10, 1.0, 1, 100, "bad mode")
    with pytest.raises(ConfigError):
        DatasetStats("x", "online", 50, 0.0, 1, 100, 10, 1.0, 1, 100, "zero sigma")
