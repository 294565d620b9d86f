"""The study builders of pamjax/studies/reproduce.py: rows carry exactly their documented columns.

The simulations are replaced by a fake sweep (the engine is tested elsewhere), so this checks
the bookkeeping that turns sweep rows into each study's CSV rows, in milliseconds.
"""

from __future__ import annotations

import pytest

from pamjax.studies import reproduce, study
from pamjax.studies.study import BOUND_COLUMNS
from pamjax.types import ENERGY_COMPONENTS


def _fake_sweep(systems, model, workload, batches, **kwargs):
    """One plausible row per (platform, model, system, batch), like study.run_sweep."""
    models = [model] if isinstance(model, str) else list(model)
    platforms = kwargs.get("platforms") or {"": None}
    rows = []
    for label in platforms:
        for m in models:
            for system in systems:
                for batch in batches:
                    row = {"platform": label, "model": m, "system": system, "batch": batch,
                           "throughput_tokens_per_s": 100.0 + batch,
                           "decode_throughput_tokens_per_s": 200.0 + batch,
                           "tpot_p99_ms": 0.1 * batch, "oom": batch > 1024,
                           "mean_batch": float(batch), "mean_context_tokens": 500.0,
                           "migrated_token_fraction_per_step": 0.01,
                           "attention_time_s": 1.0 + (system == "pam"),
                           "energy_j_per_token": 0.5}
                    row.update({f"energy_{c}": 0.1 for c in ENERGY_COMPONENTS})
                    for prefix in ("", "decode_"):
                        row.update({f"{prefix}bound_tokens_per_s": 1e6,
                                    f"{prefix}binding_resource": "gpu_compute",
                                    f"{prefix}efficiency": 0.5})
                    rows.append(row)
    return rows


@pytest.fixture
def fake_sweep(monkeypatch):
    """Every sweep the studies run (directly or through study.slo_sweep) is the fake."""
    monkeypatch.setattr(reproduce, "run_sweep", _fake_sweep)
    monkeypatch.setattr(study, "run_sweep", _fake_sweep)


@pytest.mark.parametrize("name", reproduce.STUDIES)
def test_study_rows_have_exactly_their_columns(name, fake_sweep):
    rows = getattr(reproduce, name)(quick=True, progress=False)
    assert rows
    for row in rows:
        assert set(row) == set(reproduce.STUDY_COLUMNS[name]), (name, sorted(row))
        assert set(BOUND_COLUMNS) <= set(row)


def test_studies_report_window_throughput_and_its_bound(fake_sweep):
    for row in reproduce.offline(quick=True, progress=False):
        fits = not row["oom"]
        assert row["throughput_tokens_per_s"] == (100.0 + row["batch"] if fits else 0.0)
        assert (row["efficiency"] is not None) == fits


def test_the_slo_search_extends_its_grid_while_the_slo_is_met(fake_sweep):
    # The fake's TPOT p99 is 0.1 ms x batch: a grid ending at 16 meets 100 ms, so the search
    # doubles past it until batch 1024 misses the SLO (102.4 ms), and stops there.
    rows = study.slo_sweep(["pam"], ["llama3-70b"], "sharegpt", [8, 16], [100.0])
    assert sorted({r["batch"] for r in rows}) == [8, 16, 32, 64, 128, 256, 512, 1024]
    best = study.peak_under_slo(rows, 100.0)["pam"]
    assert best["max_batch"] == 512 and not best["at_grid_edge"]


def test_the_ablation_reports_throughput_beside_attention_time(fake_sweep):
    rows = reproduce.ablation(quick=True, progress=False)
    pam = next(r for r in rows if r["variant"] == "pam")
    # The fake's PAM takes twice LS-PIM's attention time at the same throughput.
    assert pam["speedup_vs_ls_pim"] == pytest.approx(0.5)
    assert pam["throughput_vs_ls_pim"] == pytest.approx(1.0)
