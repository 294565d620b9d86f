"""PNG figures (matplotlib, headless Agg backend; imported only when a figure is drawn)."""

from __future__ import annotations

import pathlib


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(path, panels: dict[str, tuple[list[str], dict[str, list]]], *, ylabel: str,
                 title: str, missing_label: str = "OOM", log: bool = False) -> pathlib.Path:
    """Grouped bar charts, one panel per entry of ``panels`` stacked vertically.

    Args:
      path: the PNG to write (its folder is created).
      panels: {panel title: (group labels, {series name: values per group})}. A value of
        None draws no bar and writes ``missing_label`` at its place (e.g. OOM).
      ylabel: y-axis label of every panel (say the unit); title: figure title.
      missing_label: text written where a value is None.
      log: logarithmic y axis.

    Returns:
      The path written.
    """
    plt = _pyplot()
    widest = max(len(groups) * max(len(series), 1) for groups, series in panels.values())
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(min(max(6.0, 0.22 * widest + 2), 16), 3.4 * len(panels)))
    for ax, (panel, (groups, series)) in zip(axes[:, 0], panels.items()):
        names = list(series)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
            values = series[name]
            ax.bar([x for x, v in zip(xs, values) if v is not None],
                   [v for v in values if v is not None], width, label=name)
            for x, v in zip(xs, values):
                if v is None:
                    ax.text(x, 0.02, missing_label, rotation=90, ha="center", va="bottom",
                            fontsize=6, transform=ax.get_xaxis_transform())
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel, fontsize=9)
        if log:
            ax.set_yscale("log")
        # Head-room above the bars for the legend.
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * (4.0 if log else 1.3))
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=min(len(names), 5), loc="upper right")
    return _save(plt, fig, title, path)


def throughput_vs_batch(path, rows: list[dict], *, slo_ms: float, title: str) -> pathlib.Path:
    """Two panels: throughput and TPOT p99 against batch size, one line per system.

    Args:
      path: the PNG to write (its folder is created).
      rows: sweep rows (``study.run_sweep``) with ``system``, ``batch``, ``oom``,
        ``throughput_tokens_per_s`` (output tokens/s) and ``tpot_p99_ms`` (ms); rows
        marked ``oom`` are left out.
      slo_ms: TPOT SLO drawn as a horizontal line, ms; title: figure title.

    Returns:
      The path written.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system and not r["oom"]]
        batches = [r["batch"] for r in mine]
        left.plot(batches, [r["throughput_tokens_per_s"] for r in mine], marker="o",
                  label=system)
        right.plot(batches, [r["tpot_p99_ms"] for r in mine], marker="o", label=system)
    right.axhline(slo_ms, color="k", ls="--", lw=1, label=f"SLO {slo_ms:g} ms")
    for ax, label in ((left, "output tokens / s"), (right, "TPOT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (max concurrent requests)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, title, path)


def _save(plt, fig, title: str, path) -> pathlib.Path:
    """Title, lay out, write the PNG (creating its folder) and free the figure."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
