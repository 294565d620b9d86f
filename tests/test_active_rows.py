"""Skipping idle work (EngineConfig.skip_idle, active_rows.py) changes no schedule: every
integer and boolean result and the clock are the same bit for bit, other float32 values
within their last bits (XLA may compile a phase on fewer rows with different fusions).

The per-request phases run on the decoding rows alone, gathered into the smallest bucket
that holds them; prompt placement runs only in steps that admit. Counterfactual for the
helper: a phase that is *not* row-wise (it mixes rows) gives a different answer when
compacted, so the trajectory checks below could fail."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import active_rows, engine, placement, simulation, systems
from pamjax._numerics import tier_units
from pamjax.batching import units_needed
from pamjax.errors import ConfigError
from pamjax.testing import schedule_difference
from pamjax.workload import Workload, synthetic


def test_buckets_are_powers_of_two_then_all_rows():
    assert active_rows.row_buckets(64) == (4, 8, 16, 32, 64)
    assert active_rows.row_buckets(12) == (4, 8, 12)
    assert active_rows.row_buckets(3) == (3,)


@pytest.mark.parametrize("count", [0, 1, 4, 5, 9, 17, 24])
def test_a_row_wise_phase_on_active_rows_equals_it_on_all_rows(count):
    rng = np.random.default_rng(count)
    rows, units = 24, 37
    values = jnp.asarray(rng.normal(size=(rows, units)).astype(np.float32))
    scale = jnp.asarray(rng.uniform(1, 2, size=rows).astype(np.float32))
    active = jnp.asarray(rng.permutation(rows) < count)

    def phase(xs):  # row sums, softmax and a per-row scale: row-wise, float reductions
        v, s, on = xs  # as the contract asks, rows that are off give the inactive values
        return (jnp.where(on[:, None], jax.nn.softmax(v * s[:, None], axis=-1), 0.0),
                jnp.where(on, jnp.sum(v, -1), -1.0))

    inactive = (jnp.zeros((rows, units)), jnp.full(rows, -1.0))
    got = jax.jit(lambda a, xs: active_rows.on_active_rows(a, phase, xs, inactive))(
        active, (values, scale, active))
    full = jax.jit(phase)((values, scale, active))  # compiled, as the engine's phases are
    for g, f in zip(got, full):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(f))


def test_a_phase_that_mixes_rows_is_not_reproduced():
    # The counterfactual: the helper's contract (row-wise phases) is what makes it exact.
    values = jnp.arange(8.0)[:, None] * jnp.ones((8, 3))
    active = jnp.arange(8) < 3

    def mixing(v):
        return v - jnp.mean(v, 0, keepdims=True)

    got = active_rows.on_active_rows(active, mixing, values, jnp.zeros((8, 3)))
    assert not np.array_equal(np.asarray(got)[:3], np.asarray(mixing(values))[:3])


@pytest.mark.parametrize("active_rows_at", [(0, 5, 11), (11,), (2, 3, 4, 5, 6, 11),
                                            (3, 7, 8, 9, 10, 11)])
def test_a_phase_that_allocates_in_row_order_is_reproduced(active_rows_at):
    # Prompt placement grants capacity to the rows in order, and its second round reads
    # what the first granted in all (placement.prompt_tier_counts): compacted, the active
    # rows keep their order and the padding rows are inactive ones, which ask for nothing.
    # The last row is active in every case: padding rows that copied it (as before) would
    # take capacity and change the totals (the counterfactual, asserted below).
    rows = 12
    active = jnp.asarray(np.isin(np.arange(rows), active_rows_at))
    demand = jnp.asarray(np.random.default_rng(len(active_rows_at)).integers(1, 9, rows))

    def allocate(xs):
        want, on = xs
        want = jnp.where(on, want, 0)
        first = placement.allocate_in_order(want, 100)  # room for every demand
        return first, jnp.where(on, 100 - jnp.sum(first), 0)

    inactive = (jnp.zeros(rows, jnp.int32), jnp.zeros(rows, jnp.int32))
    got = jax.jit(lambda a, xs: active_rows.on_active_rows(a, allocate, xs, inactive))(
        active, (demand, active))
    full = allocate((demand, active))
    for g, f in zip(got, full):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(f))
    copied = allocate((jnp.concatenate([demand[jnp.asarray(active_rows_at)], demand[-1:]]),
                       jnp.ones(len(active_rows_at) + 1, bool)))
    assert int(copied[1][0]) != int(full[1][active_rows_at[0]])


def _trajectory(config, params, workload, chunks, steps):
    dev = simulation.device_workload(workload)
    state, out = engine.init_state(config, 3), []
    for _ in range(chunks):
        state, metrics = engine.rollout_jit(config, params, state, dev, steps)
        out.append(jax.device_get(metrics))
    return jax.device_get(state), out


def _assert_same_run(fast, plain):
    """The same schedule (every integer and boolean of the final state and of every step's
    metrics, and the clock, bit for bit); other float32 values within their last bits."""
    pairs = [(fast[0], plain[0])] + list(zip(fast[1], plain[1]))
    for a, b in pairs:
        diff = schedule_difference(a, b)
        assert diff["schedule_fields"] == []
        assert diff["float_max_relative"] < 1e-6


@pytest.mark.parametrize("system,page", [("pam", 1), ("pam", 16), ("ls-pim", 1)])
def test_skipping_idle_work_gives_the_same_schedule(system, page):
    # Arrivals spread so the number of running requests moves through several buckets
    # (1 to 12 of 12 slots), with admissions in some steps and not in others.
    workload = synthetic("sharegpt", 40, seed=5, rate_per_s=40.0)
    config = simulation.make_config(workload, 12, page_size=page,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params(system, "llama3-8b", max_batch=12, page_size=page)
    assert config.skip_idle  # the default
    fast = _trajectory(config, params, workload, 3, 96)
    plain = _trajectory(dataclasses.replace(config, skip_idle=False), params, workload, 3, 96)
    running = np.concatenate([m.decode_requests for m in fast[1]])
    assert running.min() < 4 and running.max() > 8  # buckets 4, 8 and all rows were used
    assert np.concatenate([m.prefill_requests for m in fast[1]]).sum() > 10
    if system == "pam":
        assert np.concatenate([m.migrated_units for m in fast[1]]).sum() > 0
    _assert_same_run(fast, plain)


def test_skip_idle_must_be_a_bool():
    config = simulation.make_config(synthetic("sharegpt", 2, seed=0), 2)
    with pytest.raises(ConfigError, match="skip_idle"):
        dataclasses.replace(config, skip_idle=1)


def test_a_learned_placement_score_on_the_decoding_rows_gives_the_same_schedule():
    # The scheduler's hook sees its rows' slice of the LifetimeView (prompt, generated) and
    # the system-wide fields whole; a random non-zero network, so the score decides things.
    from pamjax.learn import policy

    workload = synthetic("sharegpt", 40, seed=5, rate_per_s=40.0)
    hook = policy.net_engine_hook(hidden=8, depth=2, page_size=1)
    config = simulation.make_config(workload, 12, page_size=1, placement_score=hook,
                                    padded_bank_groups=systems.max_bank_groups())
    net = policy.init_net(jax.random.PRNGKey(0), hidden=8, predictor=policy.fit_length_predictor(
        workload.prompt_tokens, workload.output_tokens))
    head = net.net["params"]["Dense_2"]
    kernel = 3.0 * jax.random.normal(jax.random.PRNGKey(1), head["kernel"].shape)
    net = net.replace(net={"params": dict(net.net["params"], Dense_2=dict(head, kernel=kernel))})
    params = systems.make_params("pam", "llama3-8b", max_batch=12, page_size=1).replace(
        policy=net)
    fast = _trajectory(config, params, workload, 2, 96)
    plain = _trajectory(dataclasses.replace(config, skip_idle=False), params, workload, 2, 96)
    assert np.concatenate([m.migrated_units for m in fast[1]]).sum() > 0
    _assert_same_run(fast, plain)


def _columns_case(seed, narrow_rows, wide_rows, rows=24, units=40, width=16):
    """Rows with a need of at most ``width`` columns or above it, the rest inactive; integer
    tables (every sum is exact, so narrow and full results must agree bit for bit)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows)
    active = np.zeros(rows, bool)
    active[order[:narrow_rows + wide_rows]] = True
    need = np.where(np.isin(np.arange(rows), order[:narrow_rows]),
                    rng.integers(1, width + 1, rows), rng.integers(width + 1, units + 1, rows))
    values = rng.integers(-50, 50, (rows, units)).astype(np.int32)
    return (jnp.asarray(active), jnp.asarray(need.astype(np.int32)), jnp.asarray(values),
            width)


def _present_prefix_sums(xs):
    """A width-generic row-wise phase that gives 0 (its inactive value) past a row's need:
    prefix sums of the row's present columns, and the row's total (-1 on inactive rows)."""
    values, need, on = xs
    present = on[:, None] & (jnp.arange(values.shape[-1])[None, :] < need[:, None])
    kept = jnp.where(present, values, 0)
    return jnp.where(present, jnp.cumsum(kept, -1), 0), jnp.where(on, jnp.sum(kept, -1), -1)


@pytest.mark.parametrize("narrow_rows,wide_rows", [(0, 0), (7, 0), (0, 3), (9, 2), (5, 4),
                                                   (6, 5), (10, 14)])
def test_narrow_columns_give_what_all_columns_give(narrow_rows, wide_rows):
    # Wide rows within the wide bucket (WIDE_BUCKETS = 4) and beyond it (all rows run wide).
    active, need, values, width = _columns_case(narrow_rows, narrow_rows, wide_rows)
    columns = active_rows.Columns(width=width, need=need, tables_in=(True, False, False),
                                  tables_out=(True, False))
    rows, units = values.shape
    inactive = (jnp.zeros((rows, units), jnp.int32), jnp.full(rows, -1, jnp.int32))
    got = jax.jit(lambda a, xs: active_rows.on_active_rows(
        a, _present_prefix_sums, xs, inactive, columns))(active, (values, need, active))
    full = _present_prefix_sums((values, need, active))
    for g, f in zip(got, full):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(f))


def test_a_phase_that_writes_past_a_rows_need_is_not_reproduced():
    # The counterfactual: a phase that changes columns past the row's need breaks the
    # contract, and the narrow rows keep ``inactive`` there instead of its values.
    active, need, values, width = _columns_case(0, 6, 2)

    def spills(xs):
        values, _, on = xs
        return jnp.where(on[:, None], values + 1, 0), jnp.where(on, 0, -1)

    columns = active_rows.Columns(width=width, need=need, tables_in=(True, False, False),
                                  tables_out=(True, False))
    rows, units = values.shape
    inactive = (jnp.zeros((rows, units), jnp.int32), jnp.full(rows, -1, jnp.int32))
    got = active_rows.on_active_rows(active, spills, (values, need, active), inactive, columns)
    full = spills((values, need, active))
    narrow = np.asarray(active & (need <= width))
    assert not np.array_equal(np.asarray(got[0])[narrow], np.asarray(full[0])[narrow])
    np.testing.assert_array_equal(np.asarray(got[0])[narrow][:, width:], 0)


def test_narrow_columns_in_the_engine_give_the_same_schedule():
    # Contexts of 18 to 1,117 tokens against narrow columns of 128: over the run some steps
    # have a few rows wider than the columns (their own bucket) and some more than the wide
    # bucket holds (all rows on all columns), beside narrow ones.
    workload = synthetic("sharegpt", 40, seed=5, rate_per_s=40.0)
    config = simulation.make_config(workload, 12, page_size=1, narrow_units=128,
                                    padded_bank_groups=systems.max_bank_groups())
    params = systems.make_params("pam", "llama3-8b", max_batch=12, page_size=1)
    dev = simulation.device_workload(workload)
    runs, wide_counts = {}, []
    for width in (128, 0):
        config = dataclasses.replace(config, narrow_units=width)
        state, out = engine.init_state(config, 3), []
        for _ in range(9):
            state, metrics = engine.rollout_jit(config, params, state, dev, 32)
            out.append(jax.device_get(metrics))
            if width:
                running = np.asarray(state.slot_request) >= 0
                wide_counts.append((int(np.sum(running & (np.asarray(state.slot_context) > 128))),
                                    int(np.sum(running))))
                _assert_units_within_contexts(config, state)
        runs[width] = (jax.device_get(state), out)
    assert any(0 < wide <= active_rows.WIDE_BUCKETS and wide < running
               for wide, running in wide_counts)
    assert any(wide > active_rows.WIDE_BUCKETS for wide, _ in wide_counts)
    assert np.concatenate([m.migrated_units for m in runs[128][1]]).sum() > 0
    _assert_same_run(runs[128], runs[0])


def _assert_units_within_contexts(config, state):
    """What placement.held_units relies on: no slot holds a unit past its context's units
    (a free slot none), so counting the occupied rows' own columns counts every unit."""
    tier = np.asarray(state.unit_tier)
    need = np.where(np.asarray(state.slot_request) >= 0,
                    units_needed(np.asarray(state.slot_context), config.page_size), 0)
    assert np.all(tier[np.arange(tier.shape[1])[None, :] >= need[:, None]] == -1)
    held = jax.jit(placement.held_units, static_argnums=0)(config, state)
    np.testing.assert_array_equal(np.asarray(held), np.asarray(tier_units(state.unit_tier)))


def test_held_units_miss_a_unit_past_its_slots_context():
    # The counterfactual of the invariant above: a unit where a slot's context does not
    # reach is not counted on the narrow columns.
    workload = synthetic("sharegpt", 4, seed=5)
    config = simulation.make_config(workload, 4, page_size=1, narrow_units=64)
    state = engine.init_state(config, 0)
    state = state.replace(slot_request=state.slot_request.at[1].set(0),
                          slot_context=state.slot_context.at[1].set(10),
                          unit_tier=state.unit_tier.at[1, :10].set(0).at[1, 100].set(2))
    held = np.asarray(placement.held_units(config, state))
    np.testing.assert_array_equal(held, [10, 0, 0])
    np.testing.assert_array_equal(np.asarray(tier_units(state.unit_tier)), [10, 0, 1])


def test_narrow_units_follow_where_requests_spend_their_decode_steps():
    # Two requests decode 400 steps each at contexts 11..410, one 10 steps at 3,001..3,010:
    # 512 tokens hold 800 of the 810 steps (98.8% >= 97%), 256 hold 2 x 246 (61%).
    workload = Workload(arrival_s=np.zeros(3), prompt_tokens=np.array([10, 10, 3000]),
                        output_tokens=np.array([400, 400, 10]))
    assert simulation.narrow_units(workload, 1, 3010) == 512
    assert simulation.narrow_units(workload, 2, 1505) == 256  # the same tokens in 2-token units
    assert simulation.narrow_units(workload, 4, 753) == 0  # U below NARROW_MIN_UNITS
    assert simulation.make_config(workload, 3).narrow_units == 512
    # The counterfactual: longer second outputs move the steps past 512 tokens.
    longer = Workload(arrival_s=np.zeros(3), prompt_tokens=np.array([10, 10, 3000]),
                      output_tokens=np.array([400, 900, 10]))
    assert simulation.narrow_units(longer, 1, 3010) == 1024
    # No width of at most U / 2 holds 97%: off.
    spread = Workload(arrival_s=np.zeros(2), prompt_tokens=np.array([10, 3000]),
                      output_tokens=np.array([100, 100]))
    assert simulation.narrow_units(spread, 1, 3100) == 0
