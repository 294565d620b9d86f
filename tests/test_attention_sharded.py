"""pam_attention with the tier axis sharded over a device mesh equals the unsharded result.

The 4-device cases (every mesh form: ``Mesh`` by hand, :func:`jax.make_mesh` with ``Explicit``
or ``Auto`` axes, a tier axis inside a 2-D mesh, calls under ``jax.set_mesh``) run in one
subprocess, ``tests/_sharded_attention_check.py``, because the number of host CPU devices
(``--xla_force_host_platform_device_count``) is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from pamjax.attention import pam_attention
from pamjax.errors import ConfigError

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
    names = {case["name"] for case in result["cases"]}
    # one case per mesh form a user can build (see the script for the list)
    assert len(names) == len(result["cases"]) == 10, names
    for case in result["cases"]:
        assert case["max_abs_diff"] <= 1e-6, case
        assert case["max_abs_diff_dot_product_attention"] <= 1e-6, case
        assert case["finite"] and case["empty_row_zero"], case
        assert case["uses_collectives"] is not False, case
    assert result["errors"] == {
        "num_tiers not divisible by the axis size": "num_tiers",
        "num_tiers not divisible by the named axis size": "num_tiers",
        "no axis of that name": "tier_axis",
        "mesh differs from the context mesh": "mesh",
    }


def _one_device_mesh(name: str, axis_type: AxisType = AxisType.Auto) -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), (name,), axis_types=(axis_type,))


def _small_inputs():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 30, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 30, 2, 8)).astype(np.float32)
    tier = rng.integers(0, 2, size=(2, 30)).astype(np.int32)
    return q, k, v, tier


@pytest.mark.parametrize(
    "make_mesh",
    [
        lambda: _one_device_mesh("tiers"),
        # jax.make_mesh gives Explicit axes, whose shard_map inputs must carry the in_specs
        lambda: jax.make_mesh((1,), ("tier",), devices=jax.devices()[:1]),
    ],
    ids=["Mesh", "make_mesh"],
)
def test_single_device_mesh_equals_unsharded(make_mesh):
    q, k, v, tier = _small_inputs()
    attend = jax.jit(pam_attention, static_argnames=("num_tiers", "mesh"))
    sharded = attend(q, k, v, tier, num_tiers=2, mesh=make_mesh())
    unsharded = attend(q, k, v, tier, num_tiers=2)
    np.testing.assert_allclose(sharded, unsharded, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (lambda: {"tier_axis": "tier"}, "tier_axis"),
        (lambda: {"mesh": "tier"}, "mesh"),
        (lambda: {"mesh": _one_device_mesh("data"), "tier_axis": "tier"}, "tier_axis"),
        (lambda: {"mesh": _one_device_mesh("tier", AxisType.Manual)}, "mesh"),
    ],
    ids=["tier_axis without mesh", "not a Mesh", "no such axis", "Manual axis"],
)
def test_bad_mesh_raises_config_error(kwargs, field):
    q, k, v, tier = _small_inputs()
    with pytest.raises(ConfigError) as err:
        pam_attention(q, k, v, tier, num_tiers=2, **kwargs())
    assert err.value.field == field
    assert repr(err.value.value) in str(err.value)
