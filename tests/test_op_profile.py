"""experiments/op_profile.py's two pieces: exclusive times from nested trace events (checked
by hand), and operation -> shape and source from a compiled module's HLO."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp

PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "op_profile.py"
spec = importlib.util.spec_from_file_location("op_profile", PATH)
op_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(op_profile)


def _event(name, start, duration, thread=1):
    return {"ph": "X", "name": name, "ts": start, "dur": duration, "tid": thread}


def test_nested_operations_are_subtracted_from_their_parent():
    # A cond [0, 100) holding a [10, 40) and b [50, 70); c on another thread overlaps it;
    # d is not an operation of the module (ignored).
    events = [_event("cond", 0, 100), _event("a", 10, 30), _event("b", 50, 20),
              _event("c", 20, 60, thread=2), _event("d", 0, 500),
              _event("a", 200, 5)]
    time_us, calls = op_profile.exclusive_times(events, {"cond", "a", "b", "c"})
    assert dict(time_us) == {"cond": 100 - 30 - 20, "a": 30 + 5, "b": 20, "c": 60}
    assert calls["a"] == 2 and calls["cond"] == 1


def _kernel(x):
    return jnp.cumsum(jnp.exp(x) * 3.0, axis=-1)


def test_operations_are_named_with_their_shape_and_source():
    hlo = jax.jit(_kernel).lower(jnp.ones((4, 8))).compile().as_text()
    operations = op_profile.hlo_operations(hlo)
    described = [text for text in operations.values() if "f32[4,8]" in text]
    assert described
    assert any("test_op_profile.py" in text and "_kernel" in text for text in described)
