"""Check ``pam_attention(..., mesh=...)`` against the unsharded result on 4 host CPU devices.

Run by ``tests/test_attention_sharded.py`` in a subprocess whose environment sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and ``JAX_PLATFORMS=cpu`` (the device
count is fixed when JAX starts, hence the separate process). Prints one JSON line
``{"devices": ..., "cases": [...], "config_error": ...}`` and exits non-zero on failure.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from pamjax.attention import pam_attention
from pamjax.errors import ConfigError

TOLERANCE = 1e-6  # float32 summation order differs between psum and a local reduction

attend = jax.jit(pam_attention, static_argnames=("num_tiers", "blocks_per_tier", "mesh"))


def make_inputs(seed: int, num_tiers: int):
    """GQA inputs (Hq = 4·Hkv) with one row attending nothing and one tier holding no token."""
    rng = np.random.default_rng(seed)
    b, n, hkv, group, d = 3, 80, 2, 4, 16
    q = rng.normal(size=(b, hkv * group, d)).astype(np.float32)
    k = rng.normal(size=(b, n, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, n, hkv, d)).astype(np.float32)
    tier = rng.integers(0, num_tiers - 1, size=(b, n)).astype(np.int32)  # last tier empty
    valid = rng.random((b, n)) < 0.6
    valid[1] = False
    return q, k, v, tier, valid


def run_case(name: str, mesh: Mesh, num_tiers: int, seed: int) -> dict:
    q, k, v, tier, valid = make_inputs(seed, num_tiers)
    unsharded = np.asarray(attend(q, k, v, tier, num_tiers=num_tiers, valid=valid))
    sharded = np.asarray(attend(q, k, v, tier, num_tiers=num_tiers, valid=valid, mesh=mesh))
    lowered = attend.lower(q, k, v, tier, num_tiers=num_tiers, valid=valid, mesh=mesh)
    diff = float(np.abs(sharded - unsharded).max())
    return {
        "name": name,
        "max_abs_diff": diff,
        "finite": bool(np.isfinite(sharded).all()),
        "empty_row_zero": bool((sharded[1] == 0).all()),
        "uses_collectives": "all_reduce" in lowered.as_text(),
        "ok": diff <= TOLERANCE and bool(np.isfinite(sharded).all()),
    }


def main() -> int:
    devices = np.array(jax.devices())
    if devices.size < 4:
        print(json.dumps({"devices": int(devices.size), "cases": [], "config_error": False}))
        return 1
    meshes = [
        ("4 tiers on 4 devices", Mesh(devices[:4], ("tiers",)), 4),
        ("4 tiers on a 2-device sub-mesh", Mesh(devices[:2], ("tiers",)), 4),
        ("4 tiers on a 2x2 mesh", Mesh(devices[:4].reshape(2, 2), ("tiers", "replica")), 4),
    ]
    cases = [run_case(name, mesh, t, seed) for seed, (name, mesh, t) in enumerate(meshes)]
    q, k, v, tier, valid = make_inputs(0, 3)
    try:
        pam_attention(q, k, v, tier, num_tiers=3, valid=valid, mesh=meshes[1][1])
        config_error = False
    except ConfigError:
        config_error = True
    print(json.dumps({"devices": int(devices.size), "cases": cases, "config_error": config_error}))
    ok = config_error and all(c["ok"] and c["uses_collectives"] for c in cases)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
