"""pamjax.studies.sweep: device-count independence, chunk commit and resume, compile count,
bad input."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pamjax import simulation
from pamjax.errors import ConfigError, UnknownNameError
from pamjax.studies import sweep

AXES = dict(model="llama3-8b", workload="sharegpt", trace=None, max_requests=8,
            systems=["pam", "l-pim"], batches=[2, 4], slo_ms=[50.0, 200.0], seeds=[0, 1],
            overrides=None, steps=12)

# llama3-70b, 8 configurations in 4 chunks of 2. The model matters: its 4 x layers x heads x
# head_dim (5 x 2**19) makes the prefill FLOPs of seeds 1 and 4 (fc_flops x tokens +
# 4LHD x pairs) round differently when XLA fuses the other product into an FMA, as the
# one-device and the partitioned N-device programs of a sharded jit did (llama3-8b's
# 2**19 is exact either way, so it cannot tell them apart).
ARGS = ["sweep", "--model", "llama3-70b", "--systems", "pam,ls-pim", "--batches", "8",
        "--slo-ms", "100", "--seeds", "0,1,4,5", "--max-requests", "8", "--steps", "3",
        "--chunk-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def one_device_csv(tmp_path_factory):
    """sweep.csv of ARGS run in this (one-device) process."""
    import jax

    from pamjax.cli import main

    assert jax.device_count() == 1
    out = tmp_path_factory.mktemp("one")
    assert main([*ARGS, "--out", str(out)]) == 0
    one = (out / "sweep.csv").read_bytes()
    assert one.count(b"\n") == 1 + 2 * 4  # header + systems x seeds (one SLO)
    assert b"energy_gpu_compute" in one.split(b"\n")[0]
    return one


def test_csv_is_byte_identical_on_1_2_and_4_devices(tmp_path, one_device_csv):
    """On 4 devices one chunk each, on 2 devices two rounds, on 1 device four; every
    column compared, energies included."""
    runs = {}
    for devices in (2, 4):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PAMJAX_NO_CACHE="1")
        runs[devices] = subprocess.Popen(
            [sys.executable, "-m", "pamjax.cli", *ARGS, "--out", str(tmp_path / f"d{devices}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for devices, proc in runs.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, text
        assert f"4 chunks on {devices} device(s) in 1 process(es)" in text
        assert (tmp_path / f"d{devices}" / "sweep.csv").read_bytes() == one_device_csv, devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(argv_of, cache, processes: int = 2) -> list[tuple[int, str]]:
    """Run ``pamjax`` as a job of ``processes`` processes on 127.0.0.1 (``argv_of(i)``: the
    arguments of process i, --coordinator etc. added; ``cache``: the compilation cache
    folder); (exit status, output) per process."""
    port = _free_port()
    env = dict(os.environ, PAMJAX_CACHE_DIR=str(cache))
    env.pop("PAMJAX_NO_CACHE", None)  # conftest turns the cache off; this job tests it
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pamjax.cli", *argv_of(i), "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", str(processes), "--process-id", str(i)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    return [(p.returncode, text) for p, text in zip(procs, outputs)]


def test_two_processes_give_the_bytes_of_one_and_resume(tmp_path, one_device_csv):
    """ARGS over the 2 devices of 2 processes (127.0.0.1): the CSV of one process, also when
    resumed from a cut file; only process 0 reads and writes files."""
    # The second job loads the programs the first compiled (tmp_path / "cache").
    results = _job(lambda i: [*ARGS, "--out", str(tmp_path / f"two{i}")], tmp_path / "cache")
    for status, text in results:
        assert status == 0, text
    assert "4 chunks on 2 device(s) in 2 process(es)" in results[0][1]
    assert (tmp_path / "two0" / "sweep.csv").read_bytes() == one_device_csv
    assert not (tmp_path / "two1").exists()

    # Resume from the header, 3 rows and a torn line: process 0 reads them and tells
    # process 1 what is done; 3 chunks are left, the second round on process 0 only.
    lines = one_device_csv.splitlines(keepends=True)
    (tmp_path / "two0" / "sweep.csv").write_bytes(b"".join(lines[:4]) + lines[4][:9])
    results = _job(lambda i: [*ARGS, "--out", str(tmp_path / f"two{i}"), "--resume"],
                   tmp_path / "cache")
    for status, text in results:
        assert status == 0, text
    assert "(5 run now)" in results[0][1] and "3 chunks" in results[0][1]
    assert (tmp_path / "two0" / "sweep.csv").read_bytes() == one_device_csv
    assert not (tmp_path / "two1").exists()


def test_processes_started_with_other_arguments_stop_with_one_line(tmp_path):
    steps = {0: "3", 1: "4"}
    results = _job(lambda i: [*ARGS, "--steps", steps[i], "--out", str(tmp_path)],
                   tmp_path / "cache")
    for status, text in results:
        assert status == 2, text
        error = [line for line in text.splitlines() if line.startswith("pamjax: error")]
        assert error == [("pamjax: error: invalid processes='process 1': its sweep axes or "
                          "chunk size differ from process 0's; start every process of the "
                          "job with the same arguments")], text
    assert not (tmp_path / "sweep.csv").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
     "argument --num-processes: 0 must be >= 1"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "invalid process_id=2: must be below num_processes (2)"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "-1"],
     "invalid process_id=-1: must be an integer >= 0"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "invalid coordinator='localhost': must be HOST:PORT"),
    (["--coordinator", "h:99999", "--num-processes", "2", "--process-id", "0"],
     "invalid coordinator='h:99999'"),
    (["--coordinator", "h:1234"], "go together"),
    (["--num-processes", "2", "--process-id", "1"], "go together"),
])
def test_bad_process_flags_are_one_line_and_exit_2(flags, needle, tmp_path, capsys):
    from pamjax.cli import main

    try:
        status = main([*ARGS, "--out", str(tmp_path), *flags])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "sweep.csv").exists()


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
    columns, rows = sweep._read_existing(path, rows_per_config=2)
    assert columns == ["system", "overrides", "batch", "seed", "slo_ms"]
    assert [(r["system"], r["slo_ms"]) for r in rows] == [("pam", "100.0"), ("pam", "150.0")]
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
