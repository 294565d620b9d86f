"""Where PAM's engine step spends its time, per XLA operation and source line.

Usage: python experiments/op_profile.py [--trace PATH] [--requests N] [--page-size P]
                                        [--after STEPS] [--steps K] [--top T]

Replays the first N requests of the Azure conversation trace (a synthetic ShareGPT workload
when it is absent) on PAM (LLaMA3-70B, batch <= 64) up to step STEPS (a multiple of 256),
then traces K steps of ``engine.rollout`` (the scan the chunks run) with ``jax.profiler``
and prints, per XLA operation, its exclusive time per step (nested operations such as a
branch's body subtracted from their ``cond``), how many times it ran per step, its result
shape and the pamjax source line it came from (from the compiled HLO's stack frames).
``bench.step_phases`` times whole phases; this finds the single passes inside them (the
whole-table unit counts and the whole-window prompt placement of experiments/README.md
"Whole-table passes left after narrow columns" were found this way).

The trace format (a perfetto JSON of the XLA:CPU thunk events) is the profiler's, not a
stable API: this script is a tool for developers, not part of the package.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from pamjax import engine
from pamjax.studies import bench

DEFAULT_TRACE = os.environ.get("PAMJAX_TRACE", "../shared/traces/azure_llm_2023_conv.csv")


def hlo_operations(hlo_text: str, depth: int = 4) -> dict[str, str]:
    """Operation name -> "result shape  source" from a compiled module's HLO text; the
    source is the innermost ``depth`` frames of the Python call stack that built it
    (lambdas left out)."""
    sections = {}
    for name in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        part = hlo_text.split(f"\n{name}\n")
        sections[name] = part[1].split("\n\n")[0].splitlines() if len(part) > 1 else []
    files = {int(line.split()[0]): line.split()[1].strip('"') for line in sections["FileNames"]}
    functions = {int(line.split()[0]): line.split()[1].strip('"').split(".")[-1]
                 for line in sections["FunctionNames"]}
    locations, frames = {}, {}
    for line in sections["FileLocations"]:
        m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", line)
        if m:
            locations[int(m[1])] = (f"{os.path.basename(files[int(m[2])])}:{m[4]} "
                                    f"{functions[int(m[3])]}")
    for line in sections["StackFrames"]:
        m = re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", line)
        if m:  # the parent is frame ``parent_frame_id - 1`` (0: none)
            frames[int(m[1])] = (locations.get(int(m[2]), "?"), int(m[3]) - 1)

    def call_stack(frame: int) -> str:
        names = []
        while frame in frames and len(names) < depth:
            location, frame = frames[frame]
            if not location.endswith("<lambda>") and location not in names:
                names.append(location)
        return " < ".join(names)

    operations = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+)\s", line)
        if m:
            frame = re.search(r"stack_frame_id=(\d+)", line)
            operations[m[1]] = f"{m[2][:30]:30s} {call_stack(int(frame[1])) if frame else ''}"
    return operations


def exclusive_times(events, names) -> tuple[collections.Counter, collections.Counter]:
    """Exclusive microseconds and call counts per operation name, from trace events (an
    operation's time minus the operations nested in it on the same thread)."""
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e["name"] in names:
            by_thread[e["tid"]].append(e)
    time_us, calls = collections.Counter(), collections.Counter()
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_events = []
        for e in thread_events:
            while open_events and open_events[-1]["ts"] + open_events[-1]["dur"] <= e["ts"]:
                open_events.pop()
            if open_events:
                time_us[open_events[-1]["name"]] -= e["dur"]
            time_us[e["name"]] += e["dur"]
            calls[e["name"]] += 1
            open_events.append(e)
    return time_us, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--after", type=int, default=3072, help="steps run first")
    parser.add_argument("--steps", type=int, default=16, help="steps profiled")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    path = args.trace if os.path.exists(args.trace) else None
    workload, config, params = bench._pam_case(path, args.requests, args.page_size)
    state, dev = bench._mid_run_state(config, params, workload, args.after)
    running = int((state.slot_request >= 0).sum())
    rollout = jax.jit(lambda p, s, w: engine.rollout(config, p, s, w, args.steps))
    operations = hlo_operations(rollout.lower(params, state, dev).compile().as_text())
    jax.block_until_ready(rollout(params, state, dev))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(args.repeats):
                jax.block_until_ready(rollout(params, state, dev))
        trace_file = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]
        with gzip.open(trace_file) as stream:
            events = json.load(stream)
    events = events["traceEvents"] if isinstance(events, dict) else events
    time_us, calls = exclusive_times(events, operations)
    per_step = args.repeats * args.steps
    print(f"PAM, {workload.num_requests} requests, page {config.page_size}, U = "
          f"{config.units_per_slot}, narrow {config.narrow_units}; {args.steps} steps from "
          f"step {int(state.step)} ({running} running), {args.repeats} repeats")
    print(f"all operations: {sum(time_us.values()) / per_step / 1e3:.2f} ms per step")
    kinds = collections.Counter()
    for name, us in time_us.items():
        kinds[re.sub(r"\.\d+", "", name).replace(".clone", "")] += us
    print("\nby kind (ms per step):")
    for kind, us in kinds.most_common(12):
        print(f"  {us / per_step / 1e3:7.3f}  {kind}")
    print("\nby operation (ms per step, runs per step, result, source):")
    for name, us in time_us.most_common(args.top):
        print(f"  {us / per_step / 1e3:7.3f}  x{calls[name] / per_step:4.1f}  {name:40s} "
              f"{operations[name]}")


if __name__ == "__main__":
    main()
