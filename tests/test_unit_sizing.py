"""The unit axis sized to the live requests (engine.relay_units, simulation.UnitSizer)
changes no result: the same step metrics and final state as the config's full U, up to the
float32 summation order of row sums over U (attention-mass normalisation, hence the
importance EMA, and the selected-mass diagnostic), which XLA picks by U."""

import dataclasses

import jax
import numpy as np

from pamjax import engine, simulation, systems
from pamjax.workload import Workload, synthetic

# The selected-mass diagnostic is a float32 sum over the whole [R, U] table, whose
# summation order follows U; every other metric is bit-identical on these cases.
_ROUNDED = {"selected_mass": 1e-6}


def _assert_same_metrics(a, b):
    for name in a.__dataclass_fields__:
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if name in _ROUNDED:
            np.testing.assert_allclose(y, x, rtol=_ROUNDED[name], err_msg=name)
        else:
            np.testing.assert_array_equal(y, x, err_msg=name)


def _case(system="pam", page=1, n=12, batch=6, seed=1):
    wl = synthetic("sharegpt", n, seed=seed)
    config = simulation.make_config(wl, batch, page_size=page,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params(system, "llama3-8b", max_batch=batch, page_size=page)
    return wl, config, params


def test_relaid_rollout_equals_full_rollout():
    # The config's U exceeds what the requests need (as when a longer request comes later);
    # the rollout on the power-of-two U the sizer would pick gives the same trajectory and,
    # on every existing unit, the same state (importance to float32 summation order).
    wl, full_config, params = _case(page=4)
    need = full_config.units_per_slot
    config = dataclasses.replace(full_config, units_per_slot=need + 300)
    fitted = dataclasses.replace(config, units_per_slot=1 << (need - 1).bit_length())
    assert need <= fitted.units_per_slot < config.units_per_slot
    dev = simulation.device_workload(wl)
    full_state, full = engine.rollout_jit(config, params, engine.init_state(config, 2), dev, 60)
    state = engine.relay_units(engine.init_state(config, 2), fitted.units_per_slot)
    fit_state, metrics = engine.rollout_jit(fitted, params, state, dev, 60)
    _assert_same_metrics(jax.device_get(full), jax.device_get(metrics))
    back = jax.device_get(engine.relay_units(fit_state, config.units_per_slot))
    full_state = jax.device_get(full_state)
    present = full_state.unit_tier >= 0
    assert present.any()
    for name in engine.UNIT_FIELDS:  # stale latents of absent columns may differ
        np.testing.assert_allclose(getattr(back, name)[present],
                                   getattr(full_state, name)[present], err_msg=name,
                                   rtol=1e-6 if name == "unit_importance" else 0)
    np.testing.assert_array_equal(back.unit_tier, full_state.unit_tier)
    for name in ("slot_request", "slot_context", "req_status", "req_finish_s", "clock_whole",
                 "clock_frac"):
        np.testing.assert_array_equal(getattr(back, name), getattr(full_state, name))


def test_fitted_run_equals_full_run():
    wl, config, params = _case(system="pam", page=2, n=16, batch=4)
    full = simulation.run(params, wl, config, timeline=True, fit_units=False,
                          chunk_steps=64)
    fitted = simulation.run(params, wl, config, timeline=True, fit_units=True,
                            chunk_steps=64)
    assert fitted.unit_sizes and max(fitted.unit_sizes) <= config.units_per_slot
    assert full.unit_sizes == ()
    _assert_same_metrics(full.metrics, fitted.metrics)
    np.testing.assert_array_equal(fitted.state.unit_tier, full.state.unit_tier)
    np.testing.assert_array_equal(fitted.state.req_finish_s, full.state.req_finish_s)


def test_look_ahead_overrun_reruns_the_chunk_at_full_size():
    # Two slots, so the look-ahead is 4 requests: eleven short requests waiting at t = 0
    # and one long one behind them are all admitted within one chunk, past the look-ahead;
    # the chunk must be rerun at the full U (else the long request would be rejected).
    prompts = np.array([8] * 11 + [900])
    wl = Workload(np.zeros(12), prompts, np.full(12, 3), name="overrun")
    config = simulation.make_config(wl, 2, page_size=1,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params("pam", "llama3-8b", max_batch=2, page_size=1)
    full = simulation.run(params, wl, config, timeline=True, fit_units=False, chunk_steps=64)
    fitted = simulation.run(params, wl, config, timeline=True, fit_units=True,
                            chunk_steps=64)
    assert config.units_per_slot in fitted.unit_sizes
    assert min(fitted.unit_sizes) < config.units_per_slot
    assert fitted.summary["requests_finished"] == 12
    _assert_same_metrics(full.metrics, fitted.metrics)
