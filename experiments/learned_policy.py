"""Learned scheduling on SLO goodput: sample efficiency and held-out comparison.

Runs ``pamjax train-policy`` (pamjax.learn.goodput_study: PAM's rule, the gradient through
the relaxed serving loop, the grid, CMA-ES and random search at 10x the gradient's budget,
every policy judged by the exact engine on held-out workloads), then plots its JSON.
Writes, under ``--out``:

* ``result.json``: the command's JSON;
* ``sample_efficiency.csv`` / ``sample_efficiency.png``: held-out goodput of each method's
  incumbent against the exact-rollout equivalents it had spent (one line per method, the
  mean over seeds with each seed faint);
* ``heldout.csv`` / ``heldout.png``: held-out goodput per workload and policy (mean over
  seeds).

Usage: python experiments/learned_policy.py [--quick] [--trace PATH] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from pamjax.cli import main as pamjax_main
from pamjax.studies import plots, report
from pamjax.traces import default_azure_trace_path


def curve_rows(result: dict) -> list[dict]:
    """One row per (seed, method, point) of the sample-efficiency curves."""
    return [{"seed": seed, "method": method, "evaluations": e, "goodput_tokens_per_s": g}
            for seed, curves in zip(result["seeds"], result["sample_efficiency"])
            for method, points in curves.items() for e, g in points]


def sample_efficiency_png(path, result: dict, title: str = "") -> pathlib.Path:
    """Goodput vs evaluations spent: per method, each seed faint and the mean bold (the
    seeds' points share x positions up to the measured relaxed/exact cost ratio)."""
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = list(result["sample_efficiency"][0])
    for i, method in enumerate(methods):
        color = f"C{i}"
        runs = [np.asarray(c[method], np.float64) for c in result["sample_efficiency"]]
        for run in runs:
            ax.plot(run[:, 0], run[:, 1], color=color, alpha=0.25, lw=1)
        n = min(len(r) for r in runs)
        mean = np.mean([r[:n] for r in runs], axis=0)
        ax.plot(mean[:, 0], mean[:, 1], color=color, marker="o", lw=2, label=method)
    rule = result["heldout_goodput_tokens_per_s"]["pam_rule"]
    ax.axhline(rule, color="k", ls=":", lw=1, label="PAM rule (held out, mean)")
    ax.set_xscale("log")
    ax.set_xlabel("evaluations spent (exact-rollout equivalents)")
    ax.set_ylabel("held-out goodput, tokens/s (exact engine)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots._save(plt, fig, title or "Sample efficiency", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the QUICK setup")
    parser.add_argument("--trace", default=None,
                        help="held-out trace (default: the Azure conversation trace if found)")
    parser.add_argument("--out", default="out/learned_policy")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = args.trace or default_azure_trace_path()
    command = ["train-policy", "--seeds", str(args.seeds), "--json", str(out / "result.json")]
    command += ["--quick"] if args.quick else []
    command += ["--eval-trace", str(trace)] if trace and pathlib.Path(trace).is_file() else []
    if pamjax_main(command) != 0:
        raise SystemExit(2)
    result = json.loads((out / "result.json").read_text())
    report.write_csv(out / "sample_efficiency.csv", curve_rows(result),
                     ["seed", "method", "evaluations", "goodput_tokens_per_s"])
    sample_efficiency_png(out / "sample_efficiency.png", result)
    rows = [{"workload": w, **v} for w, v in result["heldout_by_workload"].items()]
    policies = list(result["heldout_goodput_tokens_per_s"])
    report.write_csv(out / "heldout.csv", rows, ["workload", *policies])
    plots.grouped_bars(out / "heldout.png",
                       {"held-out workloads (exact engine)":
                        ([r["workload"] for r in rows], {p: [r[p] for r in rows]
                                                         for p in policies})},
                       ylabel="goodput under the TPOT p99 SLO (tokens/s)",
                       title="PAM rule vs learned vs grid vs black-box search")
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
