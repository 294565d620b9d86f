"""The study builders of pamjax/studies/reproduce.py: rows carry exactly their documented columns.

The simulations are replaced by a fake sweep (the engine is tested elsewhere), so this checks
the bookkeeping that turns sweep rows into each study's CSV rows, in milliseconds.
"""

from __future__ import annotations

import pytest

from pamjax.studies import reproduce
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
                           "attention_time_s": 1.0 + (system == "pam"),
                           "energy_j_per_token": 0.5}
                    row.update({f"energy_{c}": 0.1 for c in ENERGY_COMPONENTS})
                    for prefix in ("", "decode_"):
                        row.update({f"{prefix}bound_tokens_per_s": 1e6,
                                    f"{prefix}binding_resource": "gpu_compute",
                                    f"{prefix}efficiency": 0.5})
                    rows.append(row)
    return rows


@pytest.mark.parametrize("study", reproduce.STUDIES)
def test_study_rows_have_exactly_their_columns(study, monkeypatch):
    monkeypatch.setattr(reproduce, "run_sweep", _fake_sweep)
    rows = getattr(reproduce, study)(quick=True, progress=False)
    assert rows
    for row in rows:
        assert set(row) == set(reproduce.STUDY_COLUMNS[study]), (study, sorted(row))
        assert set(BOUND_COLUMNS) <= set(row)


def test_decode_studies_report_the_decode_bound(monkeypatch):
    monkeypatch.setattr(reproduce, "run_sweep", _fake_sweep)
    for row in reproduce.offline(quick=True, progress=False):
        fits = not row["oom"]
        assert row["throughput_tokens_per_s"] == (200.0 + row["batch"] if fits else 0.0)
        assert (row["efficiency"] is not None) == fits
