"""Unit tests of pamjax.placement: each function against a case worked out by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import batching, engine, locality, placement, systems
from pamjax.types import (
    DDR,
    HBM,
    MAPPING_SEQUENTIAL,
    NO_UNIT,
    PLACEMENT_FASTEST_FIRST,
    PLACEMENT_IMPORTANCE_RATIO,
    SSD,
    EngineConfig,
)

ITERS = 30


def params_for(system="pam", **changes):
    params = systems.make_params(system, "llama3-8b", max_batch=4)
    return params.replace(**{k: jnp.asarray(v, getattr(params, k).dtype)
                             for k, v in changes.items()})


def test_allocate_in_order_grants_rows_in_turn():
    # 6 free units, demands 3, 2, 4: the first two rows get all, the third what is left.
    granted = placement.allocate_in_order(jnp.array([3, 2, 4]), jnp.int32(6))
    np.testing.assert_array_equal(granted, [3, 2, 1])
    np.testing.assert_array_equal(placement.allocate_in_order(jnp.array([1, 1]), jnp.int32(0)),
                                  [0, 0])


def test_prompt_tier_counts_spill_down_then_back_up():
    # Two prompts of 5 units: prompt 0 wants all 5 on HBM, prompt 1 wants 3 on SSD (and the
    # other 2 on DDR). SSD has only 2 free, so prompt 1's third SSD unit goes back up: to DDR
    # while DDR has room, else to HBM.
    demand = (jnp.array([5, 0]), jnp.array([0, 3]), jnp.array([5, 5]))
    hbm, ddr, ssd = placement.prompt_tier_counts(*demand, jnp.array([5, 3, 2]))
    np.testing.assert_array_equal(np.stack([hbm, ddr, ssd]), [[5, 0], [0, 3], [0, 2]])
    # DDR full after prompt 1's two units: the spilled unit climbs to HBM's last free unit.
    hbm, ddr, ssd = placement.prompt_tier_counts(*demand, jnp.array([6, 2, 2]))
    np.testing.assert_array_equal(np.stack([hbm, ddr, ssd]), [[5, 1], [0, 2], [0, 2]])


def test_initial_tiers_fastest_first_fills_in_position_order():
    params = params_for("ls-pim", placement_policy=PLACEMENT_FASTEST_FIRST)
    present = jnp.array([[True] * 5 + [False]])
    log_mass = jnp.array([[0.0, 5.0, 1.0, 4.0, 2.0, 0.0]])
    tier = placement.initial_tiers(params, log_mass, present, jnp.array([2, 2, 10]),
                                   placement.target_share(params), ITERS)
    np.testing.assert_array_equal(tier, [[HBM, HBM, DDR, DDR, SSD, NO_UNIT]])


def test_initial_tiers_importance_ratio_by_hand():
    # Masses 9, 4, 2, 1, 1 (total 17) and x:y:1 = 2:1:1: HBM wants the fewest most important
    # units covering 1/2 of the mass (8.5: the unit of mass 9); SSD takes the most least
    # important units staying below 1/4 (4.25: 1 + 1 + 2 = 4); DDR the rest (mass 4).
    # (No cumulative sum lands exactly on a share: at a tie the engine's float32 bisection
    # and the reference's float64 walk may differ by a unit, as reference.py says.)
    params = params_for("pam", placement_policy=PLACEMENT_IMPORTANCE_RATIO, target_x=2.0,
                        target_y=1.0)
    mass = np.array([9.0, 4.0, 2.0, 1.0, 1.0])
    order = np.array([2, 0, 4, 1, 3])  # positions: unit 2 holds mass 9, ...
    log_mass = np.zeros(5)
    log_mass[order] = np.log(mass)
    tier = placement.initial_tiers(params, jnp.asarray(log_mass[None], jnp.float32),
                                   jnp.ones((1, 5), bool), jnp.array([100, 100, 100]),
                                   placement.target_share(params), ITERS)
    expected = np.empty(5, int)
    expected[order] = [HBM, DDR, SSD, SSD, SSD]
    np.testing.assert_array_equal(tier[0], expected)


def test_fastest_free_tier():
    opens = jnp.array([True, False, True, True, True])
    tier = placement.fastest_free_tier(opens, jnp.array([1, 2, 9]))
    # Openings in row order: HBM (1 free), DDR, DDR, then SSD.
    np.testing.assert_array_equal(tier[np.asarray(opens)], [HBM, DDR, DDR, SSD])


def test_assign_bank_groups_greedy_and_sequential():
    order = jnp.array([[2, 0, 1, 3], [1, 0, 3, 2], [0, 1, 2, 3]], jnp.int32)
    tier = jnp.array([HBM, HBM, DDR, HBM, HBM], jnp.int8)
    is_new = jnp.array([True, True, True, False, True])
    request = jnp.array([0, 0, 1, 1, 2], jnp.int32)
    unit = jnp.array([0, 1, 0, 1, 5], jnp.int32)
    groups_per_tier = [4.0, 2.0, 4.0]
    greedy = placement.assign_bank_groups(
        params_for("pam", bank_groups_per_device=groups_per_tier), tier, is_new, order,
        request, unit, 1)
    # HBM's new units go round-robin over its order [2, 0, 1, 3]: rows 0, 1, 4 -> 2, 0, 1.
    # DDR (2 groups): its first new unit takes order[DDR][0] = 1.
    np.testing.assert_array_equal(np.asarray(greedy)[np.asarray(is_new)], [2, 0, 1, 1])
    start = np.asarray(placement.naive_start(request)).astype(np.int64)
    groups = np.array([4, 4, 2, 4, 4])
    # Sequential: runs of 2 units per bank group from the request's start group.
    sequential = placement.assign_bank_groups(
        params_for("ls-pim", bank_groups_per_device=groups_per_tier, naive_run_units=2,
                   mapping_policy=MAPPING_SEQUENTIAL), tier, is_new, order, request, unit, 1)
    np.testing.assert_array_equal(sequential, (start % groups + np.asarray(unit) // 2) % groups)
    # Striped (the baselines): token k on bank group start + k; a page of 4 tokens starts
    # 4 groups further per page.
    striped = placement.assign_bank_groups(
        params_for("ls-pim", bank_groups_per_device=groups_per_tier), tier, is_new, order,
        request, unit, 4)
    np.testing.assert_array_equal(striped, (start % groups + np.asarray(unit) * 4) % groups)


def test_spread_over_pages_matches_a_direct_loop():
    params = params_for("pam", bank_groups_per_device=[4.0, 3.0, 8.0])
    rng = np.random.default_rng(0)
    load = np.zeros((3, 8))
    load[0, :4] = rng.integers(0, 20, 4)
    load[1, :3] = rng.integers(0, 20, 3)
    load[2, :] = rng.integers(0, 20, 8)
    for page in (1, 2, 5, 16):
        spread = placement.spread_over_pages(params, jnp.asarray(load, jnp.float32), page)
        expected = np.zeros_like(load)
        for t, count in enumerate((4, 3, 8)):
            for g in range(count):
                for j in range(page):
                    expected[t, (g + j) % count] += load[t, g] / page
        np.testing.assert_allclose(spread, expected, rtol=1e-6)
    # The striped mapping spreads a page the same way; the sequential one keeps it whole.
    striped = params_for("ls-pim", bank_groups_per_device=[4.0, 3.0, 8.0])
    np.testing.assert_allclose(
        placement.spread_over_pages(striped, jnp.asarray(load, jnp.float32), 5),
        placement.spread_over_pages(params, jnp.asarray(load, jnp.float32), 5))
    sequential = params_for("ls-pim", bank_groups_per_device=[4.0, 3.0, 8.0],
                            mapping_policy=MAPPING_SEQUENTIAL)
    np.testing.assert_array_equal(
        placement.spread_over_pages(sequential, jnp.asarray(load, jnp.float32), 4), load)


def one_request_state(tiers, importance, config, slot_request=0, context=None):
    """An EngineState with one running request holding units on the given tiers."""
    state = engine.init_state(config)
    n = len(tiers)
    tier_row = np.full(config.units_per_slot, NO_UNIT)
    tier_row[:n] = tiers
    imp_row = np.zeros(config.units_per_slot, np.float32)
    imp_row[:n] = importance
    return state.replace(
        slot_request=state.slot_request.at[0].set(slot_request),
        slot_generated=state.slot_generated.at[0].set(2),
        slot_context=state.slot_context.at[0].set(n if context is None else context),
        unit_tier=state.unit_tier.at[0].set(jnp.asarray(tier_row, jnp.int8)),
        unit_importance=state.unit_importance.at[0].set(jnp.asarray(imp_row)))


@pytest.mark.parametrize("system, hbm_free, expected_new, expected_victim", [
    # PAM: HBM full; the least important HBM unit (index 1, importance 0.1) goes to DDR
    # and the new unit takes HBM.
    ("pam", 0, HBM, (1, DDR)),
    # PAM with room in HBM: the new unit goes there and nothing moves.
    ("pam", 1, HBM, None),
    # Fastest-free baseline with HBM full: the new unit goes to DDR, nothing moves.
    ("ls-pim", 0, DDR, None),
])
def test_place_new_units(system, hbm_free, expected_new, expected_victim):
    config = EngineConfig(num_slots=1, units_per_slot=8, num_requests=1, padded_bank_groups=4)
    tiers = [HBM, HBM, HBM, SSD]
    state = one_request_state(tiers, [0.5, 0.1, 0.3, 0.1], config)
    params = params_for(system, bank_groups_per_device=[4.0, 4.0, 4.0])
    capacity = jnp.array([3 + hbm_free, 10, 10], jnp.int32)
    token = batching.decode_token(config, state.slot_context, jnp.array([True]))
    assert bool(token.opens[0]) and int(token.unit[0]) == 4
    order = jnp.tile(jnp.arange(4, dtype=jnp.int32), (3, 1))
    after = placement.place_new_units(config, params, state, token, capacity, order)
    row = np.asarray(after.unit_tier[0])
    assert row[4] == expected_new
    expected = np.array(tiers + [expected_new] + [NO_UNIT] * 3)
    if expected_victim is not None:
        expected[expected_victim[0]] = expected_victim[1]
    np.testing.assert_array_equal(row, expected)
    # The new unit got its fresh latent draw.
    np.testing.assert_allclose(after.unit_latent[0, 4], locality.initial_latent(
        params, state.seed, jnp.int32(0), jnp.int32(4)))


def test_attention_load_counts_by_hand():
    # Two requests; tiers and bank groups chosen so every count is easy to read.
    config = EngineConfig(num_slots=2, units_per_slot=4, num_requests=2, padded_bank_groups=4,
                          page_size=2)
    state = engine.init_state(config)
    state = state.replace(
        unit_tier=jnp.array([[HBM, HBM, DDR, NO_UNIT], [HBM, SSD, SSD, SSD]], jnp.int8),
        unit_bank_group=jnp.array([[0, 1, 0, 0], [0, 2, 2, 3]], jnp.int16))
    tokens = jnp.array([[2, 2, 1, 0], [2, 2, 2, 2]], jnp.int32)
    selected = jnp.array([[True, False, True, False], [True, True, True, False]])
    attended = locality.Attention(tokens=tokens, present=tokens > 0, mass=jnp.zeros((2, 4)),
                                  selected=selected, selected_units=jnp.int32(5),
                                  persisted_units=jnp.int32(0),
                                  previously_selected_units=jnp.int32(0),
                                  selected_mass=jnp.float32(0))
    # Request 0's token landed in its unit 2 (DDR), request 1's in its unit 3 (SSD).
    token = batching.DecodeToken(context=jnp.array([5, 8]), opens=jnp.array([True, False]),
                                 unit=jnp.array([2, 3]), column=jnp.array([2, 4]),
                                 overflow=jnp.bool_(False))
    # A FlashDecoding chunk of 4 tokens = 2 units (page 2), no PAMattention.
    params = params_for("ls-pim", decode_split_tokens=4, use_pamattention=False)
    activation, load = placement.attention_load(config, params, state, attended, token)
    expected_bg = np.zeros((3, 4), int)
    expected_bg[HBM, 0] = 2 + 2  # request 0 unit 0, request 1 unit 0
    expected_bg[DDR, 0] = 1
    expected_bg[SSD, 2] = 2 + 2  # request 1 units 1 and 2 share bank group 2
    np.testing.assert_array_equal(load.bank_group_tokens, expected_bg)
    np.testing.assert_array_equal(load.tier_tokens, [2 + 2 + 2, 1, 6])
    np.testing.assert_array_equal(load.tier_holders, [2, 1, 1])
    np.testing.assert_array_equal(load.tier_requests, [2, 1, 1])
    # Partials: request 0 -> HBM bg 0, DDR bg 0; request 1 -> HBM bg 0, SSD bg 2.
    np.testing.assert_array_equal(load.active_bank_groups, [2, 1, 1])
    # Chunks (units 0-1, units 2-3): request 0 -> HBM chunk 0, DDR chunk 1; request 1 ->
    # HBM chunk 0, SSD chunks 0 (unit 1) and 1 (unit 2).
    np.testing.assert_array_equal(load.active_chunks, [2, 1, 2])
    # Top-k: the selector's target is ceil(1/8 x tokens) = 1 token per request (5 and 8
    # tokens): min(held, 1) on each tier holding KV.
    np.testing.assert_array_equal(load.topk_candidates, [2, 1, 1])
    np.testing.assert_array_equal(load.decode_writes, [0, 1, 1])
    units_row = np.zeros((3, 4), int)
    units_row[HBM, 0], units_row[DDR, 0], units_row[SSD, 2] = 2, 1, 2
    np.testing.assert_array_equal(activation[0], units_row)
    # With PAMattention the chunks are not counted (one partial per request and tier).
    pam = params_for("pam", decode_split_tokens=4)
    np.testing.assert_array_equal(
        placement.attention_load(config, pam, state, attended, token)[1].active_chunks,
        [0, 0, 0])
