"""pamjax.studies.sweep: device-count independence, chunk commit and resume, compile count,
bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pamjax import simulation
from pamjax.errors import ConfigError, UnknownNameError
from pamjax.studies import sweep

AXES = dict(model="llama3-8b", workload="sharegpt", trace=None, max_requests=8,
            systems=["pam", "l-pim"], batches=[2, 4], slo_ms=[50.0, 200.0], seeds=[0, 1],
            overrides=None, steps=12)

SCRIPT = textwrap.dedent("""
    import sys, jax
    from pamjax.studies import sweep
    print("devices", jax.device_count())
    spec = sweep.make_spec(model="llama3-8b", workload="sharegpt", trace=None, max_requests=8,
                           systems=["pam", "l-pim"], batches=[2, 4], slo_ms=[50, 200],
                           seeds=[0, 1], overrides=["", "ddr.num_devices=80"], steps=12)
    sweep.run(spec, sys.argv[1], chunk_size=3)
""")


def test_csv_is_byte_identical_on_1_and_4_devices(tmp_path):
    """16 configurations in chunks of 3 (1 device) or 4 (4 devices, padded differently)."""
    runs = {}
    for devices in (1, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PAMJAX_NO_CACHE="1")
        out = tmp_path / f"d{devices}"
        runs[devices] = (out, subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True))
    for devices, (out, proc) in runs.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, text
        assert f"devices {devices}" in text
    one = (tmp_path / "d1" / "sweep.csv").read_bytes()
    four = (tmp_path / "d4" / "sweep.csv").read_bytes()
    assert one.count(b"\n") == 1 + 2 * 2 * 2 * 2 * 2  # header + configs x SLOs
    assert one == four


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
    spec = sweep.make_spec(**AXES)
    simulation.rollout_per_config.clear_cache()
    full = sweep.run(spec, tmp_path / "full", chunk_size=3)
    # 8 configurations (one slot class) in chunks of 3: one compilation for all 3 chunks.
    assert (full.configs_total, full.chunks, full.compiles) == (8, 3, 1)
    assert full.configs_run == 8

    real_append = sweep._append_rows
    calls = []

    def killed_after_two_chunks(path, data):
        calls.append(path)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        real_append(path, data)

    monkeypatch.setattr(sweep, "_append_rows", killed_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(spec, tmp_path / "cut", chunk_size=3)
    partial = (tmp_path / "cut" / "sweep.csv").read_text().splitlines()
    assert len(partial) == 1 + 6 * 2  # header + two chunks of 3 configurations x 2 SLOs
    monkeypatch.setattr(sweep, "_append_rows", real_append)

    with pytest.raises(ConfigError, match="chunk_size"):
        sweep.run(spec, tmp_path / "cut", resume=True, chunk_size=4)
    # The last chunk (2 configurations) runs 3 wide, as in the uninterrupted run.
    resumed = sweep.run(spec, tmp_path / "cut", resume=True, chunk_size=3)
    assert resumed.configs_run == 2 and resumed.chunks == 1 and resumed.compiles == 0
    assert (tmp_path / "cut" / "sweep.csv").read_bytes() == \
        (tmp_path / "full" / "sweep.csv").read_bytes()

    again = sweep.run(spec, tmp_path / "cut", resume=True, chunk_size=3)
    assert again.configs_run == 0 and again.chunks == 0

    other = sweep.make_spec(**{**AXES, "steps": 13})
    with pytest.raises(ConfigError, match="resume"):
        sweep.run(other, tmp_path / "cut", resume=True)


def test_torn_tail_and_partial_configurations_are_dropped_on_resume(tmp_path):
    # Two SLOs per configuration: pam/64 is whole, l-pim/64 lost its second row, and the
    # last line was cut mid-write (a machine crash): only pam/64 counts as done.
    path = tmp_path / "sweep.csv"
    head = b"system,overrides,batch,seed,slo_ms\n"
    whole = b"pam,,64,0,100.0\npam,,64,0,150.0\n"
    torn = head + whole + b"l-pim,,64,0,100.0\nl-pim,,6"
    path.write_bytes(torn)
    columns, rows = sweep._read_existing(path, rows_per_config=2, writer=False)
    assert columns == ["system", "overrides", "batch", "seed", "slo_ms"]
    assert [(r["system"], r["slo_ms"]) for r in rows] == [("pam", "100.0"), ("pam", "150.0")]
    assert path.read_bytes() == torn  # only the writing process touches the file
    sweep._read_existing(path, rows_per_config=2, writer=True)
    assert path.read_bytes() == head + whole


@pytest.mark.parametrize("change, error, field, value", [
    ({"systems": ["pam", "nope"]}, UnknownNameError, None, "nope"),
    ({"batches": []}, ConfigError, "batches", []),
    ({"seeds": [-1]}, ConfigError, "seeds", -1),
    ({"slo_ms": [0.0]}, ConfigError, "slo_ms", 0.0),
    ({"overrides": ["ddr.num_devices"]}, ConfigError, "overrides", "ddr.num_devices"),
    ({"overrides": ["ddr.num_devices=abc"]}, ConfigError, "overrides", "ddr.num_devices=abc"),
    ({"overrides": ["ddr.nonsense=3"]}, UnknownNameError, None, "nonsense"),
    ({"model": "gpt-17"}, UnknownNameError, None, "gpt-17"),
    ({"steps": 0}, ConfigError, "steps", 0),
])
def test_bad_input_names_field_and_value(change, error, field, value):
    with pytest.raises(error) as info:
        sweep.make_spec(**{**AXES, **change})
    if field is None:
        assert info.value.name == value
    else:
        assert (info.value.field, info.value.value) == (field, value)


def test_parse_override():
    assert sweep.parse_override("") == {}
    assert sweep.parse_override("ddr.num_devices=80, gpu.peak_tflops=1.5e3") == {
        "ddr.num_devices": 80, "gpu.peak_tflops": 1500.0}
