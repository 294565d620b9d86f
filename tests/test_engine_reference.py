"""The JAX engine against the plain reference model (pamjax.reference), step by step.

Side by side: at every step the jitted ``engine.step`` runs, and ``reference_step`` runs from
the *same* state (the engine's, converted to a RefState); the two next states and step
metrics are compared, so a disagreement is pinned to one step and never snowballs. Whole
free-running rollouts of both are compared too.

Tolerances (float32 engine against the float64 reference):
  * exact: tier table, bank groups, selection, activation history, slots, request statuses,
    the FCFS pointer and every integer metric (units per tier, selected, persisted and
    migrated units, admissions, rejections);
  * rtol 1e-5: importance (atol 1e-9), latents (atol 1e-6), selected mass, step, attention
    and per-tier attention times, each energy component;
  * atol 1e-6 s: the clock, idle jumps, first-token and finish times (float32 clock).

The engine ranks units by bisection where the reference sorts; every config here uses the
default ``bisection_iters`` and PAM's default (calibrated) x:y:1 target, except where a case or
test says why it sets its own. Engine and reference agree strictly on every quantity above;
the regression tests at the end pin, by hand arithmetic, the points where the engine once
deviated from the documented model (partial results per bank group, selection labels read
before scheduling, SSD room in prompt placement, log-mass ranking of tiny tail masses).
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import engine, locality, placement, reference, systems
from pamjax.simulation import device_workload
from pamjax.types import (
    ENERGY_COMPONENTS,
    PLACEMENT_IMPORTANCE_RATIO,
    STATUS_FINISHED,
    STATUS_RUNNING,
    EngineConfig,
    StepMetrics,
)
from pamjax.workload import Workload

SYSTEM_NAMES = ("pam", "ls-pim", "l-pim", "vllm-offload", "attacc", "pam-no-pamattention",
                "pam-no-mapping", "pam-no-scheduling")
MODEL = "llama3-8b"
NUM_SLOTS = 4
NUM_REQUESTS = 6
UNITS_PAGE_1 = 80  # prompts <= 60 tokens, outputs <= 14: contexts < 80 tokens
SEED = 7
DEFAULT_BISECTION_ITERS = EngineConfig(num_slots=1, units_per_slot=1).bisection_iters
HBM, DDR, SSD = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Case:
    """A tiny workload with shrunk tiers, and the SimParams overrides that go with it."""

    name: str
    page_size: int
    staggered: bool
    capacity_units: tuple[int, int, int]
    bank_groups: tuple[int, int, int]
    workload_seed: int
    overrides: tuple[tuple[str, float], ...] = ()


CASES = (
    # HBM and DDR overflow; PAM displaces and swaps (faster importance drift than default).
    Case("t0-page1", 1, False, (40, 60, 2000), (4, 2, 3), 0, (("persistence", 0.8),)),
    # Pages of 4 tokens, arrivals over time with an idle gap, sequential runs of 3 units and
    # a prefill token budget.
    Case("staggered-page4", 4, True, (10, 15, 500), (4, 2, 3), 1,
         (("persistence", 0.8), ("naive_run_units", 3), ("prefill_token_budget", 64))),
    # One bank group per device, batch cap 3.
    Case("staggered-1bg", 1, True, (30, 30, 2000), (1, 1, 1), 2,
         (("persistence", 0.8), ("max_batch", 3))),
    # A small SSD and an explicit 2:1:1 target, under which PAM wants most of each prompt on
    # SSD: SSD room runs out, what it cannot take goes back up to DDR and, once DDR is full
    # too, to HBM.
    Case("tight-ssd", 1, False, (40, 40, 20), (4, 2, 3), 3,
         (("persistence", 0.8), ("target_x", 2.0), ("target_y", 1.0))),
)
CASE_IDS = [case.name for case in CASES]


def make_workload(seed: int, staggered: bool) -> Workload:
    rng = np.random.default_rng(seed)
    prompt = rng.integers(5, 61, NUM_REQUESTS)
    output = rng.integers(3, 15, NUM_REQUESTS)
    arrival = np.zeros(NUM_REQUESTS)
    if staggered:  # a burst over 60 ms, then one request after an idle gap
        arrival = np.sort(rng.uniform(0.0, 0.06, NUM_REQUESTS))
        arrival[-1] = 0.3
    return Workload(arrival, prompt, output, name=f"tiny-{seed}")


def make_config(page_size: int) -> EngineConfig:
    return EngineConfig(num_slots=NUM_SLOTS, units_per_slot=-(-UNITS_PAGE_1 // page_size),
                        page_size=page_size, num_requests=NUM_REQUESTS, padded_bank_groups=4,
                        window=10, max_swaps=8, admit_window=NUM_SLOTS)


def make_params(system: str, case: Case, **extra):
    params = systems.make_params(system, MODEL, max_batch=NUM_SLOTS, page_size=case.page_size)
    changes = {name: jnp.asarray(value, getattr(params, name).dtype)
               for name, value in case.overrides + tuple(extra.items())}
    return params.replace(capacity_units=jnp.asarray(case.capacity_units, jnp.int32),
                          bank_groups_per_device=jnp.asarray(case.bank_groups, jnp.float32), **changes)


# Every engine step in this file goes through here: one trace per EngineConfig, of which there
# are three (pages of 1 and 4 tokens, and the one-request config of the closed-form tests).
_STEP = jax.jit(chex.assert_max_traces(engine.step, n=3), static_argnums=0)


def ref_state_from_engine(state) -> reference.RefState:
    """The engine's state as a RefState (float32 clock halves summed in float64)."""
    s = jax.device_get(state)
    return reference.RefState(
        slot_request=np.asarray(s.slot_request, np.int64),
        slot_generated=np.asarray(s.slot_generated, np.int64),
        slot_context=np.asarray(s.slot_context, np.int64),
        unit_tier=np.asarray(s.unit_tier, np.int64),
        unit_bank_group=np.asarray(s.unit_bank_group, np.int64),
        unit_latent=np.asarray(s.unit_latent, np.float32),
        unit_importance=np.asarray(s.unit_importance, np.float64),
        unit_selected=np.asarray(s.unit_selected, bool),
        activation=np.asarray(s.activation, np.int64),
        clock_s=float(s.clock_whole) + float(s.clock_frac),
        step=int(s.step),
        next_request=int(s.next_request),
        req_status=np.asarray(s.req_status, np.int64),
        req_first_token_s=np.asarray(s.req_first_token_s, np.float64),
        req_finish_s=np.asarray(s.req_finish_s, np.float64),
        seed=int(s.seed),
    )


EXACT_STATE = ("slot_request", "slot_generated", "slot_context", "unit_tier", "unit_selected",
               "activation", "step", "next_request", "req_status")
EXACT_METRICS = ("decode_requests", "prefill_requests", "output_tokens", "tier_units",
                 "selected_units", "persisted_units", "previously_selected_units",
                 "migrated_units", "migrated_from_ssd", "rejected")
RELATIVE_METRICS = ("step_time_s", "attention_s", "tier_attention_s", "selected_mass")


def mismatched_fields(engine_state, engine_metrics, ref_state, ref_metrics) -> dict[str, str]:
    """Names of the compared quantities that disagree, each with a short description."""
    e = jax.device_get(engine_state)
    m = jax.device_get(engine_metrics)
    present = np.asarray(e.unit_tier) >= 0
    pairs = [(name, getattr(e, name), getattr(ref_state, name), 0.0, 0.0)
             for name in EXACT_STATE]
    pairs += [
        ("unit_bank_group", np.where(present, e.unit_bank_group, 0),
         np.where(present, ref_state.unit_bank_group, 0), 0.0, 0.0),
        ("unit_latent", np.where(present, e.unit_latent, 0.0),
         np.where(present, ref_state.unit_latent, 0.0), 1e-5, 1e-6),
        ("unit_importance", e.unit_importance, ref_state.unit_importance, 1e-5, 1e-9),
        ("clock", float(e.clock_whole) + float(e.clock_frac), ref_state.clock_s, 0.0, 1e-6),
        ("req_first_token_s", e.req_first_token_s, ref_state.req_first_token_s, 1e-5, 1e-6),
        ("req_finish_s", e.req_finish_s, ref_state.req_finish_s, 1e-5, 1e-6),
        ("idle_s", m.idle_s, ref_metrics.idle_s, 0.0, 1e-6),
    ]
    pairs += [(name, getattr(m, name), getattr(ref_metrics, name), 0.0, 0.0)
              for name in EXACT_METRICS]
    pairs += [(name, getattr(m, name), getattr(ref_metrics, name), 1e-5, 1e-12)
              for name in RELATIVE_METRICS]
    pairs += [(f"energy_pj.{component}", m.energy_pj[c], ref_metrics.energy_pj[c], 1e-5, 1e-3)
              for c, component in enumerate(ENERGY_COMPONENTS)]
    bad = {}
    for name, got, want, rtol, atol in pairs:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            bad[name] = f"engine {got.ravel()[:6]} vs reference {want.ravel()[:6]}"
    return bad


@dataclasses.dataclass
class SideBySide:
    """Outcome of a side-by-side run: first mismatch per quantity, and what the run did."""

    mismatches: dict[str, tuple[int, str]]
    steps: int
    all_done: bool
    max_tier_units: np.ndarray
    moved_down: int  # units that went to a slower tier (demotions and swaps)
    moved_up: int  # units that went to a faster tier (only swaps do)
    rejected: int


def run_side_by_side(system: str, case: Case) -> SideBySide:
    config = make_config(case.page_size)
    params = make_params(system, case)
    workload = device_workload(make_workload(case.workload_seed, case.staggered))
    state = engine.init_state(config, SEED)
    mismatches = {}
    max_units = np.zeros(3, np.int64)
    moved_down = moved_up = rejected = 0
    for k in range(200):
        before = ref_state_from_engine(state)
        state, metrics = _STEP(config, params, state, workload)
        ref_next, ref_metrics = reference.reference_step(config, params, before, workload)
        for name, detail in mismatched_fields(state, metrics, ref_next, ref_metrics).items():
            mismatches.setdefault(name, (k, detail))
        after = np.asarray(state.unit_tier, np.int64)
        both = (before.unit_tier >= 0) & (after >= 0)
        moved_down += int(np.sum(both & (after > before.unit_tier)))
        moved_up += int(np.sum(both & (after < before.unit_tier)))
        max_units = np.maximum(max_units, np.asarray(metrics.tier_units))
        rejected += int(metrics.rejected)
        if np.all(np.asarray(state.req_status) >= STATUS_FINISHED):
            break
    return SideBySide(mismatches, k + 1,
                      bool(np.all(np.asarray(state.req_status) >= STATUS_FINISHED)),
                      max_units, moved_down, moved_up, rejected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("system", SYSTEM_NAMES)
def test_engine_step_matches_reference(system, case):
    run = run_side_by_side(system, case)
    spec = systems.get_system(system)
    assert run.all_done, f"requests left after {run.steps} steps"
    # The case really exercises the policies: tiers overflow, PAM displaces and swaps.
    if len(spec.tiers) == 3:
        assert run.max_tier_units[DDR] > 0 and run.max_tier_units[SSD] > 0
    else:
        assert run.rejected > 0  # AttAcc: some requests never fit the shrunk HBM
    if spec.swap_budget > 0:
        assert run.moved_up > 0 and run.moved_down > 0
    if case.name == "tight-ssd" and spec.placement_policy == PLACEMENT_IMPORTANCE_RATIO:
        assert run.max_tier_units[SSD] == case.capacity_units[SSD]  # SSD room runs out

    assert not run.mismatches, \
        f"engine and reference disagree (first step, values): {run.mismatches}"


def _stack_steps(history: list[reference.RefMetrics], name: str) -> np.ndarray:
    return np.stack([np.asarray(getattr(m, name), np.float64) for m in history])


ROLLOUT_STEPS = 96


# Pages of 1 token only: one compiled rollout (pages of 4 are compared step by step above).
FREE_RUNNING = [("pam", CASES[0]), ("l-pim", CASES[0]), ("pam-no-mapping", CASES[2]),
                ("vllm-offload", CASES[3]), ("pam", CASES[3])]


@pytest.mark.parametrize("system,case", FREE_RUNNING,
                         ids=[f"{system}-{case.name}" for system, case in FREE_RUNNING])
def test_free_running_rollouts_agree(system, case):
    config = make_config(case.page_size)
    params = make_params(system, case)
    workload = device_workload(make_workload(case.workload_seed, case.staggered))
    state, metrics = engine.rollout_jit(config, params, engine.init_state(config, SEED),
                                        workload, ROLLOUT_STEPS)
    ref_state, history = reference.reference_rollout(config, params, workload, ROLLOUT_STEPS,
                                                     SEED)

    assert np.all(ref_state.req_status >= STATUS_FINISHED)
    for name in ("unit_tier", "req_status", "next_request", "step"):
        np.testing.assert_array_equal(np.asarray(getattr(state, name)), getattr(ref_state, name))
    np.testing.assert_allclose(np.asarray(state.req_first_token_s), ref_state.req_first_token_s,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.req_finish_s), ref_state.req_finish_s,
                               rtol=1e-5, atol=1e-6)
    for name in EXACT_METRICS:
        np.testing.assert_array_equal(np.asarray(getattr(metrics, name)),
                                      _stack_steps(history, name), err_msg=name)
    for name in RELATIVE_METRICS + ("energy_pj",):
        np.testing.assert_allclose(np.asarray(getattr(metrics, name)),
                                   _stack_steps(history, name), rtol=1e-5, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(metrics.idle_s), _stack_steps(history, "idle_s"),
                               atol=1e-6)


def test_reference_metrics_mirror_engine_metrics():
    fields = {f.name for f in dataclasses.fields(reference.RefMetrics)}
    assert fields == {f.name for f in dataclasses.fields(StepMetrics)}


# ---------------------------------------------------------------------------------------------
# Closed form: one request, everything in HBM, dense attention
# ---------------------------------------------------------------------------------------------

def hand_decode_step_s(context: int, groups_per_stack: int) -> float:
    """Decode step of one LLaMA3-8B request with all its KV in HBM-PIM, from the presets."""
    layers, q_heads, kv_heads, head_dim, hidden, ffn, vocab = 32, 32, 8, 128, 4096, 14336, 128256
    kv_bytes = 2 * layers * kv_heads * head_dim * 2  # K and V, 16-bit: 131072 B per token
    per_layer = (2 * hidden * q_heads * head_dim + 2 * hidden * kv_heads * head_dim
                 + 3 * hidden * ffn)  # Q, O, K, V projections and the SwiGLU FFN
    weights = 2 * (layers * per_layer + vocab * hidden)  # streamed bytes (16-bit)
    flops = 2 * (layers * per_layer + vocab * hidden)  # FC FLOPs per token
    # FC on 8 H100s, TP 4 x PP 2: one request = 2 micro-batches of 0.5 through 2 stages.
    tp, pp, gpu_flops, gpu_bytes = 4, 2, 989e12 * 0.7, 3.35e12 * 0.85
    nvlink, gpu_latency, kernel = 450e9, 2e-6, 5e-6
    micro = 1 / pp
    roofline = max(flops * micro / pp / (tp * gpu_flops), weights / pp / (tp * gpu_bytes))
    activations = micro * hidden * 2
    allreduce = 2 * (tp - 1) / tp * activations / nvlink + 2 * (tp - 1) * gpu_latency
    per_micro = roofline + layers / pp * (2 * allreduce + kernel)
    fc = pp * per_micro + (pp - 1) * (activations / nvlink + gpu_latency)
    # HBM-PIM, 40 stacks. A bank streams a 1 KB row in max(tRAS 45, tRCD 19 + 32 columns x
    # tCCD_L 4) + tRP 19 = 166 cycles at 1.3 GHz; 1024 banks. g = 32 / 8 = 4 query heads per
    # KV head, the 512 B buffer holds 2 heads of d = 128: 2 passes over the KV. Compute:
    # 1.6 TFLOPS / 4 FLOP per byte = 400 GB/s per stack, below 8.2 TB/s / 2.
    internal = 1024 * 1024 / (166 / 1.3e9)
    stacks, passes, stack_rate = 40, 2, min(internal / 2, 1.6e12 / 4)
    group_rate = internal / passes / groups_per_stack
    # Striped over the bank groups: at most ceil(context / groups) tokens per bank group.
    per_token = kv_bytes / stacks
    busiest = -(-context // groups_per_stack) * per_token
    devices = max(busiest / group_rate, context * per_token / stack_rate)
    # The new token's K/V is written to a stack (at the internal rate) and crosses the link.
    write = kv_bytes / (stacks * internal)
    # Q to the tier and one partial (o, m, l in float32) back: the 41 tokens lie in one
    # FlashDecoding chunk of 512, so one partial without PAMattention too. Over 40 x 665.6
    # GB/s, plus two link latencies of 0.5 us per layer.
    q_bytes = layers * q_heads * head_dim * 2
    partial = layers * q_heads * (head_dim + 2) * 4
    link = (q_bytes + partial + kv_bytes) / (stacks * 1024 * 5.2e9 / 8) + 2 * layers * 0.5e-6
    return fc + devices + write + link


def _one_request(system: str, groups_per_stack: int):
    """A 40-token prompt, 3 output tokens; HBM alone holds its KV."""
    host = Workload(np.zeros(1), np.array([40]), np.array([3]))
    config = EngineConfig(num_slots=1, units_per_slot=48, num_requests=1, padded_bank_groups=256,
                          admit_window=1)
    params = systems.make_params(system, MODEL, max_batch=1)
    # A stack with groups_per_stack bank groups: the same internal rate, shared by fewer.
    rate = params.bank_group_rate[HBM] * params.bank_groups_per_device[HBM] / groups_per_stack
    params = params.replace(
        bank_groups_per_device=params.bank_groups_per_device.at[HBM].set(groups_per_stack),
        bank_group_rate=params.bank_group_rate.at[HBM].set(rate))
    return config, params, host


HAND_CASES = [("attacc", 256), ("attacc", 1), ("l-pim", 256), ("l-pim", 1)]


@pytest.mark.parametrize("system,groups_per_stack", HAND_CASES)
def test_reference_decode_step_by_hand(system, groups_per_stack):
    config, params, host = _one_request(system, groups_per_stack)
    _, history = reference.reference_rollout(config, params, host, 2, SEED)
    assert history[1].decode_requests == 1 and history[1].prefill_requests == 0
    assert history[1].tier_units.tolist() == [41, 0, 0]
    # float32 preset parameters against float64 hand arithmetic
    np.testing.assert_allclose(history[1].step_time_s, hand_decode_step_s(41, groups_per_stack),
                               rtol=1e-6)


@pytest.mark.parametrize("system,groups_per_stack", HAND_CASES)
def test_engine_decode_step_by_hand(system, groups_per_stack):
    """Regression (partials): the 41 tokens of the one request lie in one FlashDecoding
    chunk, so its attention yields one partial result to send to the GPUs, not one per bank
    group holding its tokens (their partials merge inside the stack)."""
    config, params, host = _one_request(system, groups_per_stack)
    state, _ = _STEP(config, params, engine.init_state(config, SEED), device_workload(host))
    _, metrics = _STEP(config, params, state, device_workload(host))
    assert int(metrics.decode_requests) == 1
    assert np.asarray(metrics.tier_units).tolist() == [41, 0, 0]
    np.testing.assert_allclose(float(metrics.step_time_s),
                               hand_decode_step_s(41, groups_per_stack), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Regression tests of former engine deviations, with hand-reasoned expectations
# ---------------------------------------------------------------------------------------------

def test_selection_labels_are_charged_where_tokens_were_selected():
    """One PAM request, pages of 4: a partly filled HBM page is swapped with a full DDR page.

    Before the step, unit 0 (4 tokens) is on DDR and unit 1 (2 tokens) on HBM; the decoded
    token joins unit 1. The labels of all 7 tokens are read where they sit when scored,
    3 on HBM and 4 on DDR, although this step's scheduling then swaps the pages (4 on HBM,
    3 on DDR afterwards). The x:y:1 = 1000:1:1 target makes the swap certain.
    """
    case = CASES[1]
    config = make_config(case.page_size)
    params = make_params("pam", case, target_x=1000.0, target_y=1.0)
    host = Workload(np.array([0.0] + [1e3] * (NUM_REQUESTS - 1)),
                    np.full(NUM_REQUESTS, 6), np.full(NUM_REQUESTS, 5))
    state = engine.init_state(config, SEED)
    state = state.replace(  # request 0 after its prefill: 6 tokens in units 0 (4) and 1 (2)
        slot_request=state.slot_request.at[0].set(0),
        slot_generated=state.slot_generated.at[0].set(1),
        slot_context=state.slot_context.at[0].set(6),
        unit_tier=state.unit_tier.at[0, :2].set(jnp.array([DDR, HBM], jnp.int8)),
        unit_importance=state.unit_importance.at[0, :2].set(jnp.array([0.9, 0.1])),
        req_status=state.req_status.at[0].set(STATUS_RUNNING),
        next_request=jnp.int32(1))
    before = ref_state_from_engine(state)
    after, metrics = _STEP(config, params, state, device_workload(host))
    _, ref_metrics = reference.reference_step(config, params, before, device_workload(host))
    # The step's scheduling swapped the pages: the 3-token page left HBM for DDR.
    np.testing.assert_array_equal(np.asarray(after.unit_tier[0, :2]), [HBM, DDR])

    # PIM attention energy: 8 bits x (selected + label bytes) x pJ/bit x (read passes + PU
    # factor x g) per tier, the selected tokens and the labels counted on the tiers before
    # scheduling. LLaMA3-8B: g = 4; HBM's 512 B buffer holds 2 heads of d = 128 (2 passes),
    # DDR's 128 B less than one (4 passes), the SSD's every head (1 pass).
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    tokens, tier_before = np.array([4, 3]), np.array([DDR, HBM])
    chosen = np.asarray(after.unit_selected[0, :2])
    assert chosen.sum() == 1  # ceil(7 / 8) = 1 token: the highest-logit unit
    selected = np.array([tokens[chosen & (tier_before == t)].sum() for t in range(3)])
    labels = np.array([3.0, 4.0, 0.0])
    factor = np.array([2.0, 4.0, 1.0]) + p.pim_pu_factor * 4.0
    want = 8 * np.sum((selected + labels / 16) * p.kv_bytes_per_token * p.pim_read_pj * factor)
    c = ENERGY_COMPONENTS.index("pim_attention")
    np.testing.assert_allclose(float(metrics.energy_pj[c]), want, rtol=1e-5)
    np.testing.assert_allclose(ref_metrics.energy_pj[c], want, rtol=1e-6)
    # Labels read after scheduling (4 on HBM, 3 on DDR) would cost measurably differently.
    moved = 8 * np.sum((selected + labels[[1, 0, 2]] / 16) * p.kv_bytes_per_token
                       * p.pim_read_pj * factor)
    assert not np.isclose(moved, want, rtol=1e-4)


def test_prompt_tier_counts_respect_every_tier_by_hand():
    """Two prompts of 10 units; HBM has 10 free units, DDR 5, SSD 5.

    Wishes: prompt A 3 on HBM and 4 on SSD, prompt B 2 on HBM and 4 on SSD. HBM grants 3 and
    2 (5 left); DDR grants A's 10 - 3 - 4 = 3, then B only 2 of its 4 (DDR full); SSD grants
    A's 4, then B 1 of its 10 - 2 - 2 = 6 (SSD full). B's 5 remaining units go back up: DDR
    has no room left, HBM has 5. Final (HBM, DDR, SSD): A (3, 3, 4), B (7, 2, 1).
    """
    want = [(3, 3, 4), (7, 2, 1)]
    got = placement.prompt_tier_counts(jnp.array([3, 2]), jnp.array([4, 4]),
                                       jnp.array([10, 10]), jnp.array([10, 5, 5]))
    assert [tuple(int(np.asarray(c)[k]) for c in got) for k in range(2)] == want
    free = [10, 5, 5]
    assert reference.grant_prompt_counts([3, 2], [4, 4], [10, 10], free) == want
    assert free == [0, 0, 0]


def test_pam_prompt_placement_respects_ssd_capacity():
    """HBM and DDR have room for everything, SSD for 5 units; under a 2:1:1 target PAM wants
    far more than 5 units of the first prompt on SSD. SSD holds exactly 5 units afterwards,
    all of the first prompt (FCFS); what it refused goes back up to DDR, which has room for
    all of it, so HBM holds exactly the prompts' HBM wishes."""
    case = dataclasses.replace(CASES[0], capacity_units=(200, 200, 5))
    config = make_config(case.page_size)
    params = make_params("pam", case, target_x=2.0, target_y=1.0)
    host = make_workload(case.workload_seed, staggered=False)
    state, metrics = _STEP(config, params, engine.init_state(config, SEED),
                           device_workload(host))
    assert int(metrics.prefill_requests) == NUM_SLOTS
    np.testing.assert_array_equal(np.asarray(state.slot_request), np.arange(NUM_SLOTS))
    tier = np.asarray(state.unit_tier, np.int64)
    prompt_units = host.prompt_tokens[:NUM_SLOTS]  # pages of 1 token

    # Each prompt's wishes, from its log-masses (the state keeps the prefill latents).
    log_mass = np.asarray(_LOGITS(params, state.unit_latent, state.slot_context, 1))
    wishes = [reference.prompt_wants(jax.device_get(params), log_mass[r, :n])[1:]
              for r, n in enumerate(prompt_units)]
    want_hbm = [h for h, _ in wishes]
    assert wishes[0][1] > case.capacity_units[SSD]
    assert np.asarray(metrics.tier_units).tolist() == [
        sum(want_hbm), int(prompt_units.sum()) - sum(want_hbm) - 5, 5]
    assert np.sum(tier[0] == SSD) == 5
    assert [int(np.sum(tier[r] == HBM)) for r in range(NUM_SLOTS)] == want_hbm


def engine_prompt_tiers(params, log_masses, free) -> list[list[int]]:
    """placement.initial_tiers on prompts given as lists of log-masses (one compiled shape)."""
    values = np.zeros((PLACE_PROMPTS, PLACE_UNITS), np.float32)
    present = np.zeros((PLACE_PROMPTS, PLACE_UNITS), bool)
    for k, row in enumerate(log_masses):
        values[k, :len(row)], present[k, :len(row)] = row, True
    tiers = np.asarray(_INITIAL_TIERS(params, values, present, jnp.asarray(free, jnp.int32),
                                      placement.target_share(params)))
    assert np.all(tiers[~present] == -1)
    return [tiers[k, :len(row)].tolist() for k, row in enumerate(log_masses)]


PLACE_PROMPTS, PLACE_UNITS = 4, 64
_INITIAL_TIERS = jax.jit(functools.partial(placement.initial_tiers,
                                           iters=DEFAULT_BISECTION_ITERS))
_LOGITS = jax.jit(locality.logits, static_argnums=3)


def test_prompt_placement_ranks_tiny_masses_at_default_bisection():
    """Six units, four of them with masses between 1e-7 and 4e-7 (total mass 1).

    x:y:1 = 625000:624999:1 gives HBM 1/2 of the mass, SSD 8e-7. HBM: unit 0 (0.6) covers
    1/2. SSD: from the least important end, units 1, 2 and 4 hold 6e-7 < 8e-7, adding unit 5
    would reach 1e-6, so three units. DDR: units 3 and 5. Log-mass ranking resolves the tiny
    masses at the default 20 bisection iterations.
    """
    log_mass = np.log([0.6, 1e-7, 2e-7, 0.4 - 1e-6, 3e-7, 4e-7])
    want = [HBM, SSD, SSD, DDR, SSD, DDR]
    params = systems.make_params("pam", MODEL).replace(
        target_x=jnp.float32(625000.0), target_y=jnp.float32(624999.0))
    assert reference.prompt_tiers(jax.device_get(params), [log_mass], [100] * 3) == [want]
    assert engine_prompt_tiers(params, [log_mass], [100] * 3) == [want]


def test_prompt_placement_with_calibrated_style_targets_in_float32():
    """A calibrated-style target (x = 1e6, y = 761: SSD share ~ 1e-6, HBM ~ 0.99924).

    Log-masses (relative to the peak) 0, -1, -3, -6, -8, -12, -15, -16, -20, scrambled. Total
    mass ~ 1.42042. HBM: 1 + e^-1 + e^-3 = 1.4177 < 0.99924 x 1.42042 = 1.41934, adding e^-6
    reaches 1.42018: four units. SSD: e^-20 + e^-16 + e^-15 = 4.2e-7 < 1.42e-6, adding e^-12
    (6.1e-6) would not stay below: three units. DDR: the units at -8 and -12.
    """
    log_mass = np.array([-12.0, 0.0, -20.0, -3.0, -15.0, -1.0, -8.0, -16.0, -6.0])
    want = [DDR, HBM, SSD, HBM, SSD, HBM, DDR, SSD, HBM]
    params = systems.make_params("pam", MODEL).replace(target_x=jnp.float32(1e6),
                                                       target_y=jnp.float32(761.0))
    assert float(params.target_x) == 1e6 and 700 < float(params.target_y) < 800
    assert reference.prompt_tiers(jax.device_get(params), [log_mass], [100] * 3) == [want]
    # Log-masses are defined up to a per-request constant.
    assert engine_prompt_tiers(params, [log_mass + 3.0], [100] * 3) == [want]


def near_float32_boundary(params, log_mass) -> bool:
    """Whether PAM's HBM-cover or SSD-tail decision for a prompt is within float32 rounding.

    The engine sums float32 masses, the reference float64 ones: a cumulative mass within
    ~1e-6 of the target share may fall on either side (one unit more or less on HBM or SSD).
    """
    share_hbm, _, share_ssd = reference.target_shares(params)
    mass = np.sort(np.exp(log_mass - log_mass.max()))[::-1]
    total = mass.sum()
    head = np.abs(np.cumsum(mass) - share_hbm * total).min() / total
    tail = np.abs(np.cumsum(mass[::-1]) - share_ssd * total).min() / (share_ssd * total)
    return head < 1e-6 or tail < 1e-5


def test_prompt_placement_agrees_with_reference_on_random_prompts():
    """Engine and reference prompt placement on access-model prompts, four per step, with
    tight and roomy tiers (always as much room as admission guarantees), under PAM's default
    target, a 2:1:1 target and fastest-first. Prompts whose HBM or SSD boundary lies within
    float32 rounding are left out (near_float32_boundary)."""
    rng = np.random.default_rng(11)
    # A calibrated target of the kind the equal-time rule gives at large batches (SSD share
    # ~1e-6): at the small default batch it would put everything on HBM.
    pam = systems.make_params("pam", MODEL).replace(target_x=jnp.float32(1e6),
                                                    target_y=jnp.float32(761.0))
    compared = skipped = 0
    for params in (pam, pam.replace(target_x=jnp.float32(2.0), target_y=jnp.float32(1.0)),
                   systems.make_params("vllm-offload", MODEL)):
        host_params = jax.device_get(params)
        by_importance = int(host_params.placement_policy) == PLACEMENT_IMPORTANCE_RATIO
        for trial in range(16):
            lengths = rng.integers(1, PLACE_UNITS + 1, PLACE_PROMPTS)
            latent = locality.initial_latent(params, np.uint32(trial),
                                             jnp.arange(PLACE_PROMPTS)[:, None],
                                             jnp.arange(PLACE_UNITS)[None, :])
            logits = np.asarray(_LOGITS(params, latent, jnp.asarray(lengths), 1))
            log_masses = [logits[k, :n].astype(np.float64) for k, n in enumerate(lengths)]
            free = rng.integers(0, lengths.sum() + 1, 3)
            free[SSD] = max(free[SSD], lengths.sum() - free[HBM] - free[DDR])  # admission
            if by_importance and any(near_float32_boundary(host_params, row)
                                     for row in log_masses):
                skipped += 1
                continue
            got = engine_prompt_tiers(params, log_masses, free.tolist())
            assert got == reference.prompt_tiers(host_params, log_masses, free.tolist()), trial
            assert np.all(np.bincount(np.concatenate(got), minlength=3) <= free)
            compared += 1
    assert compared >= 44 and skipped <= 4


# ---------------------------------------------------------------------------------------------
# Batching and compilation
# ---------------------------------------------------------------------------------------------

def test_vmap_over_systems_and_max_batch_equals_unbatched_rollouts():
    case = CASES[0]
    config = make_config(case.page_size)
    workload = device_workload(make_workload(case.workload_seed, case.staggered))
    sweep = [(system, batch) for system in ("pam", "ls-pim", "vllm-offload") for batch in (2, 4)]
    each = [make_params(system, case, max_batch=batch) for system, batch in sweep]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *each)
    states = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                          *[engine.init_state(config, SEED)] * len(each))
    batch_state, batch_metrics = engine.rollout_batch(config, stacked, states, workload,
                                                      ROLLOUT_STEPS)
    for k, params in enumerate(each):
        state, metrics = engine.rollout_jit(config, params, engine.init_state(config, SEED),
                                            workload, ROLLOUT_STEPS)
        for one, batched in ((state, batch_state), (metrics, batch_metrics)):
            for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(one), strict=True):
                np.testing.assert_allclose(np.asarray(got, np.float64)[k],
                                           np.asarray(want, np.float64), rtol=1e-6, atol=0,
                                           err_msg=str(sweep[k]))
        assert int(np.max(metrics.decode_requests)) == sweep[k][1]  # max_batch is honoured


def test_rollout_jit_compiles_once_for_the_same_shapes():
    case = CASES[0]
    config = make_config(case.page_size)
    workload = device_workload(make_workload(case.workload_seed, case.staggered))
    engine.rollout_jit(config, make_params("pam", case), engine.init_state(config, SEED),
                       workload, ROLLOUT_STEPS)
    compiled = engine.rollout_jit._cache_size()
    other = make_params("ls-pim", case, max_batch=2)  # other values, same shapes
    _, metrics = engine.rollout_jit(config, other, engine.init_state(config, SEED + 1),
                                    workload, ROLLOUT_STEPS)
    assert engine.rollout_jit._cache_size() == compiled
    assert int(np.max(metrics.decode_requests)) == 2
