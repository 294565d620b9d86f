"""The ``pamjax`` command line: every command, and all of pamjax's printing.

Library functions return data (rows, dicts, dataclasses); the commands here print them as
compact tables (:func:`format_table`, the one table printer). Progress goes to stderr
(pamjax.progress). Errors in the input are one line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

from pamjax.errors import ConfigError, PamjaxError

EXAMPLES = {
    "run": "pamjax run --out pamjax-out",
    "compare": "pamjax compare --model opt-175b --workload wildchat --slo-ms 100 "
               "--systems pam,l-pim --batches 8,16,32,64",
    "simulate": "pamjax simulate --systems pam,vllm-offload --model llama3-70b --trace "
                "azure_conv.csv --max-requests 500 --load-scale 2 --out sim-out",
    "presets": "pamjax presets",
    "reproduce": "pamjax reproduce all --quick --out repro",
    "attention-demo": "pamjax attention-demo --tiers 3 --tokens 4096",
    "sweep": "pamjax sweep --model llama3-70b --workload sharegpt --systems pam,l-pim "
             "--batches 64,128,256 --slo-ms 100,150 --seeds 0,1 --override ddr.num_devices=80 "
             "--out sweep-out",
    "bench": "pamjax bench --quick --json bench.json",
    "train-policy": "pamjax train-policy --quick --seeds 3 --json learned.json",
    "bounds": "pamjax bounds --model opt-175b --workload sharegpt --slo-ms 150 "
              "--claim pam/vllm-offload=2.2",
    "sensitivity": "pamjax sensitivity --model llama3-70b --workload sharegpt --batch 512 "
                   "--systems pam,ls-pim --method morris --samples 4 --out sens-out",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump)."""

    def error(self, message):
        print(f"pamjax: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Fixed-width text table of ``rows`` (dicts) over ``columns``: right-aligned cells,
    floats to 4 significant digits (scientific from 1e5), missing keys empty."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def _load_workload(args):
    """`simulate`'s requests: a trace replayed at --load-scale times its load, or a
    synthetic dataset (Poisson at --rate, else all at t=0)."""
    from pamjax import workload as wl

    if args.trace:
        from pamjax.traces import load_trace

        if args.rate:
            raise ConfigError("--rate", args.rate, "applies to synthetic workloads; a trace "
                              "has its own arrival times (scale its load with --load-scale)")
        # --load-scale X divides every arrival time by X: X times the requests per second.
        return load_trace(args.trace, max_requests=args.max_requests,
                          time_scale=1.0 / (args.load_scale or 1.0))
    if args.load_scale:
        raise ConfigError("--load-scale", args.load_scale, "applies to a --trace; set a "
                          "synthetic workload's load with --rate")
    return wl.synthetic(args.workload, args.max_requests or 256, seed=args.seed,
                        rate_per_s=args.rate)


def _workload_record(args, workload) -> dict:
    """The provenance entry of `simulate`'s workload."""
    if args.trace:
        return {"name": workload.name, "source": str(args.trace),
                "requests": workload.num_requests, "load_scale": args.load_scale or 1.0,
                "arrivals": "the trace's, divided by load_scale"}
    return {"name": workload.name, "source": "synthetic", "requests": workload.num_requests,
            "rate_per_s": args.rate,
            "arrivals": "Poisson" if args.rate else "all at t=0"}


def _check_outputs(args) -> None:
    """Refuse unusable output paths before any simulation runs (nothing is lost later)."""
    from pamjax.studies.report import writable_path

    if getattr(args, "json", None):
        writable_path(args.json)
    if getattr(args, "out", None):
        out = pathlib.Path(args.out)
        if out.exists() and not out.is_dir():
            raise PamjaxError(f"--out {out}: exists and is not a folder")


DEFAULT_MODEL = "llama3-70b"


@dataclasses.dataclass
class _Setup:
    """What a simulating command resolved from the shared options (_add_simulation_options).

    Fields: model (preset name or Model) and model_source (its file or None); platform
    (Platform, None = the preset) and platform_source; knobs (Knobs, None = defaults);
    systems (names or System objects, in order) and system_sources ({name: file}).
    """

    model: object
    model_source: str | None
    platform: object
    platform_source: str | None
    knobs: object
    systems: list
    system_sources: dict


def _warn(text: str) -> None:
    print(f"pamjax: warning: {text}", file=sys.stderr)


def _resolve(args, default_systems=()) -> _Setup:
    """Read and check --model/--model-file, --hardware, --knob and the systems
    (--system/--systems plus --system-file); warn (stderr) about a suspicious platform."""
    from pamjax import config_files
    from pamjax.hardware import get_platform

    if getattr(args, "model_file", None) and args.model is not None:
        raise ConfigError("--model", args.model, "conflicts with --model-file (the file "
                          "defines the model); give one of them")
    model, model_source = args.model or DEFAULT_MODEL, None
    if getattr(args, "model_file", None):
        model, model_source = config_files.load_model_file(args.model_file), args.model_file
    platform = platform_source = None
    if getattr(args, "hardware", None):
        platform = config_files.load_platform_file(args.hardware)
        platform_source = args.hardware
    for text in config_files.platform_warnings(platform or get_platform()):
        _warn(text)
    knobs = config_files.knobs_from_assignments(args.knob) if getattr(args, "knob", None) \
        else None
    systems = list(getattr(args, "systems", None) or
                   ([args.system] if getattr(args, "system", None) else default_systems))
    sources = {}
    for path in getattr(args, "system_file", None) or ():
        system = config_files.load_system_file(path)
        if system.name in sources:
            raise ConfigError("--system-file", path, f"system {system.name!r} is defined twice")
        sources[system.name] = path
        systems = [s for s in systems if s != system.name] + [system]
    if not systems:
        raise ConfigError("--system", None, "give --system, --systems or --system-file")
    return _Setup(model, model_source, platform, platform_source, knobs, systems, sources)


def _provenance(args, setup: _Setup, *, seed, systems=None, workload=None, **extra) -> dict:
    """The provenance record (pamjax.provenance) of a command's outputs."""
    from pamjax.provenance import record

    return record(argv=getattr(args, "argv", None), platform=setup.platform,
                  platform_source=setup.platform_source, model=setup.model,
                  model_source=setup.model_source,
                  systems=setup.systems if systems is None else systems,
                  system_sources=setup.system_sources, knobs=setup.knobs, seed=seed,
                  workload=workload, **extra)


def _write_sidecars(paths, prov: dict) -> list[pathlib.Path]:
    """Provenance sidecars (<stem>.meta.json) of CSVs another module wrote: the record and
    the CSV's header."""
    import csv

    from pamjax.studies.report import meta_path, write_json

    written = []
    for path in paths:
        with open(path, newline="") as f:
            columns = next(csv.reader(f), [])
        written.append(write_json(meta_path(path), {"provenance": prov, "columns": columns}))
    return written


def _setup_line(prov: dict) -> str:
    from pamjax.provenance import summary_line

    return f"setup: {summary_line(prov)}"


def _tiers_header(what: str) -> str:
    from pamjax.hardware import TIER_NAMES

    return f"{'/'.join(t.upper() for t in TIER_NAMES)} {what}"


def _tiers_text(shares: dict) -> str:
    from pamjax.hardware import TIER_NAMES

    return "/".join(f"{shares[t]:.2f}" for t in TIER_NAMES)


def _name(obj) -> str:
    return obj if isinstance(obj, str) else obj.name


def cmd_simulate(args) -> int:
    """`pamjax simulate`: systems on one workload, each to completion; a table row per
    system, optionally the JSON summary (--json) or every output (--out DIR)."""
    from pamjax.locality import load_recorded_scores
    from pamjax.simulation import simulate_systems
    from pamjax.systems import require_a_fitting_request

    setup = _resolve(args)
    names = [_name(s) for s in setup.systems]
    if args.json and len(names) > 1:
        raise ConfigError("--json", args.json, "writes one system's summary; with several "
                          "systems use --out DIR (one JSON per system)")
    workload = _load_workload(args)
    # Refuse before loading scores or compiling (simulate checks it too, for library use).
    for system in setup.systems:
        require_a_fitting_request(system, setup.model, workload, setup.platform)
    scores = load_recorded_scores(args.scores) if args.scores else None
    results = simulate_systems(
        setup.systems, setup.model, workload, max_batch=args.batch, platform=setup.platform,
        knobs=setup.knobs, page_size=args.page_size, seed=args.seed, progress=args.progress,
        recorded_scores=scores, timeline=True if args.out else None,
        leap={"auto": None, "step": False, "leap": True}[args.engine])
    systems = dict(zip(names, setup.systems))
    summaries = {n: _simulate_summary(args, setup, systems[n], r, workload)
                 for n, r in results.items()}
    prov = _provenance(args, setup, seed=args.seed, workload=_workload_record(args, workload))
    _print_simulate(args, setup, workload, summaries, prov)
    if args.json:
        _write_json(args.json, {**summaries[names[0]], "provenance": prov})
    if args.out:
        from pamjax.studies.replay import write_outputs

        per_system = {n: _provenance(args, setup, seed=args.seed, systems=[systems[n]],
                                     workload=_workload_record(args, workload))
                      for n in names}
        for path in write_outputs(args.out, results, summaries, workload, per_system):
            print(f"wrote {path}")
    return 0


def _simulate_summary(args, setup: _Setup, system, result, workload) -> dict:
    """A SimResult's summary with the run's bound, efficiency, SLO verdict and labels."""
    import numpy as np

    from pamjax.studies.bounds import bound_columns, offered_load
    from pamjax.types import STATUS_FINISHED, STATUS_RUNNING

    s = dict(result.summary, engine=result.engine)
    status = np.asarray(result.state.req_status)
    admitted = (status == STATUS_RUNNING) | (status == STATUS_FINISHED)
    if admitted.any():
        # The run's physical bound (pamjax.studies.bounds.run_bound): its admitted requests,
        # never more than --batch at once, and no more than its arrivals offer.
        s.update(bound_columns(system, setup.model, s["throughput_tokens_per_s"],
                               prompts=workload.prompt_tokens[admitted],
                               outputs=workload.output_tokens[admitted],
                               concurrency=args.batch, platform=setup.platform,
                               offered_tokens_per_s=offered_load(workload)))
    else:
        s.update(bound_tokens_per_s=None, binding_resource=None, efficiency=None)
    if args.slo_ms:
        s["slo_ms"] = args.slo_ms
        s["slo_met"] = bool(s["tpot_ms"]["p99"] <= args.slo_ms)
    s.update(system=_name(system), model=_name(setup.model), workload=workload.name,
             batch=args.batch, seed=args.seed, page_size=result.config.page_size)
    return s


def _print_simulate(args, setup: _Setup, workload, summaries: dict, prov: dict) -> None:
    """`simulate`'s header, table (a row per system) and notes."""
    tiers = _tiers_header("tokens")
    columns = ["system", "requests", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "TPOT p99 ms", "J/token", tiers, "bound tok/s", "efficiency", "binding",
               "decode steps", "sim s", "engine", *(["SLO met"] if args.slo_ms else [])]
    engines = {"leap": "event leap", "step": "engine.step"}
    rows = [{
        "system": name, "requests": f"{s['requests_finished']}/{s['requests_total']}",
        "tok/s": s["throughput_tokens_per_s"], "TTFT p50 ms": s["ttft_ms"]["p50"],
        "TTFT p99 ms": s["ttft_ms"]["p99"], "TPOT p50 ms": s["tpot_ms"]["p50"],
        "TPOT p99 ms": s["tpot_ms"]["p99"], "J/token": s["energy_j_per_token"],
        tiers: _tiers_text(s["tier_token_share"]),
        "bound tok/s": s["bound_tokens_per_s"] or "-", "efficiency": s["efficiency"] or "-",
        "binding": s["binding_resource"] or "-", "decode steps": s["decode_steps"],
        "sim s": s["simulated_seconds"], "engine": engines.get(s["engine"], s["engine"]),
        "SLO met": "yes" if s.get("slo_met") else "no"} for name, s in summaries.items()]
    load = f", load x{args.load_scale:g}" if args.trace and args.load_scale else ""
    wall = max(s["wall_seconds"] for s in summaries.values())
    print(f"{_name(setup.model)} on {workload.name}: {workload.num_requests} requests{load}, "
          f"batch <= {args.batch}, {wall:.1f} wall s")
    print(_setup_line(prov))
    print(format_table(rows, columns))
    for name, s in summaries.items():
        who = f" ({name})" if len(summaries) > 1 else ""
        print(f"locality{who}: a unit attended at one step is attended at the next with "
              f"probability {s['selection_persistence']:.3f}; the attended set holds "
              f"{100 * s['selected_mass_share']:.1f}% of the attention mass; "
              f"{100 * s['migrated_token_fraction_per_step']:.3f}% of tokens migrate per step")
        if s["requests_rejected"]:
            print(f"{s['requests_rejected']} request(s) rejected{who}: their KV can never fit "
                  f"the system's tiers")
        if s["overflow"]:
            print(f"warning{who}: a request outgrew its slot (overflow flag); results are "
                  f"incomplete")


def cmd_presets(args) -> int:
    """`pamjax presets`: tiers (preset or --hardware file), models (and a --model-file's
    derived figures), systems, workloads."""
    from pamjax.hardware import get_platform
    from pamjax.models import MODELS
    from pamjax.systems import SYSTEMS
    from pamjax.workload import DATASETS

    platform = get_platform()
    if args.hardware:
        from pamjax.config_files import load_platform_file, platform_warnings

        platform = load_platform_file(args.hardware)
        for text in platform_warnings(platform):
            _warn(text)
    model = None
    if args.model_file:  # read before printing anything, so a bad file is the only output
        from pamjax.config_files import load_model_file

        model = load_model_file(args.model_file)
    print(f"tiers (platform {platform.name}):")
    print(format_table([{
        "tier": t.name, "devices": t.num_devices, "capacity GB": t.capacity_gb,
        "internal GB/s/device": t.device.internal_gbps(t.kv_run_bytes),
        "bank groups/device": t.bank_groups_per_device, "device links GB/s": t.link_total_gbps,
        "path to GPUs GB/s": platform.path_gbps(t),
        "via": "PCIe (shared)" if t.behind_pcie else "own links",
    } for t in platform.tiers], ["tier", "devices", "capacity GB", "internal GB/s/device",
                                 "bank groups/device", "device links GB/s",
                                 "path to GPUs GB/s", "via"]))
    e, gpu = platform.energy, platform.gpu
    print(f"static power {platform.static_power_w:.0f} W: {gpu.num_gpus} GPUs x "
          f"{e.gpu_idle_w:g} W, {platform.ddr.num_devices} DIMMs x {e.dimm_idle_w:g} W, "
          f"{platform.ssd.num_devices} SSDs x {e.ssd_idle_w:g} W, {gpu.nodes} node(s) x "
          f"{e.node_other_w:g} W")
    shown = list(MODELS.values())
    print("\nPIM attention rate per device, KV GB/s = min(internal / passes, compute cap /"
          " (2 g / w)) (g = query heads per KV head, w = KV bytes per value):")
    print(format_table([_pim_rates(platform, m) for m in shown],
                       ["model", "g", "hbm", "ddr", "ssd", "passes hbm/ddr/ssd"]))
    print("\nPAM's x:y:1 importance target per model, fixed at the reference point (requests "
          "of 2,048 tokens filling HBM; systems.pam_targets):")
    print(format_table([_pam_target(platform, m) for m in shown],
                       ["model", "reference batch", "x", "y"]))
    print("\nmodels:")
    print(format_table([{
        "model": m.name, "layers": m.layers, "heads q/kv": f"{m.q_heads}/{m.kv_heads}",
        "params B": m.params / 1e9, "KV KiB/token": m.kv_bytes_per_token / 1024,
    } for m in MODELS.values()], ["model", "layers", "heads q/kv", "params B",
                                  "KV KiB/token"]))
    if model is not None:
        print(f"\nmodel file {args.model_file}:")
        rates, target = _pim_rates(platform, model), _pam_target(platform, model)
        rows = _model_figures(model) + [
            ("PIM GB/s per device hbm/ddr/ssd", "/".join(f"{rates[t]:.4g}"
                                                         for t in ("hbm", "ddr", "ssd"))),
            ("PIM read passes hbm/ddr/ssd", rates["passes hbm/ddr/ssd"]),
            ("PAM x:y", f"{target['x']:.4g}:{target['y']:.4g}")]
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"  {name.ljust(width)}  {value:.4g}" if isinstance(value, float)
                  else f"  {name.ljust(width)}  {value}")
    print("\nsystems:")
    print(format_table([{
        "system": s.name, "attention": "PIM" if s.attention_on_pim else "GPU",
        "sparse": s.sparse, "tiers": "+".join(s.tiers),
        "swap tokens/phase": s.swap_budget, "PAMattention": s.use_pamattention,
        "mapping": s.mapping if s.attention_on_pim else "-",
    } for s in SYSTEMS.values()], ["system", "attention", "sparse", "tiers",
                                   "swap tokens/phase", "PAMattention", "mapping"]))
    print("\nworkloads:")
    print(format_table([{
        "workload": d.name, "mode": d.mode, "prompt mean": d.prompt_mean,
        "output mean": d.output_mean,
    } for d in DATASETS.values()], ["workload", "mode", "prompt mean", "output mean"]))
    if args.access_stats:
        _print_access_stats()
    return 0


def _print_access_stats() -> None:
    """The default access model's emergent locality (locality.selection_statistics)."""
    from pamjax.locality import LAYER_GROUP_CORRELATION, AccessModel, selection_statistics

    access = AccessModel()
    print("\naccess model (defaults; 8 requests of 2,048 tokens, 256 decode steps):")
    stats = selection_statistics(access)
    rows = [{"statistic": f"selection overlap at lag {lag}", "value": v}
            for lag, v in stats["overlap"].items()]
    rows += [{"statistic": f"HBM hit rate (top {access.select_fraction:g} by importance EMA)",
              "value": stats["hbm_hit_rate"]},
             {"statistic": "attention mass the selection covers",
              "value": stats["selected_mass_share"]},
             {"statistic": f"union of 4 layer groups' selections / one selection "
                           f"(correlation {LAYER_GROUP_CORRELATION:g})",
              "value": stats["layer_group_union"]}]
    print(format_table(rows, ["statistic", "value"]))


def _pam_target(platform, m) -> dict:
    """One row of the presets' x:y table (PAM's calibrated target for a model)."""
    from pamjax.systems import Knobs, make_params, reference_batch

    params = make_params("pam", m, platform)
    return {"model": m.name,
            "reference batch": reference_batch(platform, m, Knobs().calibration_context),
            "x": float(params.target_x), "y": float(params.target_y)}


def _pim_rates(platform, m) -> dict:
    """One row of the presets' PIM rate table: a model's per-device rates on each tier."""
    from pamjax.hardware import query_passes

    g = m.q_heads // m.kv_heads
    row = {"model": m.name, "g": g}
    row.update({t.name: t.device_effective_gbps(m) for t in platform.tiers})
    row["passes hbm/ddr/ssd"] = "/".join(
        str(query_passes(t.device.pu_buffer_bytes, g, m.head_dim)) for t in platform.tiers)
    return row


def _model_figures(m) -> list[tuple[str, object]]:
    """(figure, value) pairs of what pamjax derives from a Model."""
    experts = "dense"
    if m.is_moe:
        experts = (f"{m.num_experts} routed (top {m.experts_per_token}), "
                   f"{m.shared_experts} shared, {m.expert_ffn} wide")
        if m.first_dense_layers:
            experts += f"; first {m.first_dense_layers} layer(s) dense"
    return [("name", m.name), ("layers", m.layers), ("heads q/kv", f"{m.q_heads}/{m.kv_heads}"),
            ("GQA group (q/kv heads)", m.gqa_group), ("head dim", m.head_dim),
            ("hidden / ffn", f"{m.hidden} / {m.ffn}"), ("vocab", m.vocab), ("experts", experts),
            ("params B (total)", m.params / 1e9),
            ("params B (active per token)", m.active_params / 1e9),
            ("weight GB", m.weight_bytes / 1e9),
            ("bytes per weight / KV value",
             f"{m.weight_bytes_per_value} / {m.kv_bytes_per_value}"),
            ("KV KiB per token", m.kv_bytes_per_token / 1024),
            ("FC GFLOP per token (active)", m.fc_flops_per_token / 1e9),
            ("attention MFLOP per token per 1k context", m.attention_flops(1000.0) / 1e6)]


def cmd_attention_demo(args) -> int:
    """`pamjax attention-demo`: PAMattention over random tiers vs exact attention."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pamjax.attention import pam_attention

    key = jax.random.PRNGKey(args.seed)
    kq, kk, kv, kt = jax.random.split(key, 4)
    b, hq, hkv, d, n = 2, 8, 2, 128, args.tokens
    q = jax.random.normal(kq, (b, hq, d))
    k = jax.random.normal(kk, (b, n, hkv, d))
    v = jax.random.normal(kv, (b, n, hkv, d))
    tier = jax.random.randint(kt, (b, n), 0, args.tiers)
    out = jax.jit(pam_attention, static_argnames="num_tiers")(q, k, v, tier,
                                                               num_tiers=args.tiers)
    ref = jax.nn.dot_product_attention(q[:, None], k, v)[:, 0]
    err = float(jnp.max(jnp.abs(out - ref)))
    counts = np.bincount(np.asarray(tier).ravel(), minlength=args.tiers)
    print(format_table([{"tier": i, "tokens": int(c)} for i, c in enumerate(counts)],
                       ["tier", "tokens"]))
    print(f"PAMattention over {args.tiers} tiers vs jax.nn.dot_product_attention: "
          f"max |error| = {err:.2e}")
    return 0


def _write_json(path, payload) -> None:
    from pamjax.studies.report import write_json

    print(f"wrote {write_json(path, payload)}")


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be integers >= 1")
    return values


def _name_list(text: str, valid, what: str) -> list[str]:
    """A comma-separated list of names from ``valid`` (an argparse type's body)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown[0] if unknown else text!r}; choose from "
            f"{', '.join(valid)}")
    return names


def _systems(text: str) -> list[str]:
    from pamjax.systems import SYSTEMS

    return _name_list(text, SYSTEMS, "system")


def _compare_columns() -> list[str]:
    return ["system", "max batch", "peak batch", "tok/s", "TPOT p99 ms", "J/token",
            _tiers_header("tokens"), _tiers_header("attention share"), "bound tok/s",
            "efficiency", "binding"]


def _queued(trace):
    """A trace's request lengths, all waiting at t=0 (a Workload)."""
    import numpy as np

    from pamjax.workload import Workload

    return Workload(np.zeros(trace.num_requests), trace.prompt_tokens, trace.output_tokens,
                    name=trace.name)


def cmd_compare(args) -> int:
    """`pamjax compare`: peak throughput under an SLO per system; table, CSV, JSON, plots."""
    from pamjax.studies import study
    from pamjax.systems import MAIN_SYSTEMS
    from pamjax.traces import load_trace

    setup = _resolve(args, default_systems=MAIN_SYSTEMS)
    if args.trace:
        # The SLO search keeps every batch full: the trace gives the request lengths, and
        # all requests queue at t=0.
        workload = _queued(load_trace(args.trace, max_requests=args.max_requests))
        source = {"name": workload.name, "source": str(args.trace),
                  "requests": workload.num_requests, "arrivals": "all at t=0"}
    else:
        workload = args.workload
        source = {"name": workload, "source": "synthetic", "arrivals": "all at t=0",
                  "requests": f"2 x the largest batch ({2 * max(args.batches)})"}
    fits = _check_batches(setup, workload, args.batches, args.seed)
    rows = study.run_sweep(setup.systems, setup.model, workload, args.batches,
                           steps=args.steps, seed=args.seed, platform=setup.platform,
                           knobs=setup.knobs, progress=not args.quiet)
    best = study.peak_under_slo(rows, args.slo_ms)
    name = workload if isinstance(workload, str) else workload.name
    prov = _provenance(args, setup, seed=args.seed, workload=source)
    print(f"{_name(setup.model)} on {name}, TPOT p99 SLO {args.slo_ms:g} ms, batches "
          f"{','.join(map(str, sorted(set(args.batches))))}, {args.steps} steps per point, "
          f"page size {rows[0]['page_size']} tokens")
    print(_setup_line(prov))
    print(format_table([_compare_row(system, row) for system, row in best.items()],
                       _compare_columns()))
    print("max batch: the largest batch meeting the SLO; every other column comes from the "
          "peak batch (the highest throughput meeting it)")
    for system in best:
        oom = [str(r["batch"]) for r in rows if r["system"] == system and r["oom"]]
        if oom:
            print(f"OOM: {system} at batch {','.join(oom)}: the in-flight requests' KV "
                  f"exceeds its tiers (they hold ~{fits[system]:,} requests on average)")
    _write_compare(args, rows, best, prov, model=_name(setup.model), workload=name)
    return 0


def _check_batches(setup: _Setup, workload, batches, seed: int) -> dict:
    """study.check_batches on the population run_sweep will draw from: refuse a batch no
    system can hold, or above the stated maximum, before compiling anything."""
    from pamjax.studies import study
    from pamjax.workload import synthetic

    pool = synthetic(workload, study.POOL_REQUESTS, seed=seed) if isinstance(workload, str) \
        else workload
    return study.check_batches(setup.systems, setup.model, pool, batches,
                               platform=setup.platform)


def _compare_row(system: str, row: dict) -> dict:
    """One table row of `compare`: every figure from the peak batch's row."""
    if row["max_batch"] == 0:
        return {**dict.fromkeys(_compare_columns(), "-"), "system": system,
                "max batch": "OOM" if row["oom"] else "none", "tok/s": 0.0}
    return {
        "system": system, "max batch": f"{'>=' if row['at_grid_edge'] else ''}"
                                       f"{row['max_batch']}",
        "peak batch": row["peak_batch"], "tok/s": row["throughput_tokens_per_s"],
        "TPOT p99 ms": row["tpot_p99_ms"], "J/token": row["energy_j_per_token"],
        _tiers_header("tokens"): _tiers_text(
            {t: row[f"{t}_token_share"] for t in _tier_names()}),
        _tiers_header("attention share"): _tiers_text(
            {t: row[f"{t}_attention_share"] for t in _tier_names()}),
        "bound tok/s": row["bound_tokens_per_s"], "efficiency": row["efficiency"],
        "binding": row["binding_resource"]}


def _tier_names():
    from pamjax.hardware import TIER_NAMES

    return TIER_NAMES


def _write_compare(args, rows, best, prov, *, model: str, workload: str) -> None:
    """compare_sweep.csv (+ its .meta.json), compare.json and the two figures."""
    from pamjax.studies import plots
    from pamjax.studies.report import write_csv

    out = pathlib.Path(args.out)
    print(f"wrote {write_csv(out / 'compare_sweep.csv', rows, list(rows[0]), provenance=prov)}")
    summary = {"model": model, "workload": workload, "platform": prov["platform"]["name"],
               "slo_ms": args.slo_ms, "batches": sorted(set(args.batches)),
               "steps": args.steps, "seed": args.seed, "best": best, "sweep": rows,
               "provenance": prov,
               "best_definition": "max_batch: the largest batch meeting the SLO; every other "
                                  "field of a best row, batch and peak_batch included, comes "
                                  "from the batch with the highest throughput meeting it"}
    _write_json(args.json or out / "compare.json", summary)
    first = next(iter(best))
    plots.system_bars(out / "compare.png", {
        "Peak throughput under the SLO": (
            "output tokens / s", {s: r["throughput_tokens_per_s"] or None
                                  for s, r in best.items()}),
        "Largest batch meeting the SLO": (
            "batch (concurrent requests)", {s: r["max_batch"] or None
                                            for s, r in best.items()})},
        baseline=first, notes={s: f"batch {r['peak_batch']}" for s, r in best.items()
                               if r["max_batch"]},
        missing_label={s: "OOM" if r["oom"] else "none" for s, r in best.items()},
        title=f"{model} on {workload}, TPOT p99 SLO {args.slo_ms:g} ms")
    plots.throughput_vs_batch(out / "compare_batches.png", rows, slo_ms=args.slo_ms,
                              title=f"{model} on {workload}")
    print(f"wrote {out / 'compare.png'} and {out / 'compare_batches.png'}")


BOUNDS_COLUMNS = ["system", "bound tok/s", "binding", "batch", "max batch", "limited by",
                  "iteration ms", "gpu_compute", "gpu_hbm", "pcie", "pim_tiers", "pim_hbm",
                  "pim_ddr", "pim_ssd"]


def _claim(text: str) -> tuple[str, str, float]:
    """Parse ``A/B=RATIO`` (system names, ratio > 0)."""
    from pamjax.systems import SYSTEMS

    try:
        pair, ratio_text = text.split("=")
        a, b = (v.strip() for v in pair.split("/"))
        ratio = float(ratio_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SYSTEM_A/SYSTEM_B=RATIO") from None
    for name in (a, b):
        if name not in SYSTEMS:
            raise argparse.ArgumentTypeError(f"unknown system {name!r} in {text!r}; choose "
                                             f"from {', '.join(SYSTEMS)}")
    if not (ratio > 0 and ratio != float("inf")):
        raise argparse.ArgumentTypeError(f"ratio {ratio_text!r} in {text!r} must be a finite "
                                         "number > 0")
    return a, b, ratio


def _claim_reference(args, system: str, setup: _Setup, workload) -> tuple[float, str]:
    """(tokens/s, how it was obtained) of the claim's reference system B: its simulated
    peak over --batches (under the SLO when given), with a trace's requests queued at t=0
    as in `compare` (idle gaps between arrivals would understate B)."""
    from pamjax.studies import study

    if args.reference_tokens_per_s:
        return args.reference_tokens_per_s, "given by --reference-tokens-per-s"
    if not isinstance(workload, str):
        workload = _queued(workload)
    rows = study.run_sweep([system], setup.model, workload, args.batches, steps=args.steps,
                           seed=args.seed, platform=setup.platform, knobs=setup.knobs,
                           progress=not args.quiet)
    if args.slo_ms:
        best = study.peak_under_slo(rows, args.slo_ms)[system]
        how = (f"simulated peak under the {args.slo_ms:g} ms SLO over batches "
               f"{','.join(map(str, args.batches))} ({args.steps} steps)")
    else:
        best = max(rows, key=lambda r: r["throughput_tokens_per_s"])
        how = (f"simulated peak over batches {','.join(map(str, args.batches))} "
               f"({args.steps} steps)")
    if best["throughput_tokens_per_s"] <= 0:
        raise PamjaxError(f"--claim: {system} serves no batch of {args.batches}"
                          f"{' under the SLO' if args.slo_ms else ''}, so it gives no "
                          "reference throughput; pass --reference-tokens-per-s")
    return best["throughput_tokens_per_s"], how


def cmd_bounds(args) -> int:
    """`pamjax bounds`: the closed-form bound per system and, with --claim, a verdict."""
    from pamjax.studies import bounds
    from pamjax.systems import SYSTEMS
    from pamjax.traces import load_trace

    setup = _resolve(args, default_systems=list(SYSTEMS))
    model = setup.model
    if args.what_would_it_take and not args.claim:
        raise ConfigError("--what-would-it-take", True, "needs --claim A/B=RATIO")
    workload = load_trace(args.trace, max_requests=args.max_requests) if args.trace \
        else args.workload
    mean_prompt, mean_output = bounds.workload_means(workload)
    stats = dict(mean_prompt=mean_prompt, mean_output=mean_output, batch=args.batch,
                 slo_ms=args.slo_ms, platform=setup.platform)
    results = [bounds.bound(system, model, **stats) for system in setup.systems]

    def rate(v):
        return "-" if v is None else ("inf" if v == float("inf") else v)

    table = [{"system": b.system, "bound tok/s": b.tokens_per_s,
              "binding": b.binding_resource, "batch": b.batch, "max batch": b.max_batch,
              "limited by": b.batch_limit, "iteration ms": b.iteration_s * 1e3,
              **{r: rate(b.per_resource.get(r)) for r in BOUNDS_COLUMNS[7:]}}
             for b in results]
    name = workload if isinstance(workload, str) else workload.name
    print(f"{_name(model)} on {name} (mean prompt {mean_prompt:.0f}, output "
          f"{mean_output:.0f} tokens), batch <= {args.batch or 'KV capacity'}, SLO "
          f"{f'{args.slo_ms:g} ms' if args.slo_ms else 'none'}: output tokens/s bounds "
          "(per resource: what it alone allows)")
    source = {"name": name, "source": str(args.trace) if args.trace else "synthetic",
              "mean_prompt": mean_prompt, "mean_output": mean_output}
    prov = _provenance(args, setup, seed=args.seed, workload=source)
    print(_setup_line(prov))
    print(format_table(table, BOUNDS_COLUMNS))
    payload = {"provenance": prov, "model": _name(model), "workload": name,
               "mean_prompt": mean_prompt,
               "mean_output": mean_output, "batch": args.batch, "slo_ms": args.slo_ms,
               "bounds": [dict(system=b.system, bound_tokens_per_s=b.tokens_per_s,
                               binding_resource=b.binding_resource, batch=b.batch,
                               max_batch=b.max_batch, batch_limit=b.batch_limit,
                               capacity_batch=b.capacity_batch, slo_batch=b.slo_batch,
                               iteration_ms=b.iteration_s * 1e3,
                               per_resource_tokens_per_s={
                                   k: (None if v == float("inf") else v)
                                   for k, v in b.per_resource.items()})
                          for b in results]}
    if args.claim:
        a, b, ratio = args.claim
        reference, how = _claim_reference(args, b, setup, workload)
        verdict = bounds.check_claim(a, b, ratio, b_tokens_per_s=reference, model=model,
                                     **stats)
        verdict_text = "ATTAINABLE" if verdict.attainable else "NOT attainable"
        print(f"claim {a}/{b} = {ratio:g}: {verdict_text} on this hardware ({b} reference "
              f"{reference:,.0f} tokens/s, {how})")
        print(f"  {verdict.explanation}")
        payload["claim"] = {"system_a": a, "system_b": b, "ratio": ratio,
                            "reference_tokens_per_s": reference, "reference": how,
                            "attainable": verdict.attainable,
                            "binding_resource": verdict.binding_resource,
                            "explanation": verdict.explanation}
    if args.what_would_it_take:
        payload["what_would_it_take"] = _what_would_it_take(args, setup, workload)
    if args.json:
        _write_json(args.json, payload)
    return 0


def _sensitivity_study(args, setup: _Setup, workload, systems, metric: str):
    """The studies.sensitivity.Study of `sensitivity` and `bounds --what-would-it-take`:
    --batch N, else the peak under --slo-ms over --batches."""
    from pamjax.studies import sensitivity

    if not isinstance(workload, str):
        workload = _queued(workload)
    fixed = {"batch": args.batch} if args.batch else \
        {"slo_ms": args.slo_ms, "slo_batches": tuple(args.batches)}
    return sensitivity.make_study(setup.model, workload, systems, platform=setup.platform,
                                  knobs=setup.knobs, seed=args.seed, metric=metric,
                                  steps=args.steps, warmup=getattr(args, "warmup", 16),
                                  width=getattr(args, "width", 32), **fixed)


WWIT_COLUMNS = ["parameter", "side", "nominal", "range", "bound max", "bound value", "value",
                "ratio", "distance", "inside"]


def _what_would_it_take(args, setup: _Setup, workload) -> dict:
    """`bounds --claim A/B=R --what-would-it-take`: the table and its JSON entry."""
    from pamjax.studies import sensitivity

    a, b, ratio = args.claim
    if not (args.batch or args.slo_ms):
        raise ConfigError("--what-would-it-take", True, "needs --batch N or --slo-ms X (the "
                          "setup the claim is simulated at)")
    study = _sensitivity_study(args, setup, workload, (a, b), "ratio")
    result = sensitivity.what_would_it_take(study, ratio, iterations=args.iterations,
                                            progress=not args.quiet)
    print(f"what would it take for {a}/{b} = {ratio:g} (simulated now: "
          f"{result['nominal_ratio']:.3g}; {result['simulations']} simulations, "
          f"{result['compiled_calls']} compiled calls, {result['wall_seconds']:.0f} s):")
    if result["nominal_ratio"] >= ratio:
        print(f"  the simulated ratio already reaches {ratio:g} at the nominal")
    print(format_table([{
        "parameter": r["name"], "side": r["side"], "nominal": r["nominal"],
        "range": f"{r['low']:g}-{r['high']:g}", "bound max": r["bound_ceiling_max"],
        "bound value": "-" if r["bound_value"] is None else r["bound_value"],
        "value": "not reached" if r["value"] is None else r["value"],
        "ratio": r["simulated_ratio"] if r["simulated_ratio"] is not None else
        ("-" if r["ratio_at_search_end"] is None else f"{r['ratio_at_search_end']:.4g} at end"),
        "distance": "-" if r["distance"] is None else r["distance"],
        "inside": "yes" if r["inside"] else "no"} for r in result["rows"]], WWIT_COLUMNS))
    print("  bound max: the largest ratio A's closed-form bound allows over B's nominal "
          "throughput on that side of the search interval; ratio: simulated at the value "
          "(or at the search end when not reached)")
    if result["none_within_range"]:
        print("  none within range: no single assumption inside its documented range makes "
              "the claim attainable")
    return result


SENSITIVITY_COLUMNS = ["parameter", "nominal", "low", "high", "mu*", "sigma"]


def cmd_sensitivity(args) -> int:
    """`pamjax sensitivity`: Morris or Sobol indices of a comparison's metric over every
    [D] assumption (pamjax.studies.sensitivity); table, tornado PNG, JSON."""
    from pamjax.studies import sensitivity
    from pamjax.traces import load_trace

    setup = _resolve(args)
    need = 1 if args.metric == "throughput" else 2
    if len(setup.systems) != need:
        raise ConfigError("--systems", ",".join(_name(s) for s in setup.systems),
                          f"--metric {args.metric} takes exactly {need} system(s)")
    if (args.batch is None) == (args.slo_ms is None):
        raise ConfigError("--batch/--slo-ms", (args.batch, args.slo_ms),
                          "give exactly one of --batch N and --slo-ms X")
    sensitivity._salib()  # fail early, in one line, without SALib
    workload = load_trace(args.trace, max_requests=args.max_requests) if args.trace \
        else args.workload
    study = _sensitivity_study(args, setup, workload, setup.systems, args.metric)
    parameters = sensitivity.get_parameters(args.parameters)
    result = sensitivity.run(study, parameters, method=args.method, samples=args.samples,
                             seed=args.seed, progress=not args.quiet)
    name = workload if isinstance(workload, str) else workload.name
    label = sensitivity.metric_label(study)
    prov = _provenance(args, setup, seed=args.seed, workload={
        "name": name, "source": str(args.trace) if args.trace else "synthetic"})
    print(f"{_name(setup.model)} on {name}: {label} = {result['nominal_value']:.4g} at the "
          f"nominal; {args.method}, {result['evaluations']} evaluations, "
          f"{result['simulations']} simulations, {result['compiled_calls']} compiled calls, "
          f"{result['wall_seconds']:.0f} s")
    print(_setup_line(prov))
    sobol = args.method == "sobol"
    print(format_table([{"parameter": r["name"], "nominal": r["nominal"], "low": r["low"],
                         "high": r["high"], "mu*": r["mu_star"], "sigma": r["sigma"],
                         **({"S1": r["S1"], "ST": r["ST"]} if sobol else {})}
                        for r in result["parameters"]],
                       SENSITIVITY_COLUMNS + (["S1", "ST"] if sobol else [])))
    out = pathlib.Path(args.out)
    png = sensitivity.tornado(out / "sensitivity.png", result, label=label,
                              title=f"{_name(setup.model)} on {name}: what {label} hinges on")
    print(f"wrote {png}")
    payload = {**result, "provenance": prov, "label": label,
               "systems": [_name(s) for s in setup.systems], "model": _name(setup.model),
               "workload": name, "batch": args.batch, "slo_ms": args.slo_ms}
    _write_json(args.json or out / "sensitivity.json", payload)
    return 0


SWEEP_COLUMNS = ["overrides", "system", "SLO ms", "max batch", "tok/s"]


def cmd_sweep(args) -> int:
    """`pamjax sweep`: the resumable cartesian sweep over every device (pamjax.studies.sweep),
    in one process or as one process of a multi-process job (--coordinator); prints
    per (overrides, system, SLO) the largest batch meeting the SLO for every seed and the
    mean throughput there over seeds; writes the provenance sidecar and a figure."""
    import jax

    from pamjax import multihost
    from pamjax.config_files import platform_warnings
    from pamjax.hardware import get_platform
    from pamjax.studies import sweep
    from pamjax.systems import MAIN_SYSTEMS

    # Before any other JAX call: a multi-process job must be joined first.
    multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    setup = _resolve(args, default_systems=MAIN_SYSTEMS)
    for text in args.override or ():
        if any(item.strip().startswith("knobs.") for item in text.split(",")):
            raise ConfigError("--override", text, "sets hardware fields; set knobs with "
                              "--knob NAME=VALUE")
    spec = sweep.make_spec(model=setup.model, workload=args.workload, trace=args.trace,
                           max_requests=args.max_requests,
                           systems=[_name(s) for s in setup.systems], batches=args.batches,
                           slo_ms=args.slo_ms, seeds=args.seeds, overrides=args.override,
                           steps=args.steps, platform=setup.platform, knobs=setup.knobs,
                           custom_systems=[s for s in setup.systems if not isinstance(s, str)])
    for text in spec.overrides:
        if text:  # the base platform was checked by _resolve
            for warning in platform_warnings((setup.platform or get_platform())
                                             .with_overrides(sweep.parse_override(text))):
                _warn(f"--override {text}: {warning}")
    _check_sweep_batches(spec, setup)
    report = sweep.run(spec, args.out, resume=args.resume, chunk_size=args.chunk_size,
                       progress=not args.quiet)
    if jax.process_index() != 0:
        return 0  # only process 0 reads the CSV it wrote
    table = [{"overrides": r["overrides"] or "-", "system": r["system"], "SLO ms": r["slo_ms"],
              "max batch": r["max_batch"] or "none", "tok/s": r["throughput_tokens_per_s"]}
             for r in sweep.best_batches(spec, report.path)]
    name = pathlib.Path(spec.trace).name if spec.trace else spec.workload
    source = {"name": name, "source": spec.trace or "synthetic", "arrivals": "all at t=0",
              "requests": spec.max_requests or f"2 x the largest batch ({2 * max(spec.batches)})"}
    prov = _provenance(args, setup, seed=list(spec.seeds), workload=source,
                       overrides=list(spec.overrides))
    print(f"{_name(spec.model)} on {name}: {report.configs_total} configurations x "
          f"{len(spec.slo_ms)} SLOs ({report.configs_run} run now), {spec.steps} steps each, "
          f"page size {report.page_size}, {report.chunks} chunks on {report.devices} "
          f"device(s) in {report.processes} process(es), {report.compiles} compilation(s), "
          f"{report.wall_seconds:.1f} s")
    print(_setup_line(prov))
    print(format_table(table, SWEEP_COLUMNS))
    for path in _write_sweep_extras(spec, report.path, prov, model=_name(spec.model),
                                    workload=name):
        print(f"wrote {path}")
    return 0


def _check_sweep_batches(spec, setup: _Setup) -> None:
    """study.check_batches for a sweep: a batch is refused only when it is refused on every
    hardware design point (an override may add capacity), judged on the first seed's
    population."""
    from pamjax.hardware import get_platform
    from pamjax.studies import study, sweep
    from pamjax.traces import load_trace
    from pamjax.workload import synthetic

    pool = load_trace(spec.trace, max_requests=spec.max_requests) if spec.trace else \
        synthetic(spec.workload, spec.max_requests or study.POOL_REQUESTS, seed=spec.seeds[0])
    refusals = []
    for text in spec.overrides:
        platform = (setup.platform or get_platform()).with_overrides(
            sweep.parse_override(text)) if text else setup.platform
        try:
            study.check_batches(setup.systems, setup.model, pool, spec.batches,
                                platform=platform)
            return
        except ConfigError as err:
            refusals.append(err)
    raise refusals[0]


def _write_sweep_extras(spec, csv_path: pathlib.Path, prov: dict, *, model: str,
                        workload: str) -> list[pathlib.Path]:
    """The sweep's provenance sidecar (sweep.meta.json) and sweep.png: throughput and
    TPOT p99 against batch, one line per system (and overrides), means over seeds."""
    import csv

    import numpy as np

    from pamjax.studies import plots
    from pamjax.studies.report import meta_path, write_json

    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    meta = write_json(meta_path(csv_path), {"provenance": prov,
                                            "columns": reader.fieldnames or []})
    first_slo = repr(spec.slo_ms[0])  # simulated figures repeat on every SLO row
    curves = []
    for o in spec.overrides:
        for system in spec.systems:
            for batch in spec.batches:
                mine = [r for r in rows if r["overrides"] == o and r["system"] == system
                        and int(r["batch"]) == batch and r["slo_ms"] == first_slo]
                label = system if len(spec.overrides) == 1 else f"{system} [{o or 'base'}]"
                curves.append({
                    "label": label, "batch": batch,
                    "oom": any(r["oom"] == "true" for r in mine),
                    "throughput_tokens_per_s": float(np.mean(
                        [float(r["throughput_tokens_per_s"]) for r in mine])),
                    "tpot_p99_ms": float(np.mean([float(r["tpot_p99_ms"] or "nan")
                                                  for r in mine]))})
    figure = plots.throughput_vs_batch(
        csv_path.with_name("sweep.png"), curves, slo_ms=list(spec.slo_ms), label_key="label",
        title=f"{model} on {workload}: mean over {len(spec.seeds)} seed(s), "
              f"{spec.steps} steps per point")
    return [csv_path, meta, figure]


BENCH_SECTIONS = ("pam", "azure", "reference", "scaling", "growth", "footprint", "huge")
"""pamjax.studies.bench.SECTIONS (not imported here: it loads JAX)."""


def cmd_bench(args) -> int:
    """`pamjax bench`: the engine speed benchmark (pamjax.studies.bench); prints each
    figure beside its target, optionally writes them all as JSON."""
    from pamjax.studies.bench import run_bench

    out = run_bench(quick=args.quick, progress=not args.quiet, sections=args.sections,
                    whole_trace=args.whole_trace, pam_requests=args.pam_requests)
    print(f"jax {out['jax']} on {out['backend']}, {out['cores']} CPU core(s)"
          f"{' (no GPU used)' if out['backend'] == 'cpu' else ''}")
    printers = {"pam": _print_pam, "azure": _print_azure, "reference": _print_reference,
                "scaling": _print_scaling, "growth": _print_growth,
                "footprint": _print_footprint, "huge": _print_huge_runs}
    for name, section in printers.items():
        if args.sections is None or name in args.sections:
            section(out)
    print(f"\nbenchmark wall time {out['wall_s']:.0f} s")
    if args.json:
        from pamjax.provenance import command_record

        _write_json(args.json, {**out, "provenance": command_record(
            args.argv, quick=args.quick, setup="the cases of pamjax/studies/bench.py")})
    return 0


def _print_pam(out: dict) -> None:
    pam = out["pam"]
    print(f"\nPAM (llama3-70b, batch <= 64, engine.step) on {pam['trace']}:")
    rows = [{"case": label, "requests": r["requests"], "page": r["page_size"],
             "fit U": r["fit_units"], "U sizes": " ".join(map(str, r["unit_sizes"])) or "-",
             "req/s": r["requests_per_s"], "ms/step": r["ms_per_engine_step"],
             "wall s": r["wall_s"], "first run s": r["wall_s_first"]}
            for label, r in pam.items() if isinstance(r, dict) and "requests_per_s" in r]
    print(format_table(rows, ["case", "requests", "page", "fit U", "U sizes", "req/s",
                              "ms/step", "wall s", "first run s"]))
    titles = {"skip_idle": "skipping idle work (EngineConfig.skip_idle)",
              "narrow": "narrow columns (EngineConfig.narrow_units = {narrow_units})"}
    for label in ("skip_idle_token", "skip_idle_page16", "narrow_token"):
        cmp = pam[label]
        title = titles[cmp["shortcut"]].format(**cmp)
        print(f"  {title} off / on, page {cmp['page_size']}, U = {cmp['units_per_slot']},"
              f" {len(cmp['chunks'])} chunks of {cmp['chunk_steps']} steps from t = 0: "
              f"{cmp['speedup']:.2f}x; same schedule: {cmp['same_schedule']}, other float32 "
              f"values within {cmp['float_max_relative_difference']:.1e} (relative)")
        print(format_table([{"running": b["running"], "chunks": b["chunks"],
                             "off ms/step": "{:.1f}-{:.1f}".format(*b["off_ms_per_step"]),
                             "on ms/step": "{:.1f}-{:.1f}".format(*b["on_ms_per_step"]),
                             "speed-up": b["speedup"]} for b in cmp["bands"]],
                           ["running", "chunks", "off ms/step", "on ms/step", "speed-up"]))
    b = pam["bracket_blocking"]
    print(f"  selector bisection on [{b['rows']}, {b['units']}] ({b['iters']} passes): row "
          f"blocks of {b['block_elements']:,} elements "
          "{:.2f}-{:.2f} ms, whole table {:.2f}-{:.2f} ms: ".format(
              *b["blocked_ms"], *b["whole_table_ms"])
          + f"{b['speedup']:.1f}x; identical: {b['identical']}")
    ph = pam["phases"]
    print(f"  one step after {ph['after_steps']} steps ({ph['running']} running, longest "
          f"context {ph['max_context']} tokens), memory bandwidth "
          f"{ph['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s:")
    for label in ("full", "fitted"):
        f = ph[label]
        phases = ", ".join(f"{k} {v['phase_ms']:.2f}" for k, v in f["phases"].items())
        print(f"  U = {f['units_per_slot']}: {f['step_ms']:.2f} ms/step ({phases} ms); unit "
              f"tables {f['unit_table_bytes'] / 2**20:.1f} MiB read + written = "
              f"{f['bandwidth_ms']:.3f} ms at bandwidth ({f['times_bandwidth_limit']:.0f}x)")


def _print_azure(out: dict) -> None:
    azure = out["azure"]
    target = out["targets"]["azure_conv_requests_per_s"]
    if azure is None:
        print("\nazure_conv_requests_per_s: skipped, no trace (set PAMJAX_TRACE)")
        return
    cmp = azure["compare"]
    print(f"\nazure_conv_requests_per_s: {azure['requests_per_s']:.0f} (target {target:.0f}); "
          f"{azure['requests']} requests, {azure['system']}, batch <= {azure['max_batch']}, "
          f"page {azure['page_size']}, {azure['engine']}: {azure['wall_s']:.2f} s wall "
          f"(median; runs {', '.join(f'{w:.2f}' for w in azure['wall_s_runs'])} s) for "
          f"{azure['busy_steps']} busy engine steps in {azure['device_iterations']} device "
          f"iterations ({azure['wall_us_per_busy_step']:.1f} us per step), compile "
          f"{azure['compile_s']:.1f} s apart, {azure['requests_finished']} finished")
    differ = f" (differ: {', '.join(cmp['differing_keys'])})" if cmp["differing_keys"] else ""
    print(f"  first {cmp['requests']} requests: leap {cmp['leap']['requests_per_s']:.0f} "
          f"req/s, engine.step {cmp['engine_step']['requests_per_s']:.0f} req/s "
          f"({cmp['speedup']:.0f}x); summaries equal: {cmp['summaries_equal']}{differ}")


def _print_reference(out: dict) -> None:
    speed, one = out["engine_vs_reference"], out["engine_vs_reference_one_core"]
    target = out["targets"]["engine_vs_reference_speedup_per_core"]
    print(f"\nengine vs reference: PAM, llama3-70b, batch {speed['batch']}, "
          f"{speed['tracked_tokens']:.0f} tracked tokens, token granularity")
    print(f"  {speed['cores']} cores: engine {speed['engine_s_per_step'] * 1e3:.2f} ms/step, "
          f"reference {speed['reference_s_per_step'] * 1e3:.0f} ms/step: speedup "
          f"{speed['speedup']:.1f}x ({speed['speedup_per_core']:.1f}x per core by division)")
    if one:
        print(f"  1 core:  engine {one['engine_s_per_step'] * 1e3:.2f} ms/step, reference "
              f"{one['reference_s_per_step'] * 1e3:.0f} ms/step: speedup "
              f"{one['speedup']:.1f}x (results equal: {'yes' if one['results_equal'] else 'NO'})")
    print(f"  per core: {out['engine_vs_reference_speedup_per_core']:.1f}x (target >= "
          f"{target:.0f}x)")
    if speed["results_equal"]:
        print(f"  same results over {speed['compared_steps']} steps: yes")
    else:
        fields = ", ".join(f"{k} (step {v})" for k, v in speed["first_mismatch_step"].items())
        print(f"  same results over {speed['compared_steps']} steps: NO, {fields}; units per "
              f"tier at step 0: engine {speed['tier_units_engine'][0]}, reference "
              f"{speed['tier_units_reference'][0]}")
    print(f"  token_steps_per_s {speed['token_steps_per_s']:.4g}")


def _print_scaling(out: dict) -> None:
    print("\nconfigs_scaling (small configurations in one vmapped call; target: per-config "
          "time falling):")
    print(format_table([{"configs": r["configs"], "steps": r["steps"],
                         "ms per call": r["wall_s"] * 1e3,
                         "ms per configuration": r["wall_s_per_config"] * 1e3}
                        for r in out["configs_scaling"]],
                       ["configs", "steps", "ms per call", "ms per configuration"]))


def _print_growth(out: dict) -> None:
    print("\ncost_growth (wall per engine step, PAM, token granularity):")
    for axis, key in (("vs_context", "context"), ("vs_batch", "batch")):
        g = out["cost_growth"][axis]
        points = ", ".join(f"{p[key]}: {p['wall_s_per_step'] * 1e3:.2f} ms" for p in g["points"])
        print(f"  {axis}: {points}; log-log slope {g['loglog_slope']:.2f}")


def _print_footprint(out: dict) -> None:
    print("\nbytes_per_tracked_token (EngineState nbytes / tracked tokens):")
    print(format_table([{"case": r["case"], "page": r["page_size"],
                         "units": r["tracked_units"], "MiB": r["state_bytes"] / 2**20,
                         "B/unit": r["bytes_per_tracked_unit"],
                         "B/token": r["bytes_per_tracked_token"]}
                        for r in out["state_footprint"]],
                       ["case", "page", "units", "MiB", "B/unit", "B/token"]))


def _print_huge_runs(out: dict) -> None:
    if "huge_runs" not in out:
        return
    print("\nhuge runs (complete, bounded memory):")
    print(format_table([{"case": r["case"], "wall s": r["wall_s"], "page": r["page_size"],
                         "state MiB": r["state_bytes"] / 2**20,
                         "peak RSS GiB": r["process_peak_rss_bytes"] / 2**30,
                         "finished": r["requests_finished"]} for r in out["huge_runs"]],
                       ["case", "wall s", "page", "state MiB", "peak RSS GiB", "finished"]))


def cmd_train_policy(args) -> int:
    """`pamjax train-policy`: learned scheduling on SLO goodput (pamjax.learn.goodput_study):
    the PAM rule, the gradient through the relaxed loop (knobs, then the network policy on
    top of them), the grid and black-box search, all judged by the exact engine; prints
    the held-out table, optionally writes JSON."""
    from pamjax.learn import goodput_study
    from pamjax.provenance import command_record, describe_model

    try:
        import evosax  # noqa: F401  (the black-box baselines)
    except ImportError:
        print("pamjax train-policy: error: the black-box baselines need evosax: "
              "pip install 'pamjax[learn]'", file=sys.stderr)
        return 2
    setup = goodput_study.QUICK if args.quick else goodput_study.FULL
    result = goodput_study.run_study(setup, seeds=args.seeds, eval_trace=args.eval_trace,
                                     progress=not args.quiet)
    result["quick"] = args.quick
    prov = command_record(args.argv, model=describe_model(setup.goodput.model),
                          seeds=args.seeds, quick=args.quick,
                          setup="pamjax/learn/goodput_study.py QUICK or FULL")
    mean, ci = result["heldout_goodput_tokens_per_s"], result["heldout_goodput_ci95"]
    ev = result["evaluations"]
    budget = {"learned": ev["learned"], "grid_best": ev["grid"],
              "black_box_best": ev["black_box"], "pam_rule": ev["rule_batch_search"],
              "learned_net": ev.get("learned_net")}
    print(f"held-out goodput (exact engine, TPOT p99 <= {setup.goodput.slo_ms:g} ms), "
          f"mean and 95% interval over {args.seeds} seed(s)")
    print(format_table([{"policy": p, "tokens/s": v, "ci95 lo": ci[p][0], "ci95 hi": ci[p][1],
                         "evaluations": budget[p]} for p, v in mean.items()],
                       ["policy", "tokens/s", "ci95 lo", "ci95 hi", "evaluations"]))
    net = result.get("learned_net_over_rule")
    print(f"learned / rule {result['learned_over_rule']:.3f}; "
          + ("" if net is None else f"learned_net / rule {net:.3f}; ")
          + "relaxation rank correlation "
          f"(goodput, Spearman) {result['relaxation_rank_correlation']:.2f}; "
          f"{result['wall_seconds']:.0f} s")
    if args.json:
        _write_json(args.json, {**result, "provenance": prov})
    return 0


def _numbers(kind, minimum):
    """argparse type: a comma-separated list of ``kind`` values >= ``minimum``."""
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                             f"{kind.__name__}s") from None
        if not values or not all(minimum <= v < float("inf") for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: values must be finite and >= "
                                             f"{minimum}")
        return values
    return parse


def cmd_reproduce(args) -> int:
    """`pamjax reproduce`: one study of the PAM evaluation, or all of them, on the preset
    or a --hardware file, with --knob overrides on top of each study's knobs; the studies'
    models and systems are their own, so --model-file and --system-file are refused."""
    import time

    from pamjax import config_files
    from pamjax.hardware import get_platform
    from pamjax.provenance import command_record, describe_platform
    from pamjax.studies.reproduce import reproduce

    own_models = ("models (qwen2.5-32b, llama3-70b, opt-175b; see "
                  "pamjax/studies/reproduce.py); run compare or sweep with --model-file")
    own_systems = ("systems (the five main ones, the ablation's variants); run compare or "
                   "sweep with --system-file")
    for option, value, what in (("--model-file", args.model_file, own_models),
                                ("--system-file", args.system_file, own_systems)):
        if value:
            raise ConfigError(option, value[0] if isinstance(value, list) else value,
                              f"reproduce runs the study's own {what}")
    platform = config_files.load_platform_file(args.hardware) if args.hardware else None
    for text in config_files.platform_warnings(platform or get_platform()):
        _warn(text)
    # Only the knobs named on the command line override a study's own (the offline
    # studies' prefill budget stays unless --knob sets it).
    knobs = config_files.knobs_from_assignments(args.knob)
    named = dict.fromkeys(item.partition("=")[0].strip() for item in args.knob or ())
    overrides = {name: getattr(knobs, name) for name in named}
    start = time.perf_counter()
    written = reproduce(args.study, args.out, quick=args.quick, progress=not args.quiet,
                        platform=platform, knob_overrides=overrides)
    for name, path in written.items():
        prov = command_record(args.argv, study=name, quick=args.quick,
                              platform=describe_platform(platform, args.hardware),
                              knob_overrides=overrides,
                              setup="models, workloads, systems, knobs and hardware scaling "
                                    "as pamjax/studies/reproduce.py sets them (its docstring), "
                                    "knob_overrides on top of its knobs")
        meta, = _write_sidecars([path], prov)
        print(f"{name}: {path}, {meta.name} and {path.with_suffix('.png').name}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


@dataclasses.dataclass(frozen=True)
class Regime:
    """One regime of the main job: a name, a synthetic dataset and the batch grid."""

    name: str
    workload: str
    batches: tuple
    what: str


RUN_MODEL = "llama3-70b"
RUN_SLO_MS = 150.0
RUN_REGIMES = (
    Regime("chat", "sharegpt", (64, 256, 1024), "short prompts and answers"),
    Regime("long context", "write-doc", (64, 256, 1024), "long generated documents"),
)
"""`pamjax run`'s fixed setup: LLaMA3-70B, TPOT p99 SLO 150 ms, the five main systems."""

RUN_WINDOW = {"steps": 64, "warmup": 16}
"""`run`'s measuring window and warm-up per point (engine steps; --steps sets the window)."""

PAYOFF = 0.05
"""`run` says PAM pays off in a regime when it serves more than 1 + PAYOFF times the best
baseline's peak throughput under the SLO, and that it loses below 1 - PAYOFF."""

RESOURCE_WORDS = {
    "gpu_compute": "GPU compute (FC layers)", "gpu_hbm": "GPU HBM bandwidth (weights, "
    "KV read by the GPUs)", "pcie": "PCIe (offloaded KV)", "pim_hbm": "HBM-PIM alone",
    "pim_ddr": "DDR-PIM alone", "pim_ssd": "SSD-PIM alone",
    "pim_tiers": "the PIM tiers' attention bandwidth", "migration": "migration",
    "arrivals": "the arrivals"}


def _run_columns() -> list[str]:
    return [*_compare_columns(), "pam / this"]


def _findings(best: dict, rows: list[dict], fits: dict, focus: str = "pam") -> list[str]:
    """What one regime's numbers say about ``focus`` (PAM): whether it pays off against
    the best baseline, which resource binds each system, and which batches did not fit
    or missed the SLO. Every statement is computed from ``best`` (study.peak_under_slo),
    ``rows`` (study.run_sweep) and ``fits`` (study.check_batches)."""
    lines = []
    mine = best.get(focus, {})
    others = {s: r for s, r in best.items() if s != focus}
    rival = max(others, key=lambda s: others[s]["throughput_tokens_per_s"], default=None)
    ours, theirs = mine.get("throughput_tokens_per_s", 0.0), \
        (others[rival]["throughput_tokens_per_s"] if rival else 0.0)
    if not mine.get("max_batch"):
        lines.append(f"{focus} meets the SLO at no batch of the grid")
    elif not theirs:
        lines.append(f"{focus} pays off: it alone meets the SLO")
    else:
        ratio = ours / theirs
        verdict = ("pays off" if ratio > 1 + PAYOFF else "loses" if ratio < 1 - PAYOFF
                   else f"does not pay off (within {PAYOFF:.0%})")
        lines.append(f"{focus} {verdict}: {ratio:.2f}x the best baseline ({rival}, "
                     f"{_short(theirs)} tok/s at batch {others[rival]['peak_batch']}) under "
                     f"the SLO")
    if mine.get("max_batch") and theirs:
        # Where each keeps its KV at its peak: PAM's tiering shows here.
        outside = {s: 1.0 - best[s]["hbm_token_share"] for s in (focus, rival)
                   if "hbm_token_share" in best[s]}
        if len(outside) == 2 and abs(outside[focus] - outside[rival]) >= PAYOFF:
            lines.append(f"{focus} keeps {outside[focus]:.0%} of its KV tokens outside HBM "
                         f"(DDR/SSD-PIM), {rival} {outside[rival]:.0%}")
    bound = {s: r["binding_resource"] for s, r in best.items() if r.get("binding_resource")}
    if bound and len(set(bound.values())) == 1:
        resource = next(iter(bound.values()))
        lines.append(f"every system's bound at its peak is {resource} "
                     f"({RESOURCE_WORDS.get(resource, resource)})"
                     + (": the KV tiers cannot change it" if resource == "gpu_compute"
                        else ""))
    elif bound:
        lines.append("binding at the peak: " + ", ".join(
            f"{s} {b}" for s, b in bound.items()))
    for system in best:
        points = [r for r in rows if r["system"] == system]
        oom = [r["batch"] for r in points if r["oom"]]
        slow = [r["batch"] for r in points if not r["oom"] and not
                (r["tpot_p99_ms"] is not None and r["tpot_p99_ms"] <= RUN_SLO_MS)]
        if oom:
            lines.append(f"{system}: batch {', '.join(map(str, oom))} out of KV memory (its "
                         f"tiers hold ~{fits[system]:,} requests on average)")
        if slow:
            tpot = ", ".join(f"{r['tpot_p99_ms']:.0f}" for r in points if r["batch"] in slow)
            lines.append(f"{system}: batch {', '.join(map(str, slow))} misses the SLO "
                         f"(TPOT p99 {tpot} ms)")
    return lines


def _short(value: float) -> str:
    from pamjax.studies.plots import short

    return short(value)


def cmd_run(args) -> int:
    """`pamjax run`: the main job, two regimes side by side (RUN_REGIMES): for each, every
    main system's peak steady-state throughput under the SLO, its TPOT, bound and binding
    resource, and what the numbers say about PAM; run.json, run_sweep.csv and run.png."""
    from pamjax.studies import plots, study
    from pamjax.studies.report import write_csv
    from pamjax.systems import MAIN_SYSTEMS
    from pamjax.workload import synthetic

    systems = list(MAIN_SYSTEMS)
    setup = _Setup(RUN_MODEL, None, None, None, None, systems, {})
    window = dict(RUN_WINDOW, steps=args.steps or RUN_WINDOW["steps"])
    results = {}
    for regime in RUN_REGIMES:
        pool = synthetic(regime.workload, study.POOL_REQUESTS, seed=args.seed)
        fits = study.check_batches(systems, RUN_MODEL, pool, regime.batches)
        rows = study.run_sweep(systems, RUN_MODEL, regime.workload, regime.batches,
                               seed=args.seed, progress=not args.quiet, **window)
        best = study.peak_under_slo(rows, RUN_SLO_MS)
        results[regime.name] = {
            "regime": regime, "rows": rows, "best": best, "fits": fits,
            "kv_tokens_per_request": study.inflight_kv_tokens(pool),
            "mean_prompt": pool.mean_prompt, "mean_output": pool.mean_output,
            "findings": _findings(best, rows, fits)}
    prov = _provenance(args, setup, seed=args.seed, workload={
        "regimes": {name: {"name": r["regime"].workload, "source": "synthetic",
                           "batches": list(r["regime"].batches)}
                    for name, r in results.items()},
        "arrivals": "closed loop at steady state"})
    print(f"{RUN_MODEL}, TPOT p99 SLO {RUN_SLO_MS:g} ms, {len(systems)} systems, two "
          f"regimes; steady state: {window['warmup']} warm-up + {window['steps']} measured "
          f"steps per point, page size {results[RUN_REGIMES[0].name]['rows'][0]['page_size']}"
          f"/{results[RUN_REGIMES[-1].name]['rows'][0]['page_size']} tokens")
    print(_setup_line(prov))
    for name, r in results.items():
        regime, best = r["regime"], r["best"]
        print(f"\n== {name}: {regime.workload}, batches "
              f"{','.join(map(str, regime.batches))} ({regime.what}: mean prompt "
              f"{r['mean_prompt']:,.0f}, output {r['mean_output']:,.0f} tokens; an "
              f"in-flight request holds ~{r['kv_tokens_per_request']:,.0f} KV tokens)")
        ours = best["pam"]["throughput_tokens_per_s"]
        table = [dict(_compare_row(s, b), **{"pam / this": ours / b["throughput_tokens_per_s"]
                                              if b["throughput_tokens_per_s"] else "-"})
                 for s, b in best.items()]
        print(format_table(table, _run_columns()))
        for line in r["findings"]:
            print(f"  - {line}")
    print("\nmax batch: the largest batch meeting the SLO; every other column comes from the "
          "peak batch (the highest throughput meeting it); bound: the physical upper bound "
          "at that batch and its binding resource (pamjax bounds)")
    out = pathlib.Path(args.out)
    every = [dict(row, regime=name) for name, r in results.items() for row in r["rows"]]
    print(f"wrote {write_csv(out / 'run_sweep.csv', every, list(every[0]), provenance=prov)}")
    _write_json(args.json or out / "run.json", {
        "model": RUN_MODEL, "slo_ms": RUN_SLO_MS, "seed": args.seed, **window,
        "regimes": {name: {"workload": r["regime"].workload,
                           "batches": list(r["regime"].batches), "best": r["best"],
                           "kv_fit_batch": r["fits"], "findings": r["findings"],
                           "sweep": r["rows"]} for name, r in results.items()},
        "provenance": prov})
    figure = plots.regimes_vs_batch(
        out / "run.png", {f"{name}: {r['regime'].workload}": (r["rows"], r["best"])
                          for name, r in results.items()},
        slo_ms=RUN_SLO_MS, notes={f"{name}: {r['regime'].workload}": r["findings"][0]
                                  for name, r in results.items()},
        title=f"{RUN_MODEL}, steady state, TPOT p99 SLO {RUN_SLO_MS:g} ms")
    print(f"wrote {figure}")
    return 0


DEFAULT_BATCHES = [16, 32, 64, 128, 256, 512, 1024, 2048]


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (each with --help and an example)."""
    parser = _Parser(prog="pamjax", description="JAX simulator of PAM (Processing Across "
                     "Memory) LLM serving and its baselines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_command in (_add_simulate, _add_run, _add_compare, _add_presets, _add_reproduce,
                        _add_sweep, _add_bench, _add_train_policy, _add_bounds,
                        _add_sensitivity, _add_attention_demo):
        add_command(sub)
    return parser


def _command(sub, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """A subcommand parser with its help, its example (EXAMPLES) and its function."""
    p = sub.add_parser(name, help=help_text, description=help_text,
                       epilog=f"example: {EXAMPLES[name]}")
    p.set_defaults(func=func)
    return p


def _add_simulation_options(p, *, system_file: bool = True) -> None:
    """The options every simulating command shares: --hardware, --model-file, --knob and
    (where systems are chosen) --system-file."""
    p.add_argument("--hardware", metavar="FILE", help="custom platform from a TOML or "
                   "JSON file (see pamjax/config_files.py and examples/hardware/)")
    p.add_argument("--model-file", metavar="FILE", help="custom model from a TOML or "
                   "JSON file or a Hugging Face config.json, instead of --model (see "
                   "examples/models/)")
    p.add_argument("--knob", action="append", metavar="NAME=VALUE",
                   help="a modelling knob (systems.Knobs), e.g. prefill_token_budget=16384 "
                        "or target_rule=throughput; repeat for more")
    if system_file:
        p.add_argument("--system-file", action="append", metavar="FILE",
                       help="a system defined as data (TOML or JSON with the fields of "
                            "systems.System, optionally base = \"pam\"; see "
                            "examples/systems/), added to the systems; repeat for more")


def _add_model_and_source(p, *, default_model=DEFAULT_MODEL, trace_help, requests_help):
    """--model, then --workload or --trace, and --max-requests."""
    from pamjax.models import MODELS
    from pamjax.workload import DATASETS

    # Default None: the command applies DEFAULT_MODEL, so that --model given together with
    # --model-file can be refused instead of silently ignored.
    p.add_argument("--model", default=None, choices=sorted(MODELS), metavar="M",
                   help=f"one of: {', '.join(MODELS)} (default {default_model})")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--workload", default="sharegpt", choices=sorted(DATASETS),
                        metavar="W", help=f"synthetic dataset (default sharegpt): "
                                          f"{', '.join(DATASETS)}")
    source.add_argument("--trace", metavar="PATH", help=trace_help)
    p.add_argument("--max-requests", type=_positive_int, help=requests_help)


def _add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _add_simulate(sub) -> None:
    from pamjax.systems import SYSTEMS

    p = _command(sub, "simulate", "simulate systems on one model and workload, request by "
                 "request (TTFT/TPOT distributions, per-request and timeline CSVs, figures)",
                 cmd_simulate)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--system", choices=sorted(SYSTEMS), metavar="S",
                       help=f"one of: {', '.join(SYSTEMS)}")
    which.add_argument("--systems", type=_systems, metavar="A,B,...",
                       help="several systems, one table row each (those the event leap does "
                            "not apply to run together in one vmapped call)")
    _add_model_and_source(p, trace_help="Azure (TIMESTAMP,ContextTokens,GeneratedTokens) or "
                          "plain (arrival_s,prompt_tokens,output_tokens) CSV, replayed with "
                          "its arrival times",
                          requests_help="requests to simulate (synthetic default 256; trace "
                                        "default all)")
    p.add_argument("--batch", type=_positive_int, default=64,
                   help="largest number of concurrent requests (default 64)")
    p.add_argument("--rate", type=_positive_float,
                   help="Poisson arrivals per second (default: all at t=0, offline)")
    p.add_argument("--load-scale", type=_positive_float, metavar="X",
                   help="replay --trace at X times its load: every arrival time divided by "
                        "X (2 = twice the requests per second; 0.5 = half)")
    p.add_argument("--slo-ms", type=_positive_float, help="TPOT p99 SLO to check, ms")
    p.add_argument("--page-size", type=_positive_int,
                   help="tokens per KV unit (default: 1 unless the run is very large)")
    p.add_argument("--scores", metavar="PATH", help="recorded per-step token attention "
                   "logits [steps, tokens] (.npy, or .npz with 'scores') from your own model, "
                   "replacing the synthetic access model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("auto", "step", "leap"), default="auto",
                   help="auto (default): the event leap (many decode steps per device "
                   "iteration, the same results) for systems it reproduces exactly, such as "
                   "vllm-offload, else one engine step per iteration; step: always the "
                   "latter; leap: the leap or an error")
    p.add_argument("--json", metavar="PATH", help="write the summary as JSON (one system)")
    p.add_argument("--out", metavar="DIR", help="write per system S.json, S_requests.csv, "
                   "S_timeline.csv (each CSV with a .meta.json provenance sidecar), and "
                   "latency_cdf.png and timeline.png")
    p.add_argument("--progress", action="store_true", help="show progress on stderr")
    _add_simulation_options(p)


def _add_search_args(p) -> None:
    """The SLO search's grid, horizon and outputs (`run` and `compare`)."""
    p.add_argument("--batches", type=_batches, default=DEFAULT_BATCHES,
                   help="comma-separated batch sizes to search")
    p.add_argument("--steps", type=_positive_int, default=192,
                   help="simulated steps per batch size (default 192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pamjax-out", help="output folder")
    p.add_argument("--json", metavar="PATH", help="summary JSON (default OUT/compare.json)")
    _add_quiet(p)


def _add_run(sub) -> None:
    p = _command(sub, "run", "the main job: five systems, llama3-70b, 150 ms TPOT SLO, a "
                 "chat and a long-context regime side by side", cmd_run)
    p.add_argument("--steps", type=_positive_int,
                   help=f"measured steps per point (default {RUN_WINDOW['steps']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pamjax-out", help="output folder")
    p.add_argument("--json", metavar="PATH", help="summary JSON (default OUT/run.json)")
    _add_quiet(p)


def _add_compare(sub) -> None:
    from pamjax.systems import MAIN_SYSTEMS

    p = _command(sub, "compare", "peak throughput under an SLO for any model, workload and "
                 "systems", cmd_compare)
    _add_model_and_source(p, trace_help="take request lengths from a trace CSV (all queued at "
                          "t=0)", requests_help="requests read from --trace")
    p.add_argument("--slo-ms", type=_positive_float, default=150.0)
    p.add_argument("--systems", type=_systems, default=list(MAIN_SYSTEMS),
                   help="comma-separated system names")
    _add_search_args(p)
    _add_simulation_options(p)


def _add_presets(sub) -> None:
    p = _command(sub, "presets", "list hardware tiers, models, systems and workloads",
                 cmd_presets)
    p.add_argument("--hardware", metavar="FILE", help="show the derived figures of a custom "
                   "platform file (TOML or JSON) instead of the preset")
    p.add_argument("--model-file", metavar="FILE", help="also show the derived figures of a "
                   "model file (TOML, JSON or a Hugging Face config.json): parameters, "
                   "weight and KV bytes, FLOPs per token, GQA group")
    p.add_argument("--access-stats", action="store_true", help="also measure the access "
                   "model's locality: selection overlap at lags 1, 10 and 100 steps, the hit "
                   "rate of an HBM set ranked by the importance EMA, the union of layer "
                   "groups' selections (about 30 s)")


def _add_reproduce(sub) -> None:
    from pamjax.studies.reproduce import STUDIES

    p = _command(sub, "reproduce", "reproduce the PAM study: online, offline, energy, "
                 "ablation, scaling or all (on a --hardware file and with --knob overrides "
                 "if given; the studies fix their own models and systems, so --model-file "
                 "and --system-file are refused)", cmd_reproduce)
    p.add_argument("study", choices=[*STUDIES, "all"], metavar="STUDY",
                   help=f"one of: {', '.join(STUDIES)}, all")
    p.add_argument("--quick", action="store_true",
                   help="shorter simulated horizons (same grid)")
    p.add_argument("--out", default="pamjax-out", help="output folder")
    _add_quiet(p)
    # The shared options, so that every simulating command takes them; --model-file and
    # --system-file are refused with the reason (the studies fix their models and systems).
    _add_simulation_options(p)


def _add_sweep(sub) -> None:
    from pamjax.systems import MAIN_SYSTEMS

    p = _command(sub, "sweep", "the cartesian product of systems x batches x SLOs x seeds x "
                 "hardware overrides, spread over all devices (of every process with "
                 "--coordinator), resumable", cmd_sweep)
    _add_model_and_source(p, trace_help="take request lengths from a trace CSV (all queued "
                          "at t=0)", requests_help="requests per configuration (synthetic "
                          "default 2 x the largest batch; trace default all)")
    p.add_argument("--systems", type=_systems, default=list(MAIN_SYSTEMS),
                   help="comma-separated system names")
    p.add_argument("--batches", type=_batches, default=[64, 128, 256],
                   help="comma-separated batch sizes")
    p.add_argument("--slo-ms", type=_numbers(float, 1e-9), default=[150.0],
                   help="comma-separated TPOT p99 SLOs, ms")
    p.add_argument("--seeds", type=_numbers(int, 0), default=[0],
                   help="comma-separated seeds")
    p.add_argument("--override", action="append", metavar="PATH=VALUE[,PATH=VALUE]",
                   help="a hardware design point in Platform.with_overrides form, e.g. "
                        "ddr.num_devices=80 (repeat for more points; '' = the preset)")
    p.add_argument("--steps", type=_positive_int, default=192,
                   help="simulated steps per configuration (default 192)")
    p.add_argument("--chunk-size", type=_positive_int, default=64,
                   help="configurations per device per compiled call (default 64)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT/sweep.csv and run only the rest")
    p.add_argument("--out", default="pamjax-out", help="output folder (only process 0 "
                   "reads and writes it)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="run as one process of a "
                   "multi-process job (jax.distributed): the address of process 0, where it "
                   "serves the job's coordinator; start every process with the same "
                   "arguments and its own --process-id")
    p.add_argument("--num-processes", type=_positive_int, metavar="N",
                   help="processes in the job (with --coordinator)")
    p.add_argument("--process-id", type=int, metavar="I",
                   help="this process's number, 0..N-1 (with --coordinator)")
    _add_quiet(p)
    _add_simulation_options(p)


def _add_bench(sub) -> None:
    p = _command(sub, "bench", "engine speed: vs the reference loop, token-steps/s, "
                 "configuration batching, cost growth, memory per token, Azure trace replay",
                 cmd_bench)
    p.add_argument("--quick", action="store_true", help="smaller cases (under 10 minutes "
                   "on a 2-core CPU)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--sections", nargs="+", choices=BENCH_SECTIONS, default=None,
                   help="run only these sections (default: all)")
    p.add_argument("--whole-trace", action="store_true",
                   help="PAM also replays the whole conversation trace (long)")
    p.add_argument("--pam-requests", type=_positive_int, default=2000,
                   metavar="N", help="requests of the PAM replays (default 2000)")
    _add_quiet(p)


def _add_train_policy(sub) -> None:
    p = _command(sub, "train-policy", "learn PAM's scheduling knobs (x:y, lambda, swap "
                 "budget, batch), then a network placement policy with lifetime features on "
                 "top of them (learned_net), for SLO goodput by gradient through the relaxed "
                 "serving loop, against the rule, a grid and black-box search (CMA-ES, "
                 "random search; evosax) at 10x the knobs' budget, all judged by the exact "
                 "engine", cmd_train_policy)
    p.add_argument("--quick", action="store_true", help="the QUICK setup (about 15 minutes "
                   "on a 2-core CPU at 3 seeds)")
    p.add_argument("--eval-trace", metavar="PATH",
                   help="also evaluate on this trace CSV (held out)")
    p.add_argument("--seeds", type=_positive_int, default=3,
                   help="training seeds (default 3)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    _add_quiet(p)


def _add_bounds(sub) -> None:
    from pamjax.systems import SYSTEMS

    p = _command(sub, "bounds", "closed-form upper bounds on tokens/s per system, and "
                 "whether a claimed speedup is physically attainable", cmd_bounds)
    _add_model_and_source(p, trace_help="mean lengths from a trace CSV",
                          requests_help="requests read from --trace")
    p.add_argument("--systems", type=_systems, default=list(SYSTEMS),
                   help="comma-separated system names (default: all)")
    p.add_argument("--batch", type=_positive_int,
                   help="most concurrent requests (default: up to the KV capacity)")
    p.add_argument("--slo-ms", type=_positive_float, help="TPOT SLO, ms (default none)")
    p.add_argument("--claim", type=_claim, metavar="A/B=RATIO",
                   help="is 'system A serves RATIO x the tokens/s of system B' attainable? "
                        "B's tokens/s is simulated (or --reference-tokens-per-s)")
    p.add_argument("--reference-tokens-per-s", type=_positive_float, metavar="X",
                   help="B's throughput for --claim, instead of simulating it")
    p.add_argument("--batches", type=_batches, default=[16, 64, 256, 1024],
                   help="batch sizes searched when simulating B for --claim")
    p.add_argument("--steps", type=_positive_int, default=96,
                   help="simulated steps per batch when simulating B (default 96)")
    p.add_argument("--what-would-it-take", action="store_true",
                   help="with --claim: for each [D] assumption alone, the value at which the "
                        "claimed ratio becomes attainable (bound, then simulation by vmapped "
                        "bisection), ranked by distance from the nominal")
    p.add_argument("--iterations", type=_positive_int, default=4,
                   help="bisection halvings for --what-would-it-take (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the bounds (and verdict) as JSON")
    _add_quiet(p)
    _add_simulation_options(p)


def _names(text: str) -> list[str]:
    from pamjax.studies.sensitivity import PARAMETERS_BY_NAME

    return _name_list(text, PARAMETERS_BY_NAME, "parameter")


def _add_sensitivity(sub) -> None:
    from pamjax.studies.sensitivity import METHODS, METRICS

    p = _command(sub, "sensitivity", "which [D] assumptions a comparison hinges on: Morris "
                 "or Sobol indices over their documented ranges, vmapped (needs SALib)",
                 cmd_sensitivity)
    _add_model_and_source(p, trace_help="take request lengths from a trace CSV",
                          requests_help="requests read from --trace")
    p.add_argument("--systems", type=_systems, required=True,
                   help="A,B (A alone for --metric throughput)")
    p.add_argument("--batch", type=_positive_int, help="fixed batch (requests in flight)")
    p.add_argument("--slo-ms", type=_positive_float,
                   help="instead of --batch: each system's peak under this TPOT SLO, ms")
    p.add_argument("--batches", type=_batches, default=[64, 128, 256, 512, 1024],
                   help="batch grid of the --slo-ms search")
    p.add_argument("--metric", choices=METRICS, default="ratio",
                   help="ratio: A/B tokens/s (default); energy: A/B J/token; throughput: A")
    p.add_argument("--method", choices=METHODS, default="morris")
    p.add_argument("--samples", type=_positive_int, default=4,
                   help="Morris trajectories, or Sobol base samples (default 4)")
    p.add_argument("--parameters", type=_names, metavar="NAME,...",
                   help="only these [D] parameters (default all; e.g. Sobol on the few a "
                        "Morris screening ranked first)")
    p.add_argument("--steps", type=_positive_int, default=32,
                   help="steps of the measuring window per point (default 32)")
    p.add_argument("--warmup", type=_positive_int, default=16,
                   help="steps before the window (default 16)")
    p.add_argument("--width", type=_positive_int, default=32,
                   help="configurations per compiled call (default 32; more on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="pamjax-out", help="output folder (sensitivity.png)")
    p.add_argument("--json", metavar="PATH", help="JSON (default OUT/sensitivity.json)")
    _add_quiet(p)
    _add_simulation_options(p)


def _add_attention_demo(sub) -> None:
    p = _command(sub, "attention-demo", "PAMattention over tiers vs exact attention",
                 cmd_attention_demo)
    p.add_argument("--tiers", type=_positive_int, default=3)
    p.add_argument("--tokens", type=_positive_int, default=4096)
    p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    """Entry point: run the command in ``argv``; returns the exit status (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # The exact command line, for the provenance of every file written.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_outputs(args)
        from pamjax.compile_cache import enable_compilation_cache

        # Compiled simulation steps persist across invocations (PAMJAX_NO_CACHE=1: off).
        enable_compilation_cache()
        return args.func(args)
    except PamjaxError as exc:
        print(f"pamjax: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pamjax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
