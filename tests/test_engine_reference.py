"""The JAX engine against the plain reference model (pamjax.reference), step by step.

Side by side: at every step the jitted ``engine.step`` runs, and ``reference_step`` runs from
the *same* state (the engine's, converted to a RefState); the two next states and step
metrics are compared, so a disagreement is pinned to one step and never snowballs. Whole
free-running rollouts of both are compared too, where no known deviation applies.

Tolerances (float32 engine against the float64 reference):
  * exact: tier table, bank groups, selection, activation history, slots, request statuses,
    the FCFS pointer and every integer metric (units per tier, selected, persisted and
    migrated units, admissions, rejections);
  * rtol 1e-5: importance (atol 1e-9), latents (atol 1e-6), selected mass, step, attention
    and per-tier attention times, each energy component;
  * atol 1e-6 s: the clock, idle jumps, first-token and finish times (float32 clock).

The engine ranks units by bisection where the reference sorts. The configs here use 48
bisection iterations so that the bracket (value span / 2**48) separates every two distinct
float32 masses and logits; at the default 20, units whose prefill masses differ by less than
about 2e-6 are ordered by position instead (see
``test_prompt_placement_ranks_by_importance_at_default_bisection``).

Known engine deviations from the documented model are listed in ``DEVIATIONS``; each has a
minimal strict-xfail reproducer below, and the side-by-side tests tolerate exactly the
quantities a deviation perturbs (and xfail when they differ), staying strict on the rest.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pamjax import engine, placement, reference, systems
from pamjax.simulation import device_workload
from pamjax.types import (ENERGY_COMPONENTS, STATUS_FINISHED, STATUS_RUNNING, EngineConfig,
                          StepMetrics)
from pamjax.workload import Workload

SYSTEM_NAMES = ("pam", "ls-pim", "l-pim", "vllm-offload", "attacc", "pam-no-pamattention",
                "pam-no-mapping", "pam-no-scheduling")
MODEL = "llama3-8b"
NUM_SLOTS = 4
NUM_REQUESTS = 6
UNITS_PAGE_1 = 80  # prompts <= 60 tokens, outputs <= 14: contexts < 80 tokens
SEED = 7
HBM, DDR, SSD = 0, 1, 2

PARTIALS = ("engine.step counts a request's partial results on a tier as min(attended units, "
            "bank groups) instead of the bank groups that hold its attended units")
LABELS = ("engine.step charges the selection-label reads on the tiers the tokens occupy after "
          "this step's scheduling, not where they were when they were selected")
SSD_OVERFILL = ("placement.initial_tiers sends PAM's SSD-bound prompt units to SSD without "
                "checking SSD room (admission reserves total capacity, not per tier)")
TIME_FIELDS = frozenset({"step_time_s", "attention_s", "tier_attention_s", "clock",
                         "req_first_token_s", "req_finish_s"})


class KnownEngineDeviation(AssertionError):
    """The engine differs from the reference exactly where a known deviation says it does."""


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
    Case("t0-page1", 1, False, (40, 60, 2000), (4, 2, 3), 0,
         (("persistence", 0.8), ("target_x", 8.0), ("target_y", 2.0))),
    # Pages of 4 tokens, arrivals over time with an idle gap, sequential runs of 3 units,
    # a prefill token budget, and an explicit 2:1:1 target that makes PAM swap often.
    Case("staggered-page4", 4, True, (10, 15, 500), (4, 2, 3), 1,
         (("persistence", 0.8), ("target_x", 2.0), ("target_y", 1.0),
          ("naive_run_units", 3), ("prefill_token_budget", 64))),
    # One bank group per device, batch cap 3: every engine count is exact here.
    Case("staggered-1bg", 1, True, (30, 30, 2000), (1, 1, 1), 2,
         (("persistence", 0.8), ("target_x", 4.0), ("target_y", 2.0), ("max_batch", 3))),
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


def make_config(page_size: int, bisection_iters: int = 48) -> EngineConfig:
    return EngineConfig(num_slots=NUM_SLOTS, units_per_slot=-(-UNITS_PAGE_1 // page_size),
                        page_size=page_size, num_requests=NUM_REQUESTS, bank_groups=4,
                        window=10, max_swaps=8, admit_window=NUM_SLOTS,
                        bisection_iters=bisection_iters)


def make_params(system: str, case: Case, **extra):
    params = systems.make_params(system, MODEL, max_batch=NUM_SLOTS, page_size=case.page_size)
    changes = {name: jnp.asarray(value, getattr(params, name).dtype)
               for name, value in case.overrides + tuple(extra.items())}
    return params.replace(capacity_units=jnp.asarray(case.capacity_units, jnp.int32),
                          bank_groups=jnp.asarray(case.bank_groups, jnp.float32), **changes)


def known_deviations(system: str, case: Case) -> dict[str, frozenset[str]]:
    """Known engine deviations that apply to a system and case, with what each perturbs."""
    spec = systems.get_system(system)
    found = {}
    if spec.attention_on_pim and max(case.bank_groups) > 1:
        perturbed = {"energy_pj.reduction"}
        if not spec.use_pamattention:  # every partial crosses the tier's link
            perturbed |= TIME_FIELDS | {"energy_pj.transfer"}
        found[PARTIALS] = frozenset(perturbed)
    if spec.sparse and spec.swap_budget > 0 and case.page_size > 1:
        found[LABELS] = TIME_FIELDS | {"energy_pj.pim_attention"}
    return found


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

    deviations = known_deviations(system, case)
    tolerated = frozenset().union(*deviations.values())
    unexplained = {name: found for name, found in run.mismatches.items()
                   if name not in tolerated}
    assert not unexplained, f"engine and reference disagree (first step, values): {unexplained}"
    if run.mismatches:
        pytest.xfail("known engine deviation(s): " + " | ".join(deviations))


def _stack_steps(history: list[reference.RefMetrics], name: str) -> np.ndarray:
    return np.stack([np.asarray(getattr(m, name), np.float64) for m in history])


ROLLOUT_STEPS = 96


FREE_RUNNING = [("vllm-offload", CASES[0]), ("pam", CASES[2]), ("l-pim", CASES[2]),
                ("pam-no-mapping", CASES[2])]


@pytest.mark.parametrize("system,case", FREE_RUNNING,
                         ids=[f"{system}-{case.name}" for system, case in FREE_RUNNING])
def test_free_running_rollouts_agree(system, case):
    assert not known_deviations(system, case)
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
    # HBM-PIM: 40 stacks; each min(1024 banks x 1 KB row / (166 cycles at 1.3 GHz) = 8.2 TB/s
    # internal, 1.6 TFLOPS x 1 B/FLOP) = 1.6 TB/s. The context fits one sequential run (64
    # tokens), so the request's KV slice in every stack sits in one bank group.
    stacks, stack_rate = 40, 1.6e12
    busiest = context * kv_bytes / stacks / (stack_rate / groups_per_stack)
    # Q to the tier and one partial (o, m, l in float32) back: with in-stack reduction one
    # per request, with central reduction one per bank group holding its tokens, also one.
    # Over 40 x 665.6 GB/s, plus two link latencies of 0.5 us per layer.
    q_bytes = layers * q_heads * head_dim * 2
    partial = layers * q_heads * (head_dim + 2) * 4
    link = (q_bytes + partial) / (stacks * 1024 * 5.2e9 / 8) + 2 * layers * 0.5e-6
    return fc + busiest + link


def _one_request(system: str, groups_per_stack: int):
    """A 40-token prompt, 3 output tokens; HBM alone holds its KV."""
    host = Workload(np.zeros(1), np.array([40]), np.array([3]))
    config = EngineConfig(num_slots=1, units_per_slot=48, num_requests=1, bank_groups=256,
                          admit_window=1)
    params = systems.make_params(system, MODEL, max_batch=1)
    params = params.replace(bank_groups=params.bank_groups.at[HBM].set(groups_per_stack))
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


@pytest.mark.parametrize("system,groups_per_stack", [
    pytest.param(*case, marks=pytest.mark.xfail(strict=True, raises=KnownEngineDeviation,
                                                reason=PARTIALS))
    if case == ("l-pim", 256) else case for case in HAND_CASES])
def test_engine_decode_step_by_hand(system, groups_per_stack):
    config, params, host = _one_request(system, groups_per_stack)
    state, _ = _STEP(config, params, engine.init_state(config, SEED), device_workload(host))
    _, metrics = _STEP(config, params, state, device_workload(host))
    assert int(metrics.decode_requests) == 1
    assert np.asarray(metrics.tier_units).tolist() == [41, 0, 0]
    want = hand_decode_step_s(41, groups_per_stack)
    if not np.isclose(float(metrics.step_time_s), want, rtol=1e-5, atol=0):
        raise KnownEngineDeviation(f"step {float(metrics.step_time_s)!r} s, by hand {want!r} s")


# ---------------------------------------------------------------------------------------------
# Minimal reproducers of the known deviations
# ---------------------------------------------------------------------------------------------

@pytest.mark.xfail(strict=True, raises=KnownEngineDeviation, reason=LABELS)
def test_selection_labels_are_charged_where_tokens_were_selected():
    """One PAM request, pages of 4: a partly filled HBM page is swapped with a full DDR page."""
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
    c = ENERGY_COMPONENTS.index("pim_attention")
    if not np.isclose(float(metrics.energy_pj[c]), ref_metrics.energy_pj[c], rtol=1e-5):
        raise KnownEngineDeviation(
            f"PIM attention energy {float(metrics.energy_pj[c])!r} pJ, labels read before "
            f"scheduling give {ref_metrics.energy_pj[c]!r} pJ")


@pytest.mark.xfail(strict=True, raises=KnownEngineDeviation, reason=SSD_OVERFILL)
def test_pam_prompt_placement_respects_ssd_capacity():
    """HBM and DDR have room for everything, SSD for 5 units: PAM still puts more there."""
    case = dataclasses.replace(CASES[0], capacity_units=(200, 200, 5))
    config = make_config(case.page_size)
    params = make_params("pam", case, target_x=2.0, target_y=1.0)
    host = make_workload(case.workload_seed, staggered=False)
    state, metrics = _STEP(config, params, engine.init_state(config, SEED),
                           device_workload(host))
    assert int(metrics.prefill_requests) == NUM_SLOTS
    held = np.asarray(metrics.tier_units)
    if held[SSD] > case.capacity_units[SSD]:
        raise KnownEngineDeviation(f"tiers hold {held.tolist()} units, capacity "
                                   f"{list(case.capacity_units)}")


@pytest.mark.xfail(strict=True, raises=KnownEngineDeviation,
                   reason="prefill ranking bisects masses with an absolute bracket of ~2e-6")
def test_prompt_placement_ranks_by_importance_at_default_bisection():
    """Six units, four of them with masses between 1e-7 and 4e-7; the DDR share needs one."""
    mass = np.array([0.6, 1e-7, 2e-7, 0.4 - 1e-6, 3e-7, 4e-7], np.float32)
    # x:y:1 = 625000:624999:1 gives HBM 1/2 of the mass (unit 0) and HBM + DDR 1 - 8e-7:
    # units 0 and 3 hold 1 - 1e-6, so the most important tiny unit (5) joins them on DDR.
    params = systems.make_params("pam", MODEL).replace(
        target_x=jnp.float32(625000.0), target_y=jnp.float32(624999.0))
    free = [100, 100, 100]
    want = reference.prompt_tiers(params, mass.astype(np.float64), len(mass), list(free))
    assert want == [HBM, SSD, SSD, DDR, SSD, DDR]
    got = placement.initial_tiers(params, jnp.asarray(mass)[None], jnp.ones((1, 6), bool),
                                  jnp.asarray(free, jnp.int32), engine.target_share(params),
                                  EngineConfig(num_slots=1, units_per_slot=6).bisection_iters)
    if np.asarray(got)[0].tolist() != want:
        raise KnownEngineDeviation(f"engine tiers {np.asarray(got)[0].tolist()}, by "
                                   f"importance {want}")


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
