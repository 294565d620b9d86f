"""What the conclusions hinge on (issue 18): Morris screening of every [D] assumption for
PAM over LS-PIM and PAM over vLLM-offload, at a short-context and a long-context setup, and
the what-would-it-take table for a headline ratio.

One vmapped evaluation per setup serves both comparisons (PAM's configurations are shared).
Writes <out>/<setup>_<comparison>.json and .png, <out>/what_would_it_take_*.json.

    python experiments/sensitivity.py --out experiments/sensitivity --samples 2
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from pamjax.provenance import record
from pamjax.studies import sensitivity as sens

SETUPS = {"short": ("llama3-70b", "sharegpt", 128), "long": ("llama3-70b", "write-doc", 64),
          "offline": ("llama3-70b", "write-doc", 256)}
"""(model, workload, batch): reduced batches so that a screening fits a shared 2-core CPU;
``offline`` is the publication's smallest offline batch for LLaMA3-70B (KV spills HBM)."""
PAGE = 16
"""Tokens per KV unit, fixed for every point of a setup (coarser than token granularity,
for speed; the same for every configuration compared)."""
COMPARISONS = (("pam", "ls-pim"), ("pam", "vllm-offload"))


def morris(out: pathlib.Path, setup: str, samples: int, steps: int, warmup: int) -> None:
    model, workload, batch = SETUPS[setup]
    study = sens.make_study(model, workload, ("pam", "ls-pim", "vllm-offload"), batch=batch,
                            steps=steps, warmup=warmup, page_size=PAGE)
    start = time.perf_counter()
    unit = sens.design(sens.PARAMETERS, "morris", samples, seed=0)
    ev = sens.evaluate(study, [{}] + sens.values_of(sens.PARAMETERS, unit),
                       progress=f"{setup}: {unit.shape[0] + 1} points x 3 systems")
    wall = time.perf_counter() - start
    for j, (a, b) in enumerate(COMPARISONS, start=1):
        ratio = ev.throughput[:, 0] / ev.throughput[:, j]
        rows = sens.analyze(sens.PARAMETERS, "morris", unit, ratio[1:])
        rows.sort(key=lambda r: -r["mu_star"])
        result = {"parameters": rows, "metric": "ratio", "method": "morris",
                  "systems": [a, b], "model": model, "workload": workload, "batch": batch,
                  "steps": steps, "warmup": warmup, "samples": samples,
                  "nominal_value": float(ratio[0]), "evaluations": int(unit.shape[0] + 1),
                  "simulations": ev.simulations, "compiled_calls": ev.compiled_calls,
                  "compilations": ev.compilations, "wall_seconds": wall,
                  "shared_with": "one evaluation of pam, ls-pim and vllm-offload serves "
                                 "both comparisons of this setup",
                  "page_size": PAGE,
                  "provenance": record(systems=[a, b], seed=0, workload={"name": workload})}
        stem = out / f"{setup}_{a}_over_{b}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        label = f"{a}/{b} throughput ratio (batch {batch})"
        sens.tornado(stem.with_suffix(".png"), result, label=label,
                     title=f"{model} {workload}, batch {batch}: what {a}/{b} hinges on "
                           f"(nominal {ratio[0]:.3g}; Morris, {samples} trajectories)")
        top = ", ".join(f"{r['name']} {r['mu_star']:.3g}" for r in rows[:5])
        print(f"{setup} {a}/{b}: nominal {ratio[0]:.4g}, {unit.shape[0] + 1} points, "
              f"{ev.simulations} simulations, {ev.compiled_calls} compiled calls, "
              f"{wall:.0f} s; top: {top}", flush=True)


def claim(out: pathlib.Path, setup: str, a: str, b: str, ratio: float, steps: int,
          warmup: int, iterations: int) -> None:
    model, workload, batch = SETUPS[setup]
    study = sens.make_study(model, workload, (a, b), batch=batch, steps=steps, warmup=warmup,
                            page_size=PAGE)
    result = sens.what_would_it_take(study, ratio, iterations=iterations, progress=True)
    result.update(systems=[a, b], model=model, workload=workload, batch=batch,
                  provenance=record(systems=[a, b], seed=0, workload={"name": workload}))
    path = out / f"what_would_it_take_{setup}_{a}_over_{b}_{ratio:g}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"{setup} {a}/{b}={ratio:g}: nominal {result['nominal_ratio']:.4g}, "
          f"{result['simulations']} simulations, {result['wall_seconds']:.0f} s", flush=True)
    for r in result["rows"][:8]:
        print("  ", {k: r[k] for k in ("name", "side", "bound_value", "value", "distance",
                                        "inside")}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/sensitivity")
    ap.add_argument("--setups", default="short,long")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--claim", default="", help="SETUP:A/B=R[,...] what-would-it-take runs")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--skip-morris", action="store_true")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.seterr(divide="ignore", invalid="ignore")
    if not args.skip_morris:
        for setup in args.setups.split(","):
            morris(out, setup, args.samples, args.steps, args.warmup)
    for text in filter(None, args.claim.split(",")):
        setup, rest = text.split(":")
        pair, ratio = rest.split("=")
        a, b = pair.split("/")
        claim(out, setup, a, b, float(ratio), args.steps, args.warmup, args.iterations)


if __name__ == "__main__":
    main()
