"""The files of a replay (`pamjax simulate --out DIR`): per system its summary, its requests
and its timeline, and two figures over all systems.

Per system ``S`` (a name of letters, digits, ``.``, ``_``, ``-``):

* ``S.json``: the summary (metrics.summarize_stats keys, the run's bound and efficiency)
  and its ``provenance``;
* ``S_requests.csv``: one row per request (metrics.REQUEST_COLUMNS; per-request tier
  shares are not computable, see there), sidecar ``S_requests.meta.json``;
* ``S_timeline.csv``: metrics.timeline_rows, one row per step or per fixed time bin (the
  sidecar ``S_timeline.meta.json`` says which, and the bin width).

Figures: ``latency_cdf.png`` (TTFT and TPOT CDFs of every system) and ``timeline.png``
(running and queued requests, step time and KV tokens per tier over simulated time).
"""

from __future__ import annotations

import pathlib

import numpy as np

from pamjax import metrics
from pamjax.hardware import TIER_NAMES
from pamjax.studies import plots
from pamjax.studies.report import write_csv, write_json

REQUEST_UNITS = {"arrival_s": "s", "ttft_ms": "ms", "tpot_ms": "ms", "finish_s": "s",
                 "prompt_tokens": "tokens", "output_tokens": "tokens",
                 "generated_tokens": "tokens"}
TIMELINE_UNITS = {"time_s": "s, start of the step or bin", "duration_s": "s",
                  "steps": "busy engine steps", "running": "requests",
                  "queued": "requests", "step_time_ms": "ms, mean busy step",
                  "migrated_tokens": "tokens", "output_tokens": "tokens",
                  **{f"{t}_kv_tokens": "tokens" for t in TIER_NAMES}}


def write_outputs(out_dir, results: dict, summaries: dict, workload,
                  provenance: dict) -> list[pathlib.Path]:
    """Write every file of the module docstring.

    Args:
      out_dir: the folder (created).
      results: {system: simulation.SimResult} with the timeline kept (``metrics``).
      summaries: {system: the summary dict to write as ``S.json``}.
      workload: the host workload they replayed.
      provenance: {system: pamjax.provenance record}.

    Returns:
      the paths written, in order.
    """
    out = pathlib.Path(out_dir)
    written, latencies, series, resolutions = [], {}, {}, set()
    model = next(iter(summaries.values()))["model"]
    for name, result in results.items():
        prov = provenance[name]
        written.append(write_json(out / f"{name}.json",
                                  {**summaries[name], "provenance": prov}))
        requests = metrics.request_rows(workload, result.state)
        written.append(write_csv(out / f"{name}_requests.csv", requests,
                                 metrics.REQUEST_COLUMNS, provenance=prov,
                                 meta={"units": REQUEST_UNITS,
                                       "not_included": metrics.REQUEST_COLUMNS_NOTE}))
        rows, resolution = metrics.timeline_rows(result.metrics, workload,
                                                 page_size=result.config.page_size)
        written.append(write_csv(out / f"{name}_timeline.csv", rows,
                                 metrics.timeline_columns(), provenance=prov,
                                 meta={**resolution, "units": TIMELINE_UNITS,
                                       "page_size_tokens": result.config.page_size}))
        latencies[name] = {
            "TTFT (ms)": np.array([r["ttft_ms"] for r in requests
                                   if r["status"] == "finished"], np.float64),
            "TPOT (ms)": np.array([r["tpot_ms"] for r in requests
                                   if r["tpot_ms"] is not None], np.float64)}
        series[name] = rows
        resolutions.add(_resolution_text(resolution))
    title = f"{model} on {workload.name}, {workload.num_requests} requests"
    written.append(plots.latency_cdfs(out / "latency_cdf.png", latencies,
                                      title=f"Per-request latency: {title} (finished ones)"))
    label = ", ".join(sorted(resolutions))
    written.append(plots.timelines(out / "timeline.png", series, tiers=TIER_NAMES,
                                   title=f"{title} ({label})"))
    return written


def _resolution_text(resolution: dict) -> str:
    if resolution["resolution"] == "step":
        return "one point per engine step"
    return f"{resolution['bin_s']:g} s bins"
