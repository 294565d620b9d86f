"""Learned KV scheduling: training curve and held-out comparison with the PAM rule.

Runs ``pamjax train-policy --family both`` (pamjax.learn: training through the relaxation,
the exact-engine grid search over (x, y), and every policy judged in the exact engine on
held-out workloads), then plots its results. Writes, under ``--out``:

* ``training_curve.csv`` / ``training_curve.png``: relaxed mean decode-step time and
  temperature per iteration, per family;
* ``heldout.csv`` / ``heldout.png``: exact-engine mean decode-step time per held-out
  workload and policy (pam_rule, grid_best, learned_knobs, learned_net);
* ``grid.csv``, the checkpoints ``policy_<family>.msgpack`` and ``result.json``.

Usage: python experiments/learned_policy.py [--quick] [--trace PATH] [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib

from pamjax.cli import main as pamjax_main
from pamjax.studies import plots, report
from pamjax.traces import default_azure_trace_path


def training_curve_png(path, rows: list[dict]) -> pathlib.Path:
    plt = plots._pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        left.plot([int(r["iteration"]) for r in mine],
                  [float(r["relaxed_step_ms"]) for r in mine], marker=".", label=family)
        right.plot([int(r["iteration"]) for r in mine],
                   [float(r["temperature"]) for r in mine], label=family)
    left.set_ylabel("relaxed mean decode-step time (ms)")
    right.set_ylabel("temperature")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("iteration (a new batch of training episodes each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return plots._save(plt, fig, "Training through the relaxation", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute setup")
    parser.add_argument("--trace", default=None,
                        help="held-out trace (default: the Azure conversation trace if found)")
    parser.add_argument("--out", default="out/learned_policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="opt-175b")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    trace = args.trace or default_azure_trace_path()
    command = ["train-policy", "--family", "both", "--seed", str(args.seed), "--model",
               args.model, "--out", str(out), "--json", str(out / "result.json")]
    command += ["--quick"] if args.quick else []
    command += ["--eval-trace", str(trace)] if trace else []
    if pamjax_main(command) != 0:
        raise SystemExit(2)
    result = json.loads((out / "result.json").read_text())
    with (out / "training_curve.csv").open() as f:
        training_curve_png(out / "training_curve.png", list(csv.DictReader(f)))

    policies = list(next(iter(result["heldout_by_workload"].values())))
    rows = [{"workload": w, **times} for w, times in result["heldout_by_workload"].items()]
    report.write_csv(out / "heldout.csv", rows, ["workload", *policies])
    workloads = [r["workload"] for r in rows]
    plots.grouped_bars(out / "heldout.png",
                       {"held-out workloads (exact engine)":
                        (workloads, {p: [r[p] for r in rows] for p in policies})},
                       ylabel="mean decode-step time (ms)",
                       title=f"{args.model}: PAM rule vs learned vs grid search")
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
