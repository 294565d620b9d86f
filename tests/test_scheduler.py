"""Unit tests of pamjax.scheduler: PAM's two swap phases on cases worked out by hand."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pamjax import scheduler, systems
from pamjax.types import DDR, HBM, NO_UNIT, SSD


def params_for(x, y, budget):
    params = systems.make_params("pam", "llama3-8b", max_batch=4)
    return params.replace(target_x=jnp.float32(x), target_y=jnp.float32(y),
                          swap_budget=jnp.int32(budget))


def run(params, importance, tiers, max_swaps=8):
    importance = jnp.asarray([importance], jnp.float32)
    tier = jnp.asarray([tiers], jnp.int8)
    bank_group = jnp.arange(len(tiers), dtype=jnp.int16)[None]
    present = tier >= 0
    budget = jnp.full((1,), params.swap_budget, jnp.int32)  # pages per phase at page 1
    tier, bank_group, ds, hd = scheduler.schedule(params, importance, tier, bank_group,
                                                  present, max_swaps, budget)
    return np.asarray(tier[0]), np.asarray(bank_group[0]), int(ds[0]), int(hd[0])


def test_phase_one_promotes_the_important_ssd_units_to_ddr():
    # IS = HBM 0.5, DDR 0.1 + 0.05, SSD 0.2 + 0.15; x:y = 4:2 so x + y = 6.
    # Before: x* + y* = (0.5 + 0.15) / 0.35 = 1.86 < 6: swap least DDR (0.05) with most SSD
    # (0.2): IS_SSD = 0.2, IS_HBM + IS_DDR = 0.8, ratio 4 < 6: swap 0.1 with 0.15: IS_SSD =
    # 0.15, ratio 5.67 < 6 still, but DDR had only these two units: two swaps.
    importance = [0.5, 0.1, 0.05, 0.2, 0.15]
    tiers = [HBM, DDR, DDR, SSD, SSD]
    tier, bank_group, ds, hd = run(params_for(4.0, 2.0, 8), importance, tiers)
    assert ds == 2
    # Phase 2: IS_HBM / IS_DDR = 0.5 / 0.35 = 1.43 < 2: swap least HBM (0.5) with most DDR
    # (0.2)? Only if the DDR unit is more important: 0.2 < 0.5, so no swap.
    assert hd == 0
    np.testing.assert_array_equal(tier, [HBM, SSD, SSD, DDR, DDR])
    # Swapped units trade bank groups (occupancy per group is unchanged).
    # Pairs (unit 2, unit 3) and (unit 1, unit 4).
    np.testing.assert_array_equal(bank_group, [0, 4, 3, 2, 1])


def test_phase_two_stops_when_the_ratio_is_reached():
    # x:y = 3:1. HBM 0.1 + 0.05, DDR 0.4 + 0.3 + 0.15. IS_H / IS_D = 0.15 / 0.85 < 3.
    # Swap 1: HBM 0.05 <-> DDR 0.4: IS_H = 0.5, IS_D = 0.5, ratio 1 < 3.
    # Swap 2: HBM 0.1 <-> DDR 0.3: IS_H = 0.7, IS_D = 0.3, ratio 2.33 < 3.
    # IS_H / IS_D = 0.7 / 0.3 < 3 still, but HBM had only these two units: two swaps.
    tier, _, ds, hd = run(params_for(3.0, 1.0, 8), [0.1, 0.05, 0.4, 0.3, 0.15],
                          [HBM, HBM, DDR, DDR, DDR])
    assert (ds, hd) == (0, 2)
    np.testing.assert_array_equal(tier, [DDR, DDR, HBM, HBM, DDR])
    # With x:y = 1:1 the second swap is not needed (ratio 1 reached after the first).
    tier, _, _, hd = run(params_for(1.0, 1.0, 8), [0.1, 0.05, 0.4, 0.3, 0.15],
                         [HBM, HBM, DDR, DDR, DDR])
    assert hd == 1
    np.testing.assert_array_equal(tier, [HBM, DDR, HBM, DDR, DDR])


def test_budget_bounds_the_swaps_and_zero_budget_does_nothing():
    args = ([0.1, 0.05, 0.4, 0.3, 0.15], [HBM, HBM, DDR, DDR, DDR])
    assert run(params_for(3.0, 1.0, 1), *args)[3] == 1
    tier, _, ds, hd = run(params_for(3.0, 1.0, 0), *args)
    assert (ds, hd) == (0, 0)
    np.testing.assert_array_equal(tier, args[1])


def test_absent_units_never_move():
    tier, _, ds, hd = run(params_for(3.0, 1.0, 8), [0.1, 0.9, 0.0], [HBM, NO_UNIT, DDR])
    np.testing.assert_array_equal(tier, [HBM, NO_UNIT, DDR])
    assert (ds, hd) == (0, 0)


def test_tier_importance_sums_per_tier():
    share = scheduler.tier_importance(jnp.array([[0.5, 0.2, 0.2, 0.1]]),
                                      jnp.array([[HBM, DDR, HBM, NO_UNIT]], jnp.int8),
                                      jnp.array([[True, True, True, False]]))
    np.testing.assert_allclose(share, [[0.7, 0.2, 0.0]], rtol=1e-6)


def test_migrated_tokens_counts_every_changed_unit():
    before = jnp.array([[HBM, DDR, SSD, NO_UNIT], [HBM, HBM, NO_UNIT, NO_UNIT]], jnp.int8)
    after = jnp.array([[DDR, HBM, DDR, HBM], [HBM, SSD, NO_UNIT, NO_UNIT]], jnp.int8)
    tokens = jnp.array([[4, 3, 2, 1], [4, 4, 0, 0]], jnp.int32)
    # A unit that did not exist before (opened this step) is not a migration.
    expected = np.zeros((3, 3), int)
    expected[HBM, DDR], expected[DDR, HBM], expected[SSD, DDR], expected[HBM, SSD] = 4, 3, 2, 4
    for active in (None, jnp.array([True, True])):
        migration = scheduler.migration(before, after, tokens, active)
        assert (int(migration.units), int(migration.units_from_ssd)) == (4, 1)
        np.testing.assert_array_equal(migration.tokens, expected)
    # Counted on the one row where units moved (the engine passes the decoding rows): the
    # same totals.
    moving = scheduler.migration(before.at[1].set(after[1]), after, tokens,
                                 jnp.array([True, False]))
    assert int(moving.units) == 3 and int(moving.tokens[HBM, SSD]) == 0


def test_the_swap_budget_is_in_tokens_whatever_the_page_size():
    # 8 tokens per phase per step: at page 1 eight pages every step; at page 16 one page
    # every second step, starting with the request's second decode step; at page 3 the
    # allowance completes a page at steps 0, 1, 2 (8 // 3 = 2, then 16 // 3 = 5: 3 more).
    steps = np.arange(96)
    for page in (1, 2, 3, 16, 64):
        pages = np.asarray(scheduler.pages_allowed(8, jnp.asarray(steps), page))
        assert pages.min() >= 0
        # The moved volume over 96 steps is the budget's, to within one page.
        assert abs(int(pages.sum()) * page - 8 * 96) < page
    np.testing.assert_array_equal(scheduler.pages_allowed(8, jnp.arange(4), 16), [0, 1, 0, 1])
    np.testing.assert_array_equal(scheduler.pages_allowed(8, jnp.arange(3), 3), [2, 3, 3])
    np.testing.assert_array_equal(scheduler.pages_allowed(0, jnp.arange(3), 1), [0, 0, 0])
