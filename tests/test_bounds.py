"""Physical bounds (pamjax/studies/bounds.py): hand arithmetic, monotonicity, and the engine
against them.

The engine checks run five steady-state sweeps (study.run_sweep: in-flight requests at
their stationary contexts, refilled as they finish, a window after a warm-up). Three draw
mixed lengths from datasets (seeds 0-2, FC-bound at these batches); two use equal lengths,
one sized so that OPT-175B fills AttAcc's HBM at batch 63, one on hardware with shrunken HBM
and DDR so that KV spills to DDR and SSD and attention, PCIe and the SSD tier bind.

Which simulated throughput is held against which bound, and why that is rigorous:

* ``decode_throughput_tokens_per_s`` (decode tokens over the time of the window's
  decode-only steps) against ``prefill=False`` at the row's measured mean context
  (``mean_context_tokens``): each decode-only step with ``b_s <= batch`` requests takes at
  least ``T_iter(b_s)`` at its requests' mean context; ``T_iter`` is convex in the context
  (a max of affine terms), so the window's mean step time is at least ``T_iter`` at the
  mean context, and a ratio of sums is at most the largest ratio over ``b' <= batch``. The
  tolerance only covers float32 step times.
* ``throughput_tokens_per_s`` (every token of the window over its time) against
  ``prefill=True`` on equal-length workloads: there every refill costs exactly ``P(p)``
  prefill FLOPs for ``o`` output tokens, the steady state's share.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math

import numpy as np
import pytest

from pamjax.errors import CapacityError, ConfigError, UnknownNameError
from pamjax.hardware import get_platform
from pamjax.models import get_model
from pamjax.studies import bounds
from pamjax.studies.study import run_sweep
from pamjax.systems import MAIN_SYSTEMS, SYSTEMS, get_system, tier_kv_capacity_bytes
from pamjax.workload import DATASETS, Workload, synthetic

REQUESTS = 256
PAGE = 64
STEPS = 48
WARMUP = 8
TOLERANCE = 1e-3
"""Simulated throughput may exceed its bound by this fraction: float32 step times only."""
MIN_EFFICIENCY = 0.6
"""Every system comes within this fraction of its bound in at least one configuration.
Measured: 0.80 to 0.95 (FC weight streaming binding for llama3-70b and opt-175b; SSD-PIM or
PCIe binding when KV spills); the slack is NVLink all-reduce latency, per-layer kernel
overhead and link latencies, which the bound leaves out."""

CONSTANT_PROMPT, CONSTANT_OUTPUT = 128, 769
"""Equal-length requests of 896 KV tokens (14 pages): OPT-175B's 57,082 HBM KV tokens hold
exactly 63 of them, so AttAcc fits batch 63 and is out of memory at 64."""

SPILL_PROMPT, SPILL_OUTPUT = 2000, 1000
SPILL_PLATFORMS = {
    # 512 rows per HBM bank: 19.3 GB of HBM net of the reserve, 3.3 GB of it for KV.
    "small-hbm": {"hbm.device.rows_per_bank": 512},
    # ... and one 2.1 GB DIMM: most of a batch of 64 x 2000 tokens must go to the SSDs.
    "small-hbm-ddr": {"hbm.device.rows_per_bank": 512, "ddr.num_devices": 1,
                      "ddr.device.rows_per_bank": 16384},
}

ABLATIONS = ("pam", "pam-no-pamattention", "pam-no-mapping", "pam-no-scheduling", "ls-pim")


def _dataset(name, seed):
    wl = synthetic(name, REQUESTS, seed=seed)
    return Workload(wl.arrival_s, wl.prompt_tokens, wl.output_tokens, f"{name}-seed{seed}")


def _constant(prompt, output):
    return Workload(np.zeros(REQUESTS), np.full(REQUESTS, prompt), np.full(REQUESTS, output),
                    name=f"constant-{prompt}-{output}")


SWEEPS = {
    # name: (systems, models, workload, batches, {label: platform overrides} or None, equal
    # lengths (prompt, output) or None); 5 x 2 x 2 = 20 points each.
    "sharegpt": (MAIN_SYSTEMS, ("llama3-8b", "llama3-70b"), lambda: _dataset("sharegpt", 0),
                 (16, 64), None, None),
    "arxiv-sum": (MAIN_SYSTEMS, ("llama3-8b", "qwen2.5-32b"),
                  lambda: _dataset("arxiv-sum", 1), (16, 64), None, None),
    "humaneval": (ABLATIONS, ("llama3-70b", "llama3-8b"), lambda: _dataset("humaneval", 2),
                  (16, 64), None, None),
    "capacity": (MAIN_SYSTEMS, ("opt-175b", "qwen2.5-32b"),
                 lambda: _constant(CONSTANT_PROMPT, CONSTANT_OUTPUT), (63, 64), None,
                 (CONSTANT_PROMPT, CONSTANT_OUTPUT)),
    "spill": (MAIN_SYSTEMS, ("llama3-8b",), lambda: _constant(SPILL_PROMPT, SPILL_OUTPUT),
              (16, 64), SPILL_PLATFORMS, (SPILL_PROMPT, SPILL_OUTPUT)),
}


@pytest.fixture(scope="module")
def sweeps():
    """{sweep name: [(row, bound arguments for the row's workload and platform)]}."""
    result = {}
    for name, (systems, models, make, batches, overrides, lengths) in SWEEPS.items():
        workload = make()
        platforms = None if overrides is None else {
            label: get_platform(overrides=o) for label, o in overrides.items()}
        rows = run_sweep(list(systems), list(models), workload, batches, steps=STEPS,
                         warmup=WARMUP, page_size=PAGE, platforms=platforms)
        result[name] = [(row, dict(workload=workload, lengths=lengths,
                                   platform=platforms[row["platform"]] if platforms else None))
                        for row in rows]
    return result


def _decode_bound(row, workload, lengths, platform):
    """Rigorous bound (tokens/s) on a row's decode-only throughput (see module docstring)."""
    return bounds.run_bound(row["system"], row["model"], prompts=workload.prompt_tokens,
                            outputs=workload.output_tokens, concurrency=row["batch"],
                            prefill=False, platform=platform,
                            mean_context=row["mean_context_tokens"]).tokens_per_s


# ------------------------------------------------------------------------------------------
# Closed forms by hand
# ------------------------------------------------------------------------------------------

# LLaMA3-70B from its public config: per layer Q,O 2*8192*64*128, K,V 2*8192*8*128,
# SwiGLU FFN 3*8192*28672; LM head 128256*8192 (untied).
LLAMA70_PARAMS = 80 * (2 * 8192 * 64 * 128 + 2 * 8192 * 8 * 128 + 3 * 8192 * 28672) \
    + 128256 * 8192
LLAMA70_KV = 2 * 80 * 8 * 128 * 2  # bytes per token
GPU_FLOPS = 8 * 989e12 * 0.7  # 8 H100s at 70% of dense BF16 peak
GPU_BYTES = 3.35e12 * 0.85  # one H100's HBM3 at 85% of peak


def test_gpu_bounds_by_hand():
    # vLLM-offload, LLaMA3-70B, one request at 1000 tokens, decode only. FC: 2 FLOPs and 2
    # bytes per streamed parameter; the weights are read by TP = 4 GPUs in sequence over the
    # PP = 2 stages. Attention: the KV is read by all 8 GPUs from their HBM.
    flops = bytes_ = 2 * LLAMA70_PARAMS
    fc = max(flops / GPU_FLOPS, bytes_ / (4 * GPU_BYTES))
    kv = 1000 * LLAMA70_KV / (8 * GPU_BYTES)
    attention_flops = 4 * 80 * 64 * 128 * 1000 / GPU_FLOPS
    iteration = fc + max(kv, attention_flops)
    b = bounds.bound("vllm-offload", "llama3-70b", mean_prompt=500, mean_output=1000,
                     mean_context=1000, batch=1, prefill=False)
    assert b.batch == 1 and b.batch_limit == "batch"
    assert b.iteration_s == pytest.approx(iteration, rel=1e-9)
    assert b.tokens_per_s == pytest.approx(1 / iteration, rel=1e-9)
    assert b.per_resource["gpu_hbm"] == pytest.approx(1 / (bytes_ / (4 * GPU_BYTES) + kv),
                                                      rel=1e-9)
    assert b.per_resource["gpu_compute"] == pytest.approx(
        1 / (flops / GPU_FLOPS + attention_flops), rel=1e-9)
    assert b.per_resource["pcie"] == math.inf  # 1000 tokens fit GPU HBM
    assert b.binding_resource == "gpu_hbm"


def test_prefill_amortisation_by_hand():
    # The same request with prefill charged: P(p) = F p + 4 L Hq D p (p + 1) / 2 FLOPs once
    # per request, and o - 1 of its o tokens come from decode iterations.
    p, o = 500, 1000
    prefill = (2 * LLAMA70_PARAMS * p + 4 * 80 * 64 * 128 * p * (p + 1) / 2) / GPU_FLOPS
    decode = bounds.bound("vllm-offload", "llama3-70b", mean_prompt=p, mean_output=o,
                          mean_context=1000, batch=1, prefill=False)
    whole = bounds.bound("vllm-offload", "llama3-70b", mean_prompt=p, mean_output=o,
                         mean_context=1000, batch=1)
    tau = prefill / o + (1 - 1 / o) * decode.iteration_s
    assert whole.tokens_per_s == pytest.approx(1 / tau, rel=1e-9)


def test_capacity_forced_ssd_bound_by_hand():
    # PAM, LLaMA3-8B, one request of 20 M tokens: more than HBM and DDR hold, so the rest
    # must sit on the SSDs and have its selection labels (1/8 of the key, 1/16 of K+V) read
    # there. SSD-PIM rate: 8 SSDs x min(8 channels x min(4 dies x 16 KB / 30 us, 2400 MT/s
    # x 1 byte), 18 GFLOPS / g) with g = 32 / 8 = 4 query heads per KV head: the compute
    # cap binds, 4.5 GB/s per SSD.
    model = get_model("llama3-8b")
    kv = 2 * 32 * 8 * 128 * 2
    hbm, ddr, _ = tier_kv_capacity_bytes(get_platform(), model) / kv
    ssd_rate = 8 * min(8 * min(4 * 16384 / 30e-6, 2.4e9), 18e9 / 4)
    context = 20_000_000
    ssd_time = (context - hbm - ddr) * kv / 16 / ssd_rate
    b = bounds.bound("pam", model, mean_prompt=15_000_000, mean_output=10_000_000,
                     mean_context=context, batch=1, prefill=False)
    assert b.batch == 1
    assert b.per_resource["pim_ssd"] == pytest.approx(1 / ssd_time, rel=1e-9)
    assert b.per_resource["pim_hbm"] == b.per_resource["pim_ddr"] == math.inf
    assert b.per_resource["pim_tiers"] == pytest.approx(b.per_resource["pim_ssd"], rel=1e-9)
    assert b.binding_resource == "pim_ssd"


def test_capacity_batch_by_hand():
    # A request holds p + o - 1 KV tokens at its last decode step.
    model = get_model("opt-175b")
    hbm_tokens = tier_kv_capacity_bytes(get_platform(), model)[0] / model.kv_bytes_per_token
    expected = math.floor(hbm_tokens / (CONSTANT_PROMPT + CONSTANT_OUTPUT - 1))
    assert expected == 63
    assert bounds.capacity_batch("attacc", model, mean_prompt=CONSTANT_PROMPT,
                                 mean_output=CONSTANT_OUTPUT) == expected
    b = bounds.bound("attacc", model, mean_prompt=CONSTANT_PROMPT,
                     mean_output=CONSTANT_OUTPUT)
    assert b.capacity_batch == b.max_batch == 63 and b.batch_limit == "kv_capacity"


# ------------------------------------------------------------------------------------------
# Structure: monotonicity, SLO, batch search
# ------------------------------------------------------------------------------------------

FASTER = {
    "gpu.hbm_tbps": 6.7, "gpu.peak_tflops": 1978.0, "gpu.pcie_gbps": 126.0,
    "hbm.device.compute_cap_gflops": 3200.0, "ddr.device.compute_cap_gflops": 408.0,
    "ssd.device.tR_us": 15.0, "ddr.link_gbps": 51.2, "ssd.link_gbps": 28.0,
    "ddr.num_devices": 80, "hbm.num_devices": 48,
}


@pytest.mark.parametrize("field", sorted(FASTER))
def test_more_bandwidth_or_compute_never_lowers_a_bound(field):
    faster = get_platform(overrides={field: FASTER[field]})
    grid = 2.0**-12  # resolution of the batch search above 4096
    for system in SYSTEMS:
        for model, workload in (("llama3-8b", "arxiv-sum"), ("opt-175b", "sharegpt")):
            stats = DATASETS[workload]
            for kw in ({}, {"batch": 64}, {"slo_ms": 100.0}, {"batch": 512, "slo_ms": 50.0}):
                args = dict(mean_prompt=stats.prompt_mean, mean_output=stats.output_mean, **kw)
                base = bounds.bound(system, model, **args)
                more = bounds.bound(system, model, platform=faster, **args)
                assert more.tokens_per_s >= base.tokens_per_s * (1 - grid), \
                    (system, model, kw, base, more)


def test_bound_is_nondecreasing_in_batch_and_fractions():
    stats = dict(mean_prompt=4000, mean_output=220)
    for system in SYSTEMS:
        values = [bounds.bound(system, "llama3-70b", batch=b, **stats).tokens_per_s
                  for b in (1, 2, 8, 64, 512, 4096, 40_000)]
        assert values == sorted(values), system
        low = bounds.bound(system, "llama3-70b", batch=256, compute_fraction=0.5,
                           bandwidth_fraction=0.5, **stats)
        peak = bounds.bound(system, "llama3-70b", batch=256, compute_fraction=1.0,
                            bandwidth_fraction=1.0, **stats)
        assert low.tokens_per_s <= peak.tokens_per_s


def test_slo_limits_the_batch():
    stats = dict(mean_prompt=161, mean_output=373)
    free = bounds.bound("pam", "opt-175b", **stats)
    tight = bounds.bound("pam", "opt-175b", slo_ms=40.0, **stats)
    assert tight.batch_limit == "slo" and tight.slo_batch == tight.max_batch
    assert tight.max_batch < free.max_batch
    assert tight.iteration_s <= 40e-3 and tight.tokens_per_s <= free.tokens_per_s
    # One more request would break the SLO even at the lower bound (decode-only throughput
    # at b is b / T_iter(b)).
    edge = np.array([tight.max_batch, tight.max_batch + 1])
    iteration = edge / bounds.throughput_curve("pam", "opt-175b", edge, prefill=False, **stats)
    assert iteration[0] <= 40e-3 < iteration[1]
    # No batch at all meets an SLO below one request's weight streaming.
    none = bounds.bound("pam", "opt-175b", slo_ms=1.0, **stats)
    assert none.tokens_per_s == 0 and none.max_batch == 0 and none.binding_resource == "slo"


def test_bound_maximises_over_batches_up_to_the_limit():
    # vLLM-offload past GPU HBM: KV spills to PCIe and throughput per batch falls, so the
    # bound is reached below the capacity batch.
    b = bounds.bound("vllm-offload", "llama3-70b", mean_prompt=4000, mean_output=3000)
    curve = bounds.throughput_curve("vllm-offload", "llama3-70b", [b.batch, b.max_batch],
                                    mean_prompt=4000, mean_output=3000)
    assert b.batch < b.max_batch and curve[0] > curve[1]
    assert b.tokens_per_s == pytest.approx(curve[0], rel=1e-12)
    spilled = bounds.bound("vllm-offload", "llama3-70b", mean_prompt=4000, mean_output=3000,
                           batch=b.max_batch)
    assert spilled.tokens_per_s == pytest.approx(b.tokens_per_s)


def test_declared_migration_is_a_resource():
    stats = dict(mean_prompt=161, mean_output=373, batch=64)
    none = bounds.bound("pam", "llama3-70b", **stats)
    moved = bounds.bound("pam", "llama3-70b", migrated_tokens_per_decode_token=50.0, **stats)
    assert "migration" not in none.per_resource
    # 50 tokens of 320 KiB per output token over HBM<->DDR (40 DIMMs x 25.6 GB/s).
    per_token = 50 * 327680 / (40 * 25.6e9) * 64 * (1 - 1 / 373) / 64
    assert moved.per_resource["migration"] == pytest.approx(1 / per_token, rel=1e-9)
    assert moved.tokens_per_s <= none.tokens_per_s
    assert "migration" not in bounds.bound("attacc", "llama3-70b",  # one tier: nothing moves
                                           migrated_tokens_per_decode_token=50.0,
                                           **stats).per_resource


# ------------------------------------------------------------------------------------------
# Claims, tables, errors, independence
# ------------------------------------------------------------------------------------------

def test_check_claim():
    stats = dict(model="llama3-70b", mean_prompt=161, mean_output=373, slo_ms=100.0)
    a = bounds.bound("pam", **stats)
    ok = bounds.check_claim("pam", "vllm-offload", 2.0, b_tokens_per_s=a.tokens_per_s / 3,
                            **stats)
    assert ok.attainable and ok.binding_resource == a.binding_resource
    no = bounds.check_claim("pam", "vllm-offload", 4.0, b_tokens_per_s=a.tokens_per_s / 3,
                            **stats)
    assert not no.attainable and "at most 3x" in no.explanation
    attainable, explanation, _ = bounds.check_claim(
        "pam", "vllm-offload", 1.0, b_tokens_per_s=1e9, **stats)
    assert not attainable and "exceeds vllm-offload's own bound" in explanation
    with pytest.raises(ConfigError, match="ratio"):
        bounds.check_claim("pam", "attacc", 0.0, b_tokens_per_s=1.0, **stats)


def test_bounds_table_rows():
    rows = bounds.bounds_table(MAIN_SYSTEMS, "llama3-70b", "sharegpt", 150.0)
    assert [r["system"] for r in rows] == list(MAIN_SYSTEMS)
    for row in rows:
        assert set(row) >= {"bound_tokens_per_s", "binding_resource", "batch_limit",
                            *(f"{r}_tokens_per_s" for r in bounds.RESOURCES)}
        finite = [v for k, v in row.items() if k.endswith("_tokens_per_s") and v is not None]
        assert row["bound_tokens_per_s"] <= min(finite) * (1 + 1e-12)
    by_system = {r["system"]: r for r in rows}
    assert by_system["vllm-offload"]["pim_tiers_tokens_per_s"] is None
    assert by_system["attacc"]["pcie_tokens_per_s"] is None
    same = bounds.bounds_table(["pam"], "llama3-70b", DATASETS["sharegpt"], 150.0)
    assert same[0] == by_system["pam"]
    columns = bounds.bound_columns("pam", "llama3-70b", 1000.0, prompts=[161] * 64,
                                   outputs=[373] * 64, concurrency=64, prefix="decode_")
    assert columns["decode_efficiency"] == pytest.approx(
        1000.0 / columns["decode_bound_tokens_per_s"])


def test_run_bound_equal_lengths_is_the_bound_at_that_batch():
    # With equal lengths the b' smallest prompts average p, so every candidate batch sits at
    # context p + 1 and the run bound is bound() searched up to the run's concurrency.
    for system in MAIN_SYSTEMS:
        for prefill in (True, False):
            run = bounds.run_bound(system, "opt-175b", prompts=[600] * 40, outputs=[200] * 40,
                                   concurrency=32, prefill=prefill)
            ref = bounds.bound(system, "opt-175b", mean_prompt=600, mean_output=200,
                               mean_context=601, batch=32, prefill=prefill)
            assert run.tokens_per_s == pytest.approx(ref.tokens_per_s, rel=1e-12)
            assert run.binding_resource == ref.binding_resource


def test_run_bound_mixed_lengths_uses_the_smallest_prompts():
    # One request of 8 tokens among 100,000-token prompts: at b' = 1 the only context a
    # run is sure of is 9 tokens, which makes a single request's decode far faster.
    prompts, outputs = [8, 100_000, 100_000], [100, 100, 100]
    run = bounds.run_bound("vllm-offload", "llama3-8b", prompts=prompts, outputs=outputs,
                           concurrency=3, prefill=False)
    assert run.batch >= 1
    at_one = bounds.throughput_curve("vllm-offload", "llama3-8b", [1], mean_prompt=8,
                                     mean_output=100, mean_context=9, prefill=False)[0]
    assert run.tokens_per_s >= at_one * (1 - 1e-12)
    with pytest.raises(ConfigError, match="concurrency"):
        bounds.run_bound("pam", "llama3-8b", prompts=[8], outputs=[8], concurrency=0)
    with pytest.raises(ConfigError, match="prompts"):
        bounds.run_bound("pam", "llama3-8b", prompts=[], outputs=[], concurrency=1)


def test_errors_name_the_input():
    stats = dict(mean_prompt=161, mean_output=373)
    with pytest.raises(UnknownNameError):
        bounds.bound("nope", "llama3-70b", **stats)
    with pytest.raises(UnknownNameError):
        bounds.bounds_table(["pam"], "llama3-70b", "no-such-dataset")
    for bad in (dict(batch=0), dict(slo_ms=-1.0), dict(compute_fraction=1.5),
                dict(mean_context=0.0), dict(migrated_tokens_per_decode_token=-1.0)):
        with pytest.raises(ConfigError):
            bounds.bound("pam", "llama3-70b", **stats, **bad)
    with pytest.raises(ConfigError, match="mean_output"):
        bounds.bound("pam", "llama3-70b", mean_prompt=161, mean_output=0.5)
    with pytest.raises(CapacityError):
        bounds.bound("pam", "opt-175b", platform=get_platform(
            overrides={"hbm.num_devices": 8}), **stats)


def test_bounds_share_no_code_with_the_engine():
    tree = ast.parse(inspect.getsource(bounds))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    assert not imported & {"pamjax.costs", "pamjax.engine", "pamjax.placement",
                           "pamjax.scheduler", "pamjax.simulation", "pamjax.studies.study"}


# ------------------------------------------------------------------------------------------
# The engine against the bounds
# ------------------------------------------------------------------------------------------

def test_engine_decode_throughput_never_exceeds_its_bound(sweeps):
    for name, points in sweeps.items():
        for row, args in points:
            if row["oom"]:
                continue
            bound = _decode_bound(row, **args)
            simulated = row["decode_throughput_tokens_per_s"]
            assert simulated > 0, (name, row["system"])
            assert simulated <= bound * (1 + TOLERANCE), \
                (name, row["platform"], row["model"], row["system"], row["batch"], simulated,
                 bound)


def test_engine_whole_run_throughput_never_exceeds_its_bound(sweeps):
    for name in ("capacity", "spill"):
        for row, args in sweeps[name]:
            if row["oom"]:
                continue
            prompt, output = args["lengths"]
            stats = dict(mean_prompt=prompt, mean_output=output,
                         mean_context=row["mean_context_tokens"], batch=row["batch"],
                         platform=args["platform"])
            whole = bounds.bound(row["system"], row["model"], **stats)
            # Prefill costs more than a decode token by orders of magnitude here, so the
            # window's prefill share (one prefill per o tokens) cannot raise throughput.
            decode = bounds.bound(row["system"], row["model"], prefill=False, **stats)
            prefill_s = get_model(row["model"]).prefill_flops(prompt) / GPU_FLOPS
            assert prefill_s > 1 / decode.tokens_per_s
            assert row["throughput_tokens_per_s"] <= whole.tokens_per_s * (1 + TOLERANCE), \
                (name, row["platform"], row["model"], row["system"], row["batch"],
                 row["throughput_tokens_per_s"], whole.tokens_per_s)


def test_sweep_rows_carry_their_bound(sweeps):
    # study.run_sweep sets every row that fits beside bounds.run_bound of its requests at
    # its batch and mean context: whole-run and decode-only, never above 1 (float32).
    for points in sweeps.values():
        for row, _ in points:
            for prefix in ("", "decode_"):
                if row["oom"]:
                    assert row[f"{prefix}bound_tokens_per_s"] is None
                    continue
                assert row[f"{prefix}binding_resource"] in bounds.RESOURCES
                assert 0 < row[f"{prefix}efficiency"] <= 1 + TOLERANCE, (prefix, row)


def test_every_system_comes_close_to_its_bound(sweeps):
    best = {}
    for points in sweeps.values():
        for row, args in points:
            if row["oom"]:
                continue
            efficiency = row["decode_throughput_tokens_per_s"] / _decode_bound(row, **args)
            best[row["system"]] = max(best.get(row["system"], 0.0), efficiency)
    assert set(best) == set(SYSTEMS)
    assert min(best.values()) >= MIN_EFFICIENCY, best


def test_spilled_kv_binds_where_it_is_forced(sweeps):
    # One DIMM and a sliver of HBM: 64 requests of 2000 tokens must keep most of their KV on
    # the SSDs, so vLLM-offload is bound by fetching it and dense L-PIM by SSD-PIM.
    rows = {(r["platform"], r["system"], r["batch"]): (r, a) for r, a in sweeps["spill"]}
    for system, resource in (("vllm-offload", "pcie"), ("l-pim", "pim_ssd")):
        row, args = rows[("small-hbm-ddr", system, 64)]
        b = bounds.bound(system, "llama3-8b", mean_prompt=SPILL_PROMPT,
                         mean_output=SPILL_OUTPUT, mean_context=row["mean_context_tokens"],
                         batch=64, exact_batch=True, prefill=False, platform=args["platform"])
        assert b.binding_resource == resource
        assert row["ssd_token_share"] > 0.5
        assert row["decode_throughput_tokens_per_s"] >= 0.5 * b.tokens_per_s


def test_capacity_bound_is_the_attacc_oom_batch(sweeps):
    rows = [row for row, _ in sweeps["capacity"]]
    attacc = {r["batch"]: r for r in rows
              if r["system"] == "attacc" and r["model"] == "opt-175b"}
    capacity = bounds.capacity_batch(get_system("attacc"), "opt-175b",
                                     mean_prompt=CONSTANT_PROMPT, mean_output=CONSTANT_OUTPUT)
    assert not attacc[capacity]["oom"] and attacc[capacity]["mean_batch"] == capacity
    assert attacc[capacity + 1]["oom"]
    # The other systems spill to DDR and SSD, so the same batch fits.
    assert not any(r["oom"] for r in rows if r["system"] != "attacc")


# ------------------------------------------------------------------------------------------
# The bound's own derivation of the PIM rates, and the offered load
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"hbm.device.tCCD_L": 8, "ddr.device.tRCD": 30},
                                       {"hbm.device.pu_buffer_bytes": 2048,
                                        "ssd.device.compute_cap_gflops": 400.0}])
@pytest.mark.parametrize("model", ["llama3-8b", "qwen2.5-32b", "llama3-70b", "opt-175b"])
@pytest.mark.parametrize("kv_bytes", [2, 1])
def test_pim_rates_agree_with_the_hardware_model(model, overrides, kv_bytes):
    # Two derivations of every tier's effective PIM rate (bounds.py's short formula and
    # hardware.py's methods) must agree, on the presets and after changing a timing, a
    # buffer or a cap, for a 16-bit and an FP8 KV cache: a drift in either shows here.
    platform = get_platform(overrides=overrides)
    m = dataclasses.replace(get_model(model), kv_bytes_per_value=kv_bytes)
    ours = bounds.pim_tier_rates(platform, m)
    theirs = np.array([t.effective_gbps(m) * 1e9 for t in platform.tiers])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_pim_rates_follow_gqa_by_hand():
    # LLaMA3-70B (g = 8) on the presets: HBM compute bound at 1.6 TFLOPS / 8 per stack; DDR
    # bound by 8 passes over its 195.6 GB/s (128 B buffer: under one 256 B head); SSD by
    # 18 GFLOPS / 8.
    rates = bounds.pim_tier_rates(get_platform(), get_model("llama3-70b"))
    ddr_internal = 128 * 1024 * 1.6e9 / 1072  # 128 banks, a 1 KB row in 1072 cycles
    np.testing.assert_allclose(rates, [40 * 200e9, 40 * ddr_internal / 8, 8 * 18e9 / 8],
                               rtol=1e-12)
    # An FP8 KV cache (1 byte per element, 2 g = 16 FLOPs per KV byte) halves the compute
    # bounds: HBM 1.6 TFLOPS / 16, SSD 18 GFLOPS / 16, and DDR's 204 GFLOPS / 16 = 12.75
    # GB/s now binds before its 8 passes (24.45 GB/s).
    fp8 = dataclasses.replace(get_model("llama3-70b"), kv_bytes_per_value=1)
    np.testing.assert_allclose(bounds.pim_tier_rates(get_platform(), fp8),
                               [40 * 100e9, 40 * 204e9 / 16, 8 * 18e9 / 16], rtol=1e-12)


def test_the_offered_load_binds_a_run_that_keeps_up():
    # 100 requests of 50 output tokens arriving over 10 s offer 500 tokens/s, far below
    # what vLLM-offload can serve: the arrivals bind.
    workload = Workload(np.linspace(0.0, 10.0, 100), np.full(100, 100), np.full(100, 50))
    offered = bounds.offered_load(workload)
    assert offered == pytest.approx(100 * 50 / 10.0)
    b = bounds.run_bound("vllm-offload", "llama3-8b", prompts=workload.prompt_tokens,
                         outputs=workload.output_tokens, concurrency=16,
                         offered_tokens_per_s=offered)
    assert b.binding_resource == "arrivals" and b.batch_limit == "arrivals"
    assert b.tokens_per_s == pytest.approx(500.0)
    assert b.per_resource["gpu_hbm"] > 500.0
    # A closed loop (everything at t = 0) offers no limit.
    assert bounds.offered_load(Workload(np.zeros(3), np.ones(3), np.ones(3))) is None
    with pytest.raises(ConfigError, match="offered_tokens_per_s"):
        bounds.run_bound("pam", "llama3-8b", prompts=[1], outputs=[1], concurrency=1,
                         offered_tokens_per_s=0.0)
