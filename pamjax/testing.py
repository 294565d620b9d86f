"""Public conformance checker: the invariants every engine state and step must satisfy.

The test suite calls :func:`check_invariants` after rollouts, and so can anyone writing a new
policy or system: a violation names the invariant and the first offending index.
"""

from __future__ import annotations

import numpy as np

from pamjax.types import (
    STATUS_FINISHED,
    STATUS_REJECTED,
    STATUS_RUNNING,
    STATUS_WAITING,
    EngineConfig,
)


class InvariantError(AssertionError):
    """An engine state or its metrics break an invariant (the message says which)."""


def _fail(message: str):
    raise InvariantError(message)


def check_invariants(config: EngineConfig, params, state, workload, metrics=None) -> None:
    """Check one (unbatched) engine state, and optionally its stacked step metrics.

    Invariants:
      * every KV unit of a running request is on exactly one enabled tier, inside a valid
        bank group; free slots and units past a request's context hold nothing;
      * no tier holds more units than its capacity;
      * every request is waiting, running, finished or rejected; running requests are exactly
        those in slots, each in one slot; requests behind the FCFS pointer are not waiting;
      * finished requests have first-token <= finish times, both finite;
      * the clock, step times and energies are finite and non-negative;
      * the overflow flag is clear.

    Args:
      config: EngineConfig of the run; params: its SimParams (unbatched);
      state: EngineState; workload: the host or device workload;
      metrics: StepMetrics stacked over steps, optional.

    Raises:
      InvariantError: naming the broken invariant.
    """
    tier = np.asarray(state.unit_tier).astype(np.int64)
    bank_group = np.asarray(state.unit_bank_group).astype(np.int64)
    slots = np.asarray(state.slot_request)
    context = np.asarray(state.slot_context)
    enabled = np.asarray(params.tier_enabled)
    capacity = np.asarray(params.capacity_units)
    groups = np.asarray(params.bank_groups_per_device).astype(np.int64)

    page = config.page_size
    units = -(-context // page)
    expected = (slots[:, None] >= 0) & (np.arange(config.units_per_slot)[None, :] < units[:, None])
    present = tier >= 0
    if np.any(tier > 2) or np.any(tier < -1):
        _fail(f"unit tier outside -1..2 at {np.argwhere((tier > 2) | (tier < -1))[0]}")
    if not np.array_equal(present, expected):
        where = np.argwhere(present != expected)[0]
        _fail(f"KV unit presence wrong at slot/unit {tuple(where)}: held={present[tuple(where)]}"
              f", expected={expected[tuple(where)]} (context {context[where[0]]})")
    if present.any():
        if np.any(~enabled[tier[present]]):
            _fail("a KV unit sits on a disabled tier")
        bad = present & ((bank_group < 0) | (bank_group >= groups[np.clip(tier, 0, 2)]))
        if bad.any():
            _fail(f"bank group out of range at slot/unit {tuple(np.argwhere(bad)[0])}")
    held = np.array([np.sum(tier == t) for t in range(3)])
    if np.any(held > capacity):
        _fail(f"tier over capacity: holds {held.tolist()} units, capacity {capacity.tolist()}")

    status = np.asarray(state.req_status)
    n = status.size
    if np.any((status < STATUS_WAITING) | (status > STATUS_REJECTED)):
        _fail("request status outside waiting/running/finished/rejected")
    running_ids = slots[slots >= 0]
    if len(set(running_ids.tolist())) != running_ids.size:
        _fail("a request occupies two slots")
    running = np.flatnonzero(status == STATUS_RUNNING)
    if not np.array_equal(np.sort(running_ids), running):
        _fail(f"running requests {running.tolist()[:8]} differ from slot contents "
              f"{np.sort(running_ids).tolist()[:8]}")
    pointer = int(state.next_request)
    if not 0 <= pointer <= n:
        _fail(f"FCFS pointer {pointer} outside [0, {n}]")
    if np.any(status[:pointer] == STATUS_WAITING) or np.any(status[pointer:] != STATUS_WAITING):
        _fail("requests behind the FCFS pointer must not wait, those ahead must")
    finished = status == STATUS_FINISHED
    first = np.asarray(state.req_first_token_s, np.float64)
    finish = np.asarray(state.req_finish_s, np.float64)
    if np.any(~np.isfinite(first[finished])) or np.any(~np.isfinite(finish[finished])):
        _fail("a finished request lacks a first-token or finish time")
    if np.any(finish[finished] < first[finished] - 1e-6):
        _fail("a request finished before its first token")
    arrival = np.asarray(workload.arrival_s, np.float64)
    started = np.isfinite(first)
    # float32 times: allow a rounding of the arrival time at the clock's magnitude.
    if np.any(first[started] + 1e-3 * (1 + arrival[started]) < arrival[started]):
        _fail("a request produced a token before it arrived")

    clock = float(state.clock_whole) + float(state.clock_frac)
    if not np.isfinite(clock) or clock < 0:
        _fail(f"clock is {clock}")
    if bool(state.overflow):
        _fail("overflow: a request needed more units than a slot holds")

    if metrics is not None:
        for name in ("step_time_s", "idle_s", "energy_pj", "tier_attention_s", "attention_s"):
            values = np.asarray(getattr(metrics, name))
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                _fail(f"metric {name} has a negative or non-finite value")
        if np.any(np.asarray(metrics.tier_units) > capacity):
            _fail("a step left a tier over capacity")


CLOCK_FIELDS = ("clock_whole", "clock_frac", "req_first_token_s", "req_finish_s")
"""Float32 fields of a state that are the schedule's times (compared exactly)."""


def schedule_difference(a, b) -> dict:
    """How two runs' states (or stacked step metrics) of the same configuration differ.

    The schedule is every integer and boolean field (tiers, bank groups, selections, slots,
    request status, counts) and the clock (CLOCK_FIELDS): it must match bit for bit. Other
    float32 fields (importance EMA, latents, times and energies of a step) may differ in
    their last bits when XLA compiles the same arithmetic differently (under vmap, or on
    fewer rows: EngineConfig.skip_idle).

    Returns:
      {"schedule_fields": names of schedule fields that differ (empty: same schedule),
       "float_max_relative": the largest relative difference of the other float fields}.
    """
    differ, worst = [], 0.0
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if x is None and y is None:
            continue
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind != "f" or name in CLOCK_FIELDS:
            if x.shape != y.shape or x.tobytes() != y.tobytes():
                differ.append(name)
            continue
        finite = np.isfinite(x) & np.isfinite(y)
        if not np.array_equal(np.isfinite(x), np.isfinite(y)):
            differ.append(name)
        elif finite.any():
            scale = np.maximum(np.abs(y[finite]), np.finfo(np.float32).tiny)
            worst = max(worst, float(np.max(np.abs(x[finite] - y[finite]) / scale)))
    return {"schedule_fields": differ, "float_max_relative": worst}
