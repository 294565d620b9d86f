"""PNG figures (matplotlib, headless Agg backend; imported only when a figure is drawn).

Conventions, so that a figure can be read without its CSV: one unit per axis (said in the
axis label); bars carry their values; a logarithmic bar axis only where a panel's values
span more than LOG_SPAN (a log axis hides few-percent gaps between neighbours), and
legends sit outside the axes, where they cover nothing.
"""

from __future__ import annotations

import math
import pathlib
import textwrap

import numpy as np

LOG_SPAN = 20.0
"""A bar panel asked to be logarithmic is, only when its largest value is more than this
many times its smallest; otherwise it is linear (few-percent gaps stay visible)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short(value: float) -> str:
    """A bar label: 3 significant digits, thousands as k and millions as M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _figure(plt, rows: int, cols: int, size):
    """A figure laid out by matplotlib's constrained layout (titles and outside legends
    get their own room)."""
    return plt.subplots(rows, cols, squeeze=False, figsize=size, layout="constrained")


def _say(ax, text: str) -> None:
    """Write ``text`` across the middle of an axes (a panel with nothing to draw)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9,
            bbox={"facecolor": "white", "edgecolor": "grey", "alpha": 0.9})


def grouped_bars(path, panels: dict[str, tuple[list[str], dict[str, list]]], *, ylabel,
                 title: str, missing_label: str = "OOM", log: bool = False) -> pathlib.Path:
    """Grouped bar charts, one panel per entry of ``panels`` stacked vertically, every bar
    labelled with its value, one legend above the panels.

    Args:
      path: the PNG to write (its folder is created).
      panels: {panel title: (group labels, {series name: values per group})}. A value of
        None draws no bar and writes ``missing_label`` at its place (e.g. OOM).
      ylabel: y-axis label of every panel (say the unit), or {panel title: label}.
      title: figure title.
      missing_label: text written where a value is None.
      log: a logarithmic y axis for panels whose values span more than LOG_SPAN; other
        panels are linear and lose a " (log)" in their label.

    Returns:
      The path written.
    """
    plt = _pyplot()
    names = list(dict.fromkeys(n for _, series in panels.values() for n in series))
    widest = max(len(groups) * max(len(series), 1) for groups, series in panels.values())
    width_in = min(max(6.0, 0.24 * widest + 2), 16)
    ncol = min(len(names), max(1, int(width_in / 1.6)))
    height_in = 3.4 * len(panels) + 0.3 * math.ceil(len(names) / ncol)
    fig, axes = _figure(plt, len(panels), 1, (width_in, height_in))
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for ax, (panel, (groups, series)) in zip(axes[:, 0], panels.items()):
        label = ylabel[panel] if isinstance(ylabel, dict) else ylabel
        _bar_panel(ax, groups, series, colours, missing_label, log, label)
        ax.set_title(panel, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]
    fig.legend(handles, names, loc="outside lower center", ncol=ncol, fontsize=8,
               frameon=False)
    return _save(plt, fig, title, path)


def _bar_panel(ax, groups, series, colours, missing_label, log, ylabel) -> None:
    """One panel of :func:`grouped_bars`."""
    values = [v for vs in series.values() for v in vs if v is not None and v > 0]
    use_log = log and bool(values) and max(values) > LOG_SPAN * min(values)
    bars = len(groups) * max(len(series), 1)
    rotate = bars > 12
    width = 0.8 / max(len(series), 1)
    for i, (name, vs) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        shown = [(x, v) for x, v in zip(xs, vs) if v is not None]
        drawn = ax.bar([x for x, _ in shown], [v for _, v in shown], width,
                       color=colours[name])
        ax.bar_label(drawn, labels=[short(v) for _, v in shown], fontsize=6, padding=2,
                     rotation=90 if rotate else 0)
        for x, v in zip(xs, vs):
            if v is None:
                ax.text(x, 0.02, missing_label, rotation=90, ha="center", va="bottom",
                        fontsize=6, transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    if use_log:
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * (4.0 if rotate else 2.5))  # room for the labels
    else:
        ylabel = ylabel.replace(" (log)", "")
        ax.set_ylim(0, (max(values) if values else 1.0) * (1.3 if rotate else 1.15))
    ax.set_ylabel(ylabel, fontsize=8)


def system_bars(path, panels: dict[str, tuple[str, dict[str, float | None]]], *,
                title: str, baseline: str | None = None, notes: dict | None = None,
                missing_label: str | dict = "none") -> pathlib.Path:
    """One bar per system in each panel (side by side), linear axes, labelled bars.

    Args:
      path: the PNG to write.
      panels: {panel title: (y-axis label with its unit, {system: value or None})}.
      title: figure title.
      baseline: a system whose value is 1.0x: the first panel's labels add each bar's
        ratio to it.
      notes: {system: text} written under the first panel's labels (e.g. the batch).
      missing_label: text where a value is None, or {system: text} ("none" for others).
        A panel with no value at all says so across its middle.

    Returns:
      The path written.
    """
    plt = _pyplot()
    fig, axes = _figure(plt, 1, len(panels), (max(5.0, 4.2 * len(panels)), 4.0))
    for p, (ax, (panel, (ylabel, values))) in enumerate(zip(axes[0], panels.items())):
        systems = list(values)
        shown = [(i, v) for i, v in enumerate(values.values()) if v is not None]
        drawn = ax.bar([i for i, _ in shown], [v for _, v in shown], 0.7,
                       color=[f"C{i % 10}" for i, _ in shown])
        base = values.get(baseline) if baseline else None
        labels = []
        for i, v in shown:
            text = short(v)
            if p == 0 and base:
                text += f"\n{v / base:.3f}x"
            if p == 0 and notes and notes.get(systems[i]):
                text += f"\n{notes[systems[i]]}"
            labels.append(text)
        ax.bar_label(drawn, labels=labels, fontsize=7, padding=2)
        for i, v in enumerate(values.values()):
            if v is None:
                text = missing_label.get(systems[i], "none") \
                    if isinstance(missing_label, dict) else missing_label
                ax.text(i, 0.02, text, ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform())
        if not shown:
            _say(ax, "no system meets the SLO at any batch")
        top = max([v for _, v in shown], default=1.0)
        ax.set_ylim(0, top * (1.35 if p == 0 and (base or notes) else 1.15))
        ax.set_xticks(range(len(systems)))
        ax.set_xticklabels(systems, fontsize=7, rotation=20, ha="right")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel + (f" (ratio to {baseline})" if p == 0 and base else ""),
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, title, path)


def throughput_vs_batch(path, rows: list[dict], *, slo_ms, title: str,
                        label_key: str = "system") -> pathlib.Path:
    """Two panels: throughput and TPOT p99 against batch size, one line per system.

    Args:
      path: the PNG to write (its folder is created).
      rows: sweep rows (``study.run_sweep``) with ``label_key``, ``batch``, ``oom``,
        ``throughput_tokens_per_s`` (output tokens/s) and ``tpot_p99_ms`` (ms); rows
        marked ``oom`` are left out.
      slo_ms: TPOT SLO(s) drawn as horizontal lines, ms (a number or a list).
      title: figure title.
      label_key: the row key naming a line (default ``system``).

    Returns:
      The path written.
    """
    plt = _pyplot()
    fig, axes = _figure(plt, 1, 2, (11, 4.6))
    left, right = axes[0]
    for name in dict.fromkeys(r[label_key] for r in rows):
        mine = [r for r in rows if r[label_key] == name and not r["oom"]]
        batches = [r["batch"] for r in mine]
        left.plot(batches, [r["throughput_tokens_per_s"] for r in mine], marker="o",
                  label=name)
        right.plot(batches, [r["tpot_p99_ms"] for r in mine], marker="o", label=name)
    # The TPOT axis shows the data and the smallest SLO; larger SLOs are off its scale
    # (and say so) rather than squashing the curves against zero.
    slos = sorted(float(v) for v in np.atleast_1d(slo_ms))
    shown = [r["tpot_p99_ms"] for r in rows if not r["oom"] and r["tpot_p99_ms"] is not None
             and np.isfinite(r["tpot_p99_ms"])]
    top = max([*shown, slos[0]]) * 1.15
    for i, slo in enumerate(slos):
        right.axhline(slo, color="k", ls=("--", ":", "-.")[i % 3], lw=1,
                      label=f"SLO {slo:g} ms" + ("" if slo <= top else " (off scale)"))
    right.set_ylim(0, top)
    batches = sorted({r["batch"] for r in rows})
    for ax, label in ((left, "output tokens / s"), (right, "TPOT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])  # the grid's batches, as numbers
        ax.set_xlim(batches[0] / 1.25, batches[-1] * 1.25)  # also when nothing is drawn
        ax.minorticks_off()
        ax.set_xlabel("batch (max concurrent requests)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.set_ylim(bottom=0)
    if not any(not r["oom"] for r in rows):
        for ax in (left, right):
            _say(ax, "no batch fits: every point is out of KV memory (OOM)")
    handles, labels = right.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6),
               fontsize=8, frameon=False)
    return _save(plt, fig, title, path)


def regimes_vs_batch(path, panels: dict[str, tuple[list[dict], dict]], *, slo_ms: float,
                     title: str, notes: dict[str, str] | None = None) -> pathlib.Path:
    """Throughput against batch, one panel per regime, one line per system, the SLO's
    limit marked: what `pamjax run` draws.

    A filled marker meets the TPOT SLO, a hollow one misses it, an x at the bottom did not
    fit (OOM); a star marks each system's peak under the SLO, whose throughput and batch
    the panel's legend gives. Linear throughput axis (few-percent gaps stay visible), batch on
    a log2 axis with the grid's batches as ticks.

    Args:
      path: the PNG to write.
      panels: {panel title: (study.run_sweep rows, study.peak_under_slo of them)}.
      slo_ms: the TPOT p99 SLO, ms.
      title: figure title.
      notes: {panel title: text} written under the panel's title (e.g. whether PAM pays
        off there).

    Returns:
      The path written.
    """
    plt = _pyplot()
    fig, axes = _figure(plt, 1, len(panels), (6.2 * len(panels), 5.2))
    systems = list(dict.fromkeys(r["system"] for rows, _ in panels.values() for r in rows))
    colours = {s: f"C{i % 10}" for i, s in enumerate(systems)}
    for ax, (panel, (rows, best)) in zip(axes[0], panels.items()):
        top = max([r["throughput_tokens_per_s"] for r in rows if not r["oom"]], default=0.0)
        keys = []  # per panel: each system's peak under the SLO, as value labels
        for system in dict.fromkeys(r["system"] for r in rows):
            mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["batch"])
            fit = [r for r in mine if not r["oom"]]
            colour = colours[system]
            ax.plot([r["batch"] for r in fit], [r["throughput_tokens_per_s"] for r in fit],
                    color=colour, lw=1.2)
            for r in fit:
                meets = r["tpot_p99_ms"] is not None and r["tpot_p99_ms"] <= slo_ms
                ax.plot(r["batch"], r["throughput_tokens_per_s"], "o", color=colour, ms=5,
                        mfc=colour if meets else "white")
            oom = [r["batch"] for r in mine if r["oom"]]
            if oom:  # (an empty unclipped line would claim the figure's corner in the layout)
                ax.plot(oom, [0.0] * len(oom), "x", color=colour, ms=7, clip_on=False)
            peak = best.get(system, {})
            text = f"{system}: no batch meets the SLO"
            if peak.get("max_batch"):
                x, y = peak["peak_batch"], peak["throughput_tokens_per_s"]
                ax.plot(x, y, "*", color=colour, ms=13, mec="k", mew=0.5, zorder=5)
                text = f"{system}: {short(y)} at batch {x}"
                if peak.get("at_grid_edge"):
                    text += "; meets it to the grid's end"
                elif peak["max_batch"] != x:
                    text += f"; meets it up to {peak['max_batch']}"
            keys.append(plt.Line2D([], [], color=colour, marker="*", ms=9, mec="k", mew=0.5,
                                   label=text))
        batches = sorted({r["batch"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlim(batches[0] / 1.25, batches[-1] * 1.25)
        ax.minorticks_off()
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel("output tokens / s")
        ax.set_ylim(0, (top or 1.0) * 1.18)
        ax.grid(alpha=0.3)
        note = (notes or {}).get(panel)
        ax.set_title(panel + (f"\n{textwrap.fill(note, 80)}" if note else ""), fontsize=8)
        if top:
            ax.legend(handles=keys, loc="upper left", fontsize=7, title_fontsize=7,
                      title="peak under the SLO (output tokens / s)")
        else:
            _say(ax, "no batch fits: every point is out of KV memory (OOM)")
    handles = [plt.Line2D([], [], color="grey", marker="o", ls="", label=f"meets {slo_ms:g} ms"),
                plt.Line2D([], [], color="grey", marker="o", mfc="white", ls="",
                           label="misses the SLO"),
                plt.Line2D([], [], color="grey", marker="x", ls="", label="OOM"),
                plt.Line2D([], [], color="grey", marker="*", mec="k", ms=11, ls="",
                           label="peak under the SLO")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    return _save(plt, fig, title, path)


def latency_cdfs(path, latencies: dict[str, dict[str, np.ndarray]], *,
                 title: str) -> pathlib.Path:
    """Empirical CDFs of per-request latencies, one panel per latency, one line per system.

    Args:
      path: the PNG to write.
      latencies: {system: {panel label, e.g. "TTFT (ms)": values in ms}}; empty arrays
        draw nothing. A panel's x axis is logarithmic when its values span more than 100x.
      title: figure title.

    Returns:
      The path written.
    """
    plt = _pyplot()
    kinds = list(dict.fromkeys(k for per in latencies.values() for k in per))
    fig, axes = _figure(plt, 1, len(kinds), (5.2 * len(kinds), 4.2))
    for ax, kind in zip(axes[0], kinds):
        every = []
        for i, (system, per) in enumerate(latencies.items()):
            values = np.sort(np.asarray(per.get(kind, []), np.float64))
            values = values[np.isfinite(values)]
            if values.size:
                every.append(values)
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                        color=f"C{i % 10}", label=f"{system} (n={values.size})")
        joined = np.concatenate(every) if every else np.array([])
        if joined.size and joined.min() > 0 and joined.max() > 100 * joined.min():
            ax.set_xscale("log")
        for q, style in ((0.5, ":"), (0.99, "--")):
            ax.axhline(q, color="grey", lw=0.8, ls=style)
            ax.text(1.0, q, f" p{q * 100:g}", transform=ax.get_yaxis_transform(),
                    va="center", fontsize=7, color="grey")
        ax.set_xlabel(kind)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, title, path)


def timelines(path, series: dict[str, list[dict]], *, tiers, title: str,
              xlabel: str = "simulated time (s)") -> pathlib.Path:
    """A run's time series over simulated time, one colour per system: running and
    queued requests, step time, and KV tokens per tier (line style per tier).

    Args:
      path: the PNG to write.
      series: {system: metrics.timeline_rows rows}.
      tiers: tier names (columns ``<tier>_kv_tokens``); tiers that hold nothing in any
        system are left out.
      title: figure title; xlabel: the time axis label.

    Returns:
      The path written.
    """
    plt = _pyplot()
    fig, axes = _figure(plt, 4, 1, (10, 9.5))
    axes = axes[:, 0]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)  # one time axis, at the bottom
    panels = (("running", "running requests"), ("queued", "queued requests"),
              ("step_time_ms", "step time (ms)"))
    styles = ("-", "--", ":")
    used = [t for t in tiers if any(r[f"{t}_kv_tokens"] for rows in series.values()
                                    for r in rows)]
    for i, (system, rows) in enumerate(series.items()):
        colour = f"C{i % 10}"
        t = [r["time_s"] for r in rows]
        for ax, (key, _) in zip(axes, panels):
            ax.plot(t, [np.nan if r[key] is None else r[key] for r in rows], color=colour,
                    lw=0.9, label=system if key == "running" else None)
        for tier, style in zip(used, styles):
            axes[3].plot(t, [r[f"{tier}_kv_tokens"] for r in rows], color=colour, ls=style,
                         lw=0.9, label=f"{system} {tier}")
    for ax, (_, label) in zip(axes, (*panels, (None, "KV tokens held"))):
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[3].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xlabel(xlabel)
    return _save(plt, fig, title, path)


def _save(plt, fig, title: str, path) -> pathlib.Path:
    """Title, write the PNG (creating its folder) and free the figure."""
    fig.suptitle(title, fontsize=10)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
