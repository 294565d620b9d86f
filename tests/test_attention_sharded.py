"""pam_attention with the tier axis sharded over a device mesh equals the unsharded result.

The 4-device case runs ``tests/_sharded_attention_check.py`` in a subprocess, because the number
of host CPU devices (``--xla_force_host_platform_device_count``) is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from pamjax.attention import pam_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_sharded_attention_check.py"


def test_sharded_over_four_host_devices_equals_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["config_error"], "num_tiers=3 on a 2-device mesh must raise ConfigError"
    assert len(result["cases"]) == 3
    for case in result["cases"]:
        assert case["max_abs_diff"] <= 1e-6, case
        assert case["finite"] and case["empty_row_zero"] and case["uses_collectives"], case


def test_single_device_mesh_equals_unsharded():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 30, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 30, 2, 8)).astype(np.float32)
    tier = rng.integers(0, 2, size=(2, 30)).astype(np.int32)
    mesh = Mesh(np.array(jax.devices()[:1]), ("tiers",))
    attend = jax.jit(pam_attention, static_argnames=("num_tiers", "mesh"))
    sharded = attend(q, k, v, tier, num_tiers=2, mesh=mesh)
    unsharded = attend(q, k, v, tier, num_tiers=2)
    np.testing.assert_allclose(sharded, unsharded, atol=1e-6, rtol=1e-6)
