"""System-level checks of the physics (issue: "tests that would have caught each defect").

Each test names the defect it guards against. The term-by-term checks of the cost model are
in test_costs.py; these run the engine (or the steady-state sweep) and check what a study
would have reported.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from pamjax import costs, engine, simulation, systems
from pamjax.locality import AccessModel, selection_statistics
from pamjax.models import get_model
from pamjax.studies.study import run_sweep
from pamjax.types import ENERGY_COMPONENTS, STATUS_REJECTED, STATUS_RUNNING
from pamjax.workload import Workload, steady_state, synthetic

MODEL = "llama3-8b"


def _rollout(system, workload, batch, steps, page=4, resume=False):
    config = simulation.make_config(workload, batch, page_size=page,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params(system, MODEL, max_batch=batch, page_size=page)
    device = simulation.device_workload(workload)
    state = engine.init_state(config, 0)
    if resume:
        state = engine.resume_jit(config, params, state, device)
    return engine.rollout_jit(config, params, state, device, steps)


def test_lpim_is_attacc_while_all_kv_fits_hbm():
    # Defect: AttAcc got in-device reduction and striping while L-PIM paid central partials
    # and a naive mapping. While every token sits in HBM the two are the same machine
    # (PAM_SPEC §7): the same attention time, step by step.
    workload = synthetic("sharegpt", 24, seed=3)
    _, attacc = _rollout("attacc", workload, 8, 40)
    _, lpim = _rollout("l-pim", workload, 8, 40)
    assert int(np.asarray(lpim.tier_units)[:, 1:].sum()) == 0  # nothing left HBM
    np.testing.assert_array_equal(np.asarray(attacc.attention_s), np.asarray(lpim.attention_s))
    np.testing.assert_array_equal(np.asarray(attacc.step_time_s), np.asarray(lpim.step_time_s))


@pytest.fixture(scope="module")
def write_doc_rows():
    return run_sweep(["ls-pim", "vllm-offload"], MODEL, "write-doc", [16], steps=64,
                     warmup=16, seed=1)


def test_write_doc_is_measured_at_its_real_contexts(write_doc_rows):
    # Defect: runs of 192-256 steps from an empty system never passed ~310 tokens of
    # context on write-doc (3,000-token outputs). At steady state the mean context is that
    # of the closed loop: prompt + a uniform share of a length-biased output (> 1,000).
    for row in write_doc_rows:
        assert row["mean_context_tokens"] > 1000, row
        assert abs(row["context_drift"]) < 0.02, row
        assert not row["oom"] and row["mean_batch"] == pytest.approx(16.0, abs=0.5)


def test_static_power_is_paid_for_the_time_a_system_takes(write_doc_rows):
    # Defect: no static power, so a slow system's energy per token looked as cheap as a
    # fast one's. Static energy per token = platform idle power / throughput.
    power = get_platform_power()
    by_system = {r["system"]: r for r in write_doc_rows}
    for row in write_doc_rows:
        assert row["energy_static"] == pytest.approx(power / row["throughput_tokens_per_s"],
                                                     rel=1e-5)
    slower = min(by_system.values(), key=lambda r: r["throughput_tokens_per_s"])
    faster = max(by_system.values(), key=lambda r: r["throughput_tokens_per_s"])
    assert slower["energy_static"] > faster["energy_static"]


def get_platform_power():
    from pamjax.hardware import get_platform

    return get_platform().static_power_w


def test_doubling_the_window_moves_the_result_by_less_than_two_percent():
    # The README's measuring window (steps after a warm-up) is long enough: twice as long
    # a window gives the same throughput and TPOT p99 to within 2%.
    short, long = (run_sweep(["pam", "ls-pim"], MODEL, "sharegpt", [32], steps=steps,
                             warmup=16, seed=2) for steps in (64, 128))
    for a, b in zip(short, long):
        assert a["system"] == b["system"]
        assert a["throughput_tokens_per_s"] == pytest.approx(b["throughput_tokens_per_s"],
                                                             rel=0.02), (a, b)
        assert a["tpot_p99_ms"] == pytest.approx(b["tpot_p99_ms"], rel=0.02), (a, b)


def test_steady_state_draws_length_biased_requests_mid_life():
    pool = synthetic("sharegpt", 4096, seed=0)
    w = steady_state(pool, 3000, 3100, seed=1)
    assert w.in_flight == 3000 and w.num_requests == 3100
    out = w.output_tokens[:3000].astype(np.float64)
    g = w.generated_tokens[:3000]
    assert np.all((g >= 1) & (g < out))
    # Length-biased by output - 1: the in-flight mean output is E[o (o - 1)] / E[o - 1].
    o = pool.output_tokens.astype(np.float64)
    expected = np.sum(o * (o - 1)) / np.sum(o - 1)
    assert out.mean() == pytest.approx(expected, rel=0.05)
    # Progress is uniform over a request's life: generated / output averages 1/2.
    assert np.mean(g / out) == pytest.approx(0.5, abs=0.02)
    assert np.all(w.generated_tokens[3000:] == 0)


def test_resume_places_in_flight_requests_without_prefill():
    pool = Workload(np.zeros(4), np.array([10, 20, 30, 40]), np.array([8, 8, 8, 8]))
    w = Workload(np.zeros(6), np.array([10, 20, 30, 10, 10, 10]), np.array([8, 8, 8, 8, 8, 8]),
                 generated_tokens=np.array([3, 5, 1, 0, 0, 0]))
    del pool
    state, metrics = _rollout("ls-pim", w, 4, 1, page=1, resume=True)
    first = jax.tree.map(lambda x: np.asarray(x)[0], metrics)
    # The three in-flight requests decode at the first step; the fourth slot prefills a
    # fresh request: only it is prefilled.
    assert int(first.decode_requests) == 3 and int(first.prefill_requests) == 1
    # Contexts after the first step: prompt + generated (the decode added one token).
    assert int(first.decode_context) == (10 + 3) + (20 + 5) + (30 + 1)
    status = np.asarray(state.req_status)
    assert list(status[:4]) == [STATUS_RUNNING] * 4
    assert np.all(np.isnan(np.asarray(state.req_first_token_s)[:3]))  # no TTFT for them


def test_resume_rejects_in_flight_requests_that_do_not_fit():
    # AttAcc's HBM holds ~4.6 M LLaMA3-8B tokens net of weights: three requests of 2 M
    # tokens each do not fit together; the third is refused, not admitted later as fresh.
    w = Workload(np.zeros(4), np.full(4, 2_000_000), np.full(4, 1000),
                 generated_tokens=np.array([10, 10, 10, 0]))
    config = simulation.make_config(w, 3, page_size=4096,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params("attacc", MODEL, max_batch=3, page_size=4096)
    state = engine.resume_jit(config, params, engine.init_state(config, 0),
                              simulation.device_workload(w))
    status = np.asarray(state.req_status)
    need = -(-(2_000_000 + 1000 - 1) // 4096)  # a request's whole KV, in 4096-token pages
    assert int(np.asarray(params.capacity_units)[0]) // need == 2
    assert list(status[:3]) == [STATUS_RUNNING, STATUS_RUNNING, STATUS_REJECTED]
    assert int(state.next_request) == 3


def test_moe_decode_streams_only_the_experts_it_reaches():
    # A mixture of experts reads the experts its tokens are routed to: one token reads the
    # active weights, a large batch every expert (uniform routing).
    base = get_model("llama3-8b")
    moe = dataclasses.replace(base, name="moe-8x", num_experts=8, experts_per_token=2,
                              ffn=4096)
    params = jax.tree.map(np.asarray, systems.make_params("attacc", moe, max_batch=4))
    with jax.enable_x64(True):
        for tokens in (1.0, 4.0, 64.0, 10_000.0):
            got = float(costs.streamed_weights(params, np.float64(tokens)))
            assert got == pytest.approx(moe.streamed_weight_bytes_for_batch(tokens), rel=1e-6)
    assert moe.streamed_weight_bytes_for_batch(1.0) < 0.5 * moe.streamed_weight_bytes
    dense = jax.tree.map(np.asarray, systems.make_params("attacc", base, max_batch=4))
    with jax.enable_x64(True):
        assert float(costs.streamed_weights(dense, np.float64(1.0))) == pytest.approx(
            base.streamed_weight_bytes, rel=1e-6)


def test_access_model_locality_statistics():
    # Selection overlap decays with the lag; lower persistence makes it decay faster; the
    # union of layer groups' selections grows as the groups agree less.
    small = dict(context=512, steps=120, requests=4, lags=(1, 10, 100))
    default = selection_statistics(AccessModel(), **small)
    fickle = selection_statistics(AccessModel(persistence=0.95), **small)
    overlap = default["overlap"]
    assert 1.0 >= overlap[1] > overlap[10] > overlap[100] > 0.0
    assert overlap[1] > 0.85  # Scissorhands: over 95% of important tokens persist
    assert fickle["overlap"][10] < overlap[10] - 0.1
    assert 0.9 < default["selected_mass_share"] <= 1.0
    assert default["hbm_hit_rate"] >= fickle["hbm_hit_rate"]
    same = selection_statistics(AccessModel(), group_correlation=1.0, **small)
    loose = selection_statistics(AccessModel(), group_correlation=0.3, **small)
    assert same["layer_group_union"] == pytest.approx(1.0)
    assert 1.0 < default["layer_group_union"] < loose["layer_group_union"] <= 4.0


def test_energy_components_include_static():
    assert ENERGY_COMPONENTS[-1] == "static"
