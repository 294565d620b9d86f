"""Engine speed: the jitted engine against the plain reference loop, and an Azure replay.

Prints, in one run:

1. PAM on LLaMA3-70B at batch 256 with 2K-8K-token contexts (arxiv-sum lengths, token
   granularity): decode steps per second and tracked token-steps per second of the engine,
   next to ``pamjax.reference`` on the same case (the reference runs a few steps only; its
   per-step time is what is compared). Run under ``taskset -c 0`` for a one-core figure.
2. Wall time to replay the whole Azure LLM 2023 conversation trace (19,366 requests) for
   ``pam`` and ``vllm-offload``, compile included, with the page size and batch cap used.

Usage: python experiments/engine_benchmark.py [--quick] [--trace PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import numpy as np

from pamjax import engine
from pamjax.reference import reference_init, reference_step
from pamjax.simulation import device_workload, make_config, simulate
from pamjax.systems import make_params
from pamjax.workload import Workload, default_azure_trace_path, load_trace, synthetic


def engine_vs_reference(batch: int, engine_steps: int, reference_steps: int) -> dict:
    # A queue of 2K-8K-token requests, all prefilled before timing starts.
    base = synthetic("arxiv-sum", batch, seed=0)
    workload = Workload(np.zeros(batch), base.prompt_tokens, np.full(batch, 4096),
                        name="arxiv-sum")
    config = make_config(workload, batch, page_size=1)
    params = make_params("pam", "llama3-70b", max_batch=batch, page_size=1)
    params = params.replace(prefill_token_budget=np.int32(2**30))
    dev = device_workload(workload)

    state = engine.init_state(config, 0)
    state, _ = engine.rollout_jit(config, params, state, dev, 1)  # admits the whole batch
    state, _ = engine.rollout_jit(config, params, state, dev, engine_steps)  # compile + warm
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, metrics = engine.rollout_jit(config, params, state, dev, engine_steps)
    jax.block_until_ready(state)
    engine_s = (time.perf_counter() - start) / engine_steps
    tokens = float(np.mean(np.asarray(metrics.tier_units).sum(-1)))

    ref_state = reference_init(config, 0)
    ref_state, _ = reference_step(config, params, ref_state, workload)  # admission
    start = time.perf_counter()
    for _ in range(reference_steps):
        ref_state, _ = reference_step(config, params, ref_state, workload)
    reference_s = (time.perf_counter() - start) / reference_steps
    return {
        "batch": batch, "tracked_tokens": tokens,
        "engine_steps_per_s": 1.0 / engine_s,
        "engine_token_steps_per_s": tokens / engine_s,
        "reference_steps_per_s": 1.0 / reference_s,
        "reference_token_steps_per_s": tokens / reference_s,
        "engine_vs_reference_speedup": reference_s / engine_s,
    }


def azure_replay(path, system: str, max_batch: int, page_size: int, limit) -> dict:
    workload = load_trace(path, max_requests=limit)
    start = time.perf_counter()
    result = simulate(system, "llama3-70b", workload, max_batch=max_batch,
                      page_size=page_size, chunk_steps=4096)
    wall = time.perf_counter() - start
    s = result.summary
    return {"system": system, "requests": workload.num_requests, "max_batch": max_batch,
            "page_size": page_size, "wall_seconds_with_compile": wall,
            "requests_per_wall_s": workload.num_requests / wall, "steps": s["steps"],
            "requests_finished": s["requests_finished"],
            "simulated_seconds": s["simulated_seconds"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="batch 64 and the first 2,000 trace requests")
    parser.add_argument("--trace", default=None, help="Azure trace (default: $PAMJAX_TRACE "
                        "or ../shared/traces/azure_llm_2023_conv.csv)")
    parser.add_argument("--json", default=None, help="write the figures as JSON")
    args = parser.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{len(os.sched_getaffinity(0))} CPU core(s) available")
    batch = 64 if args.quick else 256
    speed = engine_vs_reference(batch, engine_steps=16, reference_steps=1 if args.quick else 2)
    print(f"\nPAM, llama3-70b, batch {batch}, 2K-8K-token contexts, token granularity "
          f"({speed['tracked_tokens']:.0f} tracked tokens)")
    print(f"  engine    : {speed['engine_steps_per_s']:8.2f} steps/s "
          f"{speed['engine_token_steps_per_s']:12.4g} token-steps/s")
    print(f"  reference : {speed['reference_steps_per_s']:8.4f} steps/s "
          f"{speed['reference_token_steps_per_s']:12.4g} token-steps/s")
    print(f"  speedup   : {speed['engine_vs_reference_speedup']:.1f}x (target >= 50x per core)")

    results = {"engine_vs_reference": speed, "azure": []}
    trace = args.trace or default_azure_trace_path()
    if trace is None or not pathlib.Path(trace).is_file():
        print("\nAzure replay skipped: no trace (set PAMJAX_TRACE or pass --trace)")
    else:
        limit = 2000 if args.quick else None
        print(f"\nAzure conversation trace replay ({'2,000' if limit else 'all'} requests, "
              f"compile included; target < 60 s each)")
        for system in ("vllm-offload", "pam"):
            row = azure_replay(trace, system, max_batch=64, page_size=256, limit=limit)
            results["azure"].append(row)
            print(f"  {system:12s}: {row['wall_seconds_with_compile']:7.1f} s wall, "
                  f"{row['requests_per_wall_s']:8.1f} requests/s, {row['steps']} steps, "
                  f"{row['requests_finished']}/{row['requests']} finished, "
                  f"{row['simulated_seconds']:.0f} simulated s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
