"""One vmapped batch of C PAM configurations over the first N requests of the Azure
conversation trace (a synthetic ShareGPT workload at the trace's rate when the trace is
absent): experiments/device_check.sh runs it on a GPU (C = 1024) and, to show it works, on
a CPU at a reduced size.

The C configurations are PAM on LLaMA3-70B (batch <= 64, 16-token pages) with distinct
access-model seeds and swap budgets (1..8 pages per step, cycling): one compiled program,
engine.rollout_batch (the call simulation.run_batch makes), run in chunks of ``--chunk``
steps until every configuration has finished every request or ``--budget-s`` wall seconds
have passed. Writes a JSON of the figures (configuration-steps per second, requests
finished, compile time) to ``--out``.

    python experiments/vmapped_batch.py --configs 1024 --requests 2000 --out vmapped.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from pamjax import engine
from pamjax.simulation import device_workload, make_config, stack
from pamjax.systems import make_params, max_bank_groups
from pamjax.traces import default_azure_trace_path, load_trace
from pamjax.types import STATUS_FINISHED
from pamjax.workload import synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    path = default_azure_trace_path()
    if path is not None and path.is_file():
        workload, source = load_trace(path, max_requests=args.requests), str(path)
    else:
        workload = synthetic("sharegpt", args.requests, seed=0, rate_per_s=5.4)
        source = "synthetic sharegpt at 5.4 requests/s (no trace)"
    config = make_config(workload, 64, page_size=args.page_size,
                         padded_bank_groups=max_bank_groups())
    base = make_params("pam", "llama3-70b", max_batch=64, page_size=args.page_size)
    budgets = np.arange(args.configs) % 8 + 1
    params = stack([base.replace(swap_budget=np.int32(b * args.page_size)) for b in budgets[:8]])
    params = jax.tree.map(lambda x: x[np.arange(args.configs) % 8], params)
    one = jax.device_get(engine.init_state(config, 0))
    state = stack([one] * args.configs).replace(seed=np.arange(args.configs, dtype=np.uint32))
    dev = device_workload(workload)

    start = time.perf_counter()
    state, _ = engine.rollout_batch(config, params, state, dev, args.chunk)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start  # includes the first chunk
    steps, start = args.chunk, time.perf_counter()
    finished = 0
    while time.perf_counter() - start < args.budget_s:
        state, _ = engine.rollout_batch(config, params, state, dev, args.chunk)
        steps += args.chunk
        finished = int(np.sum(np.asarray(state.req_status) == STATUS_FINISHED))
        if finished == args.configs * workload.num_requests:
            break
    wall = time.perf_counter() - start
    timed = steps - args.chunk
    out = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "workload": source, "requests": workload.num_requests, "configs": args.configs,
           "page_size": config.page_size, "units_per_slot": config.units_per_slot,
           "steps": steps, "timed_steps": timed, "wall_s": wall,
           "compile_and_first_chunk_s": compile_s,
           "config_steps_per_s": args.configs * timed / max(wall, 1e-9),
           "ms_per_step_all_configs": wall / max(timed, 1) * 1e3,
           "requests_finished": finished,
           "requests_finished_share": finished / (args.configs * workload.num_requests),
           "simulated_seconds_mean": float(np.mean(np.asarray(state.clock_whole)
                                                   + np.asarray(state.clock_frac)))}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
