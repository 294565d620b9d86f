"""The batched runner (simulation.run_batch, stack, index_config) and the progress helper.

One small case (LLaMA-3-8B, four ShareGPT requests, batch 2, page 64) for every test, two
configurations per call and scans of 5 steps, so the file compiles the engine three times.
"""

from __future__ import annotations

import builtins
import types

import chex
import jax
import numpy as np
import pytest

from pamjax import engine, progress
from pamjax.errors import ConfigError
from pamjax.simulation import (
    device_workload,
    index_config,
    make_config,
    run_batch,
    stack,
)
from pamjax.systems import make_params, max_bank_groups
from pamjax.testing import check_invariants
from pamjax.workload import synthetic

SYSTEMS = ("pam", "l-pim", "vllm-offload")
WORKLOAD = synthetic("sharegpt", 4, seed=0)
CONFIG = make_config(WORKLOAD, 2, page_size=64, padded_bank_groups=max_bank_groups())
PARAMS = [make_params(s, "llama3-8b", max_batch=2, page_size=64) for s in SYSTEMS]


def test_stack_and_index_config_are_inverse():
    stacked = stack(PARAMS)
    assert stacked.target_x.shape == (3,)
    for i, p in enumerate(PARAMS):
        chex.assert_trees_all_equal(index_config(stacked, i), jax.device_get(p))
    with pytest.raises(ConfigError, match="configurations"):
        stack([])


def test_a_configuration_does_not_depend_on_its_call_mates():
    # Width 2 over 3 configurations: calls [pam, l-pim] and [vllm-offload, pam (padding)].
    state, metrics = run_batch(CONFIG, PARAMS, WORKLOAD, 10, seeds=[0, 1, 2], width=2,
                               chunk_steps=5)
    assert metrics.step_time_s.shape == (3, 10) and state.step.tolist() == [10, 10, 10]
    # The same configurations in other calls of the same width give the same bits.
    state2, metrics2 = run_batch(CONFIG, PARAMS[::-1], WORKLOAD, 10, seeds=[2, 1, 0],
                                 width=2, chunk_steps=5)
    reverse = np.arange(3)[::-1]
    chex.assert_trees_all_equal(metrics, jax.tree.map(lambda x: x[reverse], metrics2))
    chex.assert_trees_all_equal(state, jax.tree.map(lambda x: x[reverse], state2))
    for i in range(3):
        check_invariants(CONFIG, PARAMS[i], index_config(state, i), device_workload(WORKLOAD),
                         index_config(metrics, i))
    assert state.seed.tolist() == [0, 1, 2]


def test_one_call_matches_the_engines_batched_rollout():
    stacked = stack(PARAMS[:2])
    states = stack([engine.init_state(CONFIG, 7)] * 2)
    want = jax.device_get(engine.rollout_batch(CONFIG, stacked, states,
                                               device_workload(WORKLOAD), 5))
    got = run_batch(CONFIG, stacked, WORKLOAD, 5, seeds=7)
    chex.assert_trees_all_equal(got, want)
    # Given states are used as they are (here: continued for 5 more steps).
    more = run_batch(CONFIG, stacked, device_workload(WORKLOAD), 5, states=got[0])
    assert more[0].step.tolist() == [10, 10]


def test_per_configuration_workloads_and_devices():
    other = synthetic("sharegpt", 4, seed=5)
    plain = run_batch(CONFIG, PARAMS[:2], [WORKLOAD, other], 5, seeds=[0, 1])
    # Each workload goes with its configuration: swapping both swaps the results.
    swapped = run_batch(CONFIG, PARAMS[1::-1], [other, WORKLOAD], 5, seeds=[1, 0])
    chex.assert_trees_all_equal(plain, jax.tree.map(lambda x: x[::-1], swapped))
    same_params = run_batch(CONFIG, [PARAMS[0]] * 2, [WORKLOAD, other], 5)
    assert not np.array_equal(*same_params[1].step_time_s)  # the workloads differ
    # Dealt to devices (here the one device twice: a round of two groups of width 2),
    # each group runs the program it runs without devices: the same bits.
    dealt = run_batch(CONFIG, PARAMS[:2] * 2, [WORKLOAD, other] * 2, 5, seeds=[0, 1] * 2,
                      width=2, devices=jax.devices()[:1] * 2)
    chex.assert_trees_all_equal(dealt, jax.tree.map(lambda *x: np.concatenate(x), plain, plain))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_steps=0), "num_steps"),
    (dict(chunk_steps=-1), "chunk_steps"),
    (dict(width=1.5), "width"),
    (dict(seeds=[0, 1]), "seeds"),
    (dict(workload=[WORKLOAD]), "workload"),
    (dict(devices=[types.SimpleNamespace(process_index=99)]), "devices"),
])
def test_bad_input_names_the_field(kwargs, field):
    args = dict(workload=WORKLOAD, num_steps=4)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        run_batch(CONFIG, PARAMS, args.pop("workload"), args.pop("num_steps"), **args)
    assert info.value.field == field


def test_progress_line_without_tqdm(capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with progress.Progress(10, desc="sweep", unit="config", initial=2) as bar:
        assert bar.bar is None
        bar.update(3, status="chunk 1")
        bar.moveto(9)
    out, err = capsys.readouterr()
    assert out == ""  # progress never goes to stdout
    lines = err.split("\r")
    assert lines[1].startswith("  sweep: 5/10 config, chunk 1, ")
    assert lines[2].startswith("  sweep: 9/10 config, ") and err.endswith(" s\n")


def test_progress_is_silent_when_disabled(capsys):
    with progress.Progress(4, desc="x", unit="step", enabled=False) as bar:
        bar.update(4, status="done")
    assert capsys.readouterr() == ("", "")


def test_progress_uses_tqdm_when_installed(capsys):
    pytest.importorskip("tqdm")
    with progress.Progress(4, desc="simulate", unit="req") as bar:
        bar.moveto(3, status="12 steps")
        assert bar.bar is not None and bar.bar.n == 3
    assert capsys.readouterr().out == ""
