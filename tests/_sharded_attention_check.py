"""Check ``pam_attention(..., mesh=...)`` against the unsharded result on 4 host CPU devices.

Run by ``tests/test_attention_sharded.py`` in a subprocess whose environment sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and ``JAX_PLATFORMS=cpu`` (the device
count is fixed when JAX starts, hence the separate process). Every mesh form a user can build
is tried in this one process: ``Mesh`` by hand (``Auto`` axes), :func:`jax.make_mesh`
(``Explicit`` axes by default, or ``Auto``), the tier axis inside a 2-D mesh, and calls under
``with jax.set_mesh(mesh)`` with inputs sharded over the mesh. Prints one JSON line
``{"devices": ..., "cases": [...], "errors": {...}}`` and exits non-zero on failure.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

from pamjax.attention import pam_attention
from pamjax.errors import ConfigError

TOLERANCE = 1e-6  # float32 summation order differs between psum and a local reduction
NUM_TIERS = 4

attend = jax.jit(
    pam_attention, static_argnames=("num_tiers", "blocks_per_tier", "mesh", "tier_axis")
)


def make_inputs(seed: int = 0):
    """GQA inputs (Hq = 4·Hkv) with one row attending nothing and one tier holding no token."""
    rng = np.random.default_rng(seed)
    b, n, hkv, group, d = 4, 80, 2, 4, 16
    q = rng.normal(size=(b, hkv * group, d)).astype(np.float32)
    k = rng.normal(size=(b, n, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, n, hkv, d)).astype(np.float32)
    tier = rng.integers(0, NUM_TIERS - 1, size=(b, n)).astype(np.int32)  # last tier empty
    valid = rng.random((b, n)) < 0.6
    valid[1] = False
    return q, k, v, tier, valid


def compare(name: str, out, unsharded: np.ndarray, reference: np.ndarray, lowered) -> dict:
    """One case's result against pamjax's unsharded path and jax.nn.dot_product_attention."""
    out = np.asarray(out)
    attended = [0, 2, 3]  # row 1 attends nothing: dot_product_attention has no answer for it
    diff = float(np.abs(out - unsharded).max())
    diff_ref = float(np.abs(out[attended] - reference[attended]).max())
    uses_collectives = None if lowered is None else "all_reduce" in lowered.as_text()
    finite = bool(np.isfinite(out).all())
    return {
        "name": name,
        "max_abs_diff": diff,
        "max_abs_diff_dot_product_attention": diff_ref,
        "finite": finite,
        "empty_row_zero": bool((out[1] == 0).all()),
        "uses_collectives": uses_collectives,
        "ok": diff <= TOLERANCE
        and diff_ref <= TOLERANCE
        and finite
        and uses_collectives is not False,
    }


def mesh_forms(devices: np.ndarray) -> list[tuple[str, Mesh, str | None]]:
    """(name, mesh, tier_axis) for every way of building a mesh that pam_attention accepts."""
    auto, explicit = AxisType.Auto, AxisType.Explicit
    return [
        ("Mesh by hand, 4 devices", Mesh(devices[:4], ("tiers",)), None),
        ("Mesh by hand, 2-device sub-mesh", Mesh(devices[:2], ("tiers",)), None),
        ("Mesh by hand 2x2, first axis", Mesh(devices.reshape(2, 2), ("tiers", "replica")), None),
        ("make_mesh (4,), Explicit axes", jax.make_mesh((4,), ("tier",)), None),
        ("make_mesh (4,), Auto axes", jax.make_mesh((4,), ("tier",), axis_types=(auto,)), None),
        ("make_mesh (data, tier) 1x4", jax.make_mesh((1, 4), ("data", "tier")), "tier"),
        ("make_mesh (data, tier) 2x2", jax.make_mesh((2, 2), ("data", "tier")), "tier"),
        (
            "make_mesh (data, tier) 2x2, Explicit data, Auto tier",
            jax.make_mesh((2, 2), ("data", "tier"), axis_types=(explicit, auto)),
            "tier",
        ),
    ]


def context_cases(inputs, unsharded, reference) -> list[dict]:
    """Calls under ``with jax.set_mesh(mesh)``, inputs sharded over the batch and token axes."""
    q, k, v, tier, valid = inputs
    mesh = jax.make_mesh((2, 2), ("data", "tier"))
    with jax.set_mesh(mesh):
        by_request = PartitionSpec("data")
        by_token = PartitionSpec("data", "tier")  # tokens spread over the tier devices
        sharded = (
            jax.device_put(q, by_request),
            *(jax.device_put(x, by_token) for x in (k, v, tier, valid)),
        )
        q_s, k_s, v_s, tier_s, valid_s = sharded
        args = (q_s, k_s, v_s, tier_s)
        kwargs = {"num_tiers": NUM_TIERS, "valid": valid_s}
        on_mesh = {**kwargs, "mesh": mesh, "tier_axis": "tier"}
        return [
            compare(
                "set_mesh 2x2 Explicit, sharded inputs",
                attend(*args, **on_mesh),
                unsharded,
                reference,
                attend.lower(*args, **on_mesh),
            ),
            compare(
                "set_mesh 2x2 Explicit, sharded inputs, mesh=None",
                attend(*args, **kwargs),
                unsharded,
                reference,
                None,
            ),
        ]


# Bad meshes and the ConfigError field each must name.
EXPECTED_ERRORS = {
    "num_tiers not divisible by the axis size": "num_tiers",
    "num_tiers not divisible by the named axis size": "num_tiers",
    "no axis of that name": "tier_axis",
    "mesh differs from the context mesh": "mesh",
}


def error_fields(devices: np.ndarray, inputs) -> dict:
    """Bad meshes: the ConfigError field each raises (or the exception type, if another)."""
    q, k, v, tier, valid = inputs
    two_d = jax.make_mesh((1, 4), ("data", "tier"))
    bad = {
        "num_tiers not divisible by the axis size": (
            {"num_tiers": 3, "mesh": Mesh(devices[:2], ("tiers",))},
            None,
        ),
        "num_tiers not divisible by the named axis size": (
            {"num_tiers": 6, "mesh": two_d, "tier_axis": "tier"},
            None,
        ),
        "no axis of that name": ({"num_tiers": 4, "mesh": two_d, "tier_axis": "tiers"}, None),
        "mesh differs from the context mesh": (
            {"num_tiers": 4, "mesh": jax.make_mesh((4,), ("tier",))},
            two_d,
        ),
    }
    fields = {}
    for name, (kwargs, context) in bad.items():
        try:
            if context is None:
                pam_attention(q, k, v, tier, valid=valid, **kwargs)
            else:
                with jax.set_mesh(context):
                    pam_attention(q, k, v, tier, valid=valid, **kwargs)
            fields[name] = None
        except ConfigError as err:
            fields[name] = err.field
        except Exception as err:  # noqa: BLE001 - reported, and the test fails on it
            fields[name] = type(err).__name__
    return fields


def main() -> int:
    devices = np.array(jax.devices())
    if devices.size < 4:
        print(json.dumps({"devices": int(devices.size), "cases": [], "errors": {}}))
        return 1
    devices = devices[:4]
    inputs = make_inputs()
    q, k, v, tier, valid = inputs
    unsharded = np.asarray(attend(q, k, v, tier, num_tiers=NUM_TIERS, valid=valid))
    reference = np.asarray(
        jax.nn.dot_product_attention(q[:, None], k, v, mask=valid[:, None, None, :])[:, 0]
    )
    cases = []
    for name, mesh, tier_axis in mesh_forms(devices):
        kwargs = {"num_tiers": NUM_TIERS, "valid": valid, "mesh": mesh, "tier_axis": tier_axis}
        out = attend(q, k, v, tier, **kwargs)
        cases.append(
            compare(name, out, unsharded, reference, attend.lower(q, k, v, tier, **kwargs))
        )
    cases += context_cases(inputs, unsharded, reference)
    errors = error_fields(devices, inputs)
    print(json.dumps({"devices": int(devices.size), "cases": cases, "errors": errors}))
    ok = all(c["ok"] for c in cases) and errors == EXPECTED_ERRORS
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
