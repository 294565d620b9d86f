"""Sensitivity analysis (pamjax.studies.sensitivity): the [D] table, perturbed
configurations built as overrides are, vmapped evaluation, Morris/Sobol on known answers,
the what-would-it-take bisection, and the command's one-line errors."""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest

from pamjax.cli import main
from pamjax.studies import sensitivity as sens
from pamjax.systems import make_params


def test_every_parameter_has_a_documented_range_that_configures():
    base = sens.Base(*sens.make_study("llama3-8b", "sharegpt", ("pam",), batch=4,
                                      metric="throughput").base.__dict__.values())
    for p in sens.PARAMETERS:
        assert p.low < p.high and p.low <= p.nominal <= p.high, p.name
        assert p.limits[0] <= p.low and p.high <= p.limits[1], p.name
        assert p.reason and p.unit and p.kind in sens.KINDS, p.name
        lo, hi = sens.search_interval(p)
        assert lo <= p.low and hi >= p.high
        for value in (p.low, p.high, lo, hi):
            sens.configure(base, {p.name: value}, "pam")  # valid as an override
    assert "`access.persistence`" in sens.parameter_table_markdown()


def test_configure_builds_as_an_override_and_recalibrates():
    study = sens.make_study("llama3-70b", "sharegpt", ("pam",), batch=4, metric="throughput")
    platform, *_ = sens.configure(study.base, {"energy.ddr_host_read": 40.0}, "pam")
    # The preset sums host read and PCIe into the tier; the perturbation keeps that sum.
    assert platform.ddr.host_read_pj_per_bit == pytest.approx(40.0 + 10.0)
    assert platform.energy.ddr_host_read == 40.0
    nominal = make_params("pam", "llama3-70b", study.base.platform)
    slow, access, knobs, system = sens.configure(study.base, {"gpu.pcie_gbps": 32.0}, "pam")
    perturbed = make_params(system, "llama3-70b", slow, access, knobs=knobs)
    assert float(perturbed.pcie_rate) == pytest.approx(32e9)
    assert float(perturbed.target_y) != pytest.approx(float(nominal.target_y))  # recalibrated
    *_, ls_pim = sens.configure(study.base, {"system.swap_budget": 2}, "ls-pim")
    assert ls_pim.swap_budget == 0  # a system without online scheduling is not given one


@pytest.fixture(scope="module")
def tiny():
    study = sens.make_study("llama3-8b", "sharegpt", ("pam", "ls-pim"), batch=4, steps=4,
                            warmup=4, width=3, chunk_steps=4)
    values = [{}, {"knobs.naive_run_tokens": 16}, {"gpu.stream_efficiency": 0.7}]
    return study, values, sens.evaluate(study, values)


def test_a_parameter_that_cannot_act_has_zero_effect(tiny):
    _, _, ev = tiny
    # naive_run_tokens changes SimParams (naive_run_units) but only the sequential mapping
    # reads it: both systems were simulated again and the metric did not move.
    assert ev.simulations == 6
    assert ev.metric[1] == ev.metric[0]
    assert np.all(ev.throughput[1] == ev.throughput[0])
    assert np.all(ev.throughput[2] < ev.throughput[0])  # a control that does act
    assert ev.metric[2] != ev.metric[0]
    assert np.all(ev.throughput > 0) and ev.compiled_calls >= 1


def test_vmapped_evaluation_equals_one_by_one(tiny):
    study, values, ev = tiny
    for i, v in enumerate(values):
        alone = sens.evaluate(study, [v])  # its own call, padded to the same width
        np.testing.assert_array_equal(alone.throughput[0], ev.throughput[i])
        np.testing.assert_array_equal(alone.energy[0], ev.energy[i])


def _synthetic(k=4):
    return tuple(sens.Parameter(f"x{j}", "knobs", 0.5, 0.0, 1.0, "-", "test")
                 for j in range(k))


def test_morris_recovers_a_known_ranking():
    pytest.importorskip("SALib")
    params = _synthetic()
    unit = sens.design(params, "morris", 8, seed=1)
    x = np.array([[v[p.name] for p in params] for v in sens.values_of(params, unit)])
    y = 5.0 * x[:, 0] + 1.0 * x[:, 1] + 3.0 * x[:, 3] ** 2  # x2 does nothing
    rows = sens.analyze(params, "morris", unit, y)
    mu = {r["name"]: r["mu_star"] for r in rows}
    assert mu["x0"] == pytest.approx(5.0) and mu["x1"] == pytest.approx(1.0)
    assert mu["x2"] == 0.0 and mu["x0"] > mu["x3"] > mu["x1"]
    sig = {r["name"]: r["sigma"] for r in rows}
    assert sig["x0"] == pytest.approx(0.0, abs=1e-9) and sig["x3"] > 0  # linear vs not


def test_sobol_recovers_a_known_ranking():
    pytest.importorskip("SALib")
    params = _synthetic(3)
    unit = sens.design(params, "sobol", 256, seed=2)
    y = 4.0 * unit[:, 0] + 2.0 * unit[:, 1]
    rows = {r["name"]: r for r in sens.analyze(params, "sobol", unit, y, seed=2)}
    # Var = 16/12 + 4/12: S1 = 0.8 and 0.2, none for x2.
    assert rows["x0"]["S1"] == pytest.approx(0.8, abs=0.08)
    assert rows["x1"]["S1"] == pytest.approx(0.2, abs=0.05)
    assert abs(rows["x2"]["ST"]) < 0.01 and rows["x2"]["mu_star"] == 0.0
    assert rows["x0"]["mu_star"] == pytest.approx(4.0)


@dataclasses.dataclass
class _Ev:
    metric: np.ndarray


def test_bisection_finds_the_crossing_nearest_the_nominal():
    p = sens.Parameter("x", "knobs", 10.0, 5.0, 20.0, "-", "test")
    q = sens.Parameter("y", "knobs", 10.0, 5.0, 20.0, "-", "test", log=True)
    truth = {"x": lambda v: v / 10.0, "y": lambda v: v / 10.0}  # ratio 1.5 at 15
    legs = [{"parameter": p, "lo": 10.0, "hi": 40.0, "end": 40.0, "open": True, "bound_value": 12.0, "ceiling": 9.0,
             "hi_ratio": 4.0},
            {"parameter": q, "lo": 10.0, "hi": 80.0, "end": 80.0, "open": True, "bound_value": 12.0, "ceiling": 9.0,
             "hi_ratio": 8.0}]
    calls = []

    def run_(values, label):
        calls.append(len(values))
        return _Ev(np.array([truth[k](v) for d in values for k, v in d.items()]))

    sens._bisect(legs, 1.5, 12, run_)
    assert all(n == 2 for n in calls)  # every leg's midpoint in one evaluation
    for leg in legs:
        assert leg["lo"] < 15.0 <= leg["hi"] and leg["hi"] == pytest.approx(15.0, rel=1e-2)
    row = sens._leg_row(legs[0])
    assert row["inside"] and row["distance"] == pytest.approx(0.5, rel=2e-2)
    assert sens.distance(p, 5.0) == 1.0 and sens.distance(q, 40.0) == pytest.approx(2.0)
    assert math.isclose(sens.distance(q, 10.0), 0.0)


@pytest.mark.parametrize("argv", [
    ["--systems", "pam,ls-pim"],  # neither --batch nor --slo-ms
    ["--systems", "pam,ls-pim", "--batch", "8", "--slo-ms", "100"],
    ["--systems", "pam", "--batch", "8"],  # a ratio needs two systems
    ["--systems", "pam,nope", "--batch", "8"],
    ["--systems", "pam,ls-pim", "--batch", "8", "--method", "fast"],
    ["--systems", "pam,ls-pim", "--batch", "0"],
])
def test_sensitivity_bad_input_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rc = main(["sensitivity", *argv])
        raise SystemExit(rc)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pamjax: error:") and "\n" not in err


def test_sensitivity_without_salib_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "SALib", None)  # import SALib raises ImportError
    rc = main(["sensitivity", "--systems", "pam,ls-pim", "--batch", "8", "--model",
               "llama3-8b"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "pip install" in err and "\n" not in err


def test_what_would_it_take_needs_a_claim(capsys):
    assert main(["bounds", "--model", "llama3-8b", "--what-would-it-take"]) == 2
    assert "--claim" in capsys.readouterr().err


def test_sensitivity_command_writes_tornado_and_json(tiny, tmp_path, capsys):
    pytest.importorskip("SALib")
    # The fixture's setup, so the compiled program is reused.
    rc = main(["sensitivity", "--model", "llama3-8b", "--workload", "sharegpt", "--batch", "4",
               "--systems", "pam,ls-pim", "--steps", "4", "--warmup", "4", "--width", "3",
               "--samples", "2", "--parameters", "knobs.naive_run_tokens,gpu.stream_efficiency",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    import json

    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert {"parameters", "metric", "nominal_value", "evaluations", "compiled_calls",
            "wall_seconds", "provenance"} <= set(data)
    rows = {r["name"]: r for r in data["parameters"]}
    for r in rows.values():
        assert {"name", "nominal", "low", "high", "mu_star", "sigma"} <= set(r)
    assert rows["knobs.naive_run_tokens"]["mu_star"] == 0.0
    assert rows["gpu.stream_efficiency"]["mu_star"] > 0
    assert data["evaluations"] == 2 * 3 + 1 and data["compiled_calls"] >= 1
    assert data["nominal_value"] == pytest.approx(tiny[2].metric[0])
    assert (tmp_path / "sensitivity.png").stat().st_size > 0
    assert "mu*" in capsys.readouterr().out
