"""Readable terminal tables and optional plots for the CLI, the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    """Floats to about four significant digits: 12345 -> "12,345", 123.456 -> "123.5", 0.01234 -> "0.0123"."""
    if isinstance(value, float):
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1 or magnitude == 0:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A box-free aligned table: numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as GitHub markdown, for results committed beside the benchmarks."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_results(out: str | Path | None, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   notes: str = "", data: Any = None) -> Path | None:
    """Print a benchmark's table (and ``notes``); with ``out``, also write ``<out>.md`` (title, table, notes)
    and, when given, ``data`` as ``<out>.json``. Returns the markdown path, beside which plots go."""
    import json

    print()
    print(format_table(headers, rows, title=title))
    if notes:
        print(f"\n{notes}")
    if out is None:
        return None
    path = Path(out).with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{markdown_table(headers, rows)}\n" + (f"\n{notes}\n" if notes else ""))
    written = [path]
    if data is not None:
        path.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        written.append(path.with_suffix(".json"))
    print("written: " + ", ".join(map(str, written)))
    return path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_plot(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float]], title: str,
             log_scale: Sequence[str] = ()) -> Path:
    """One bar-chart panel per series (metric), bars per group (e.g. sampler); saved as PNG.

    Series named in ``log_scale`` get a logarithmic y axis (for values spanning decades).
    """
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        ax.bar(range(len(groups)), values, color=plt.cm.tab10.colors[: len(groups)])
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        if name in log_scale:
            ax.set_yscale("log")
    fig.suptitle(title)
    return _save(plt, fig, path)


def ratio_plot(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[tuple[float, float, float]]],
               title: str, ylabel: str, target: float = 1.0) -> Path:
    """Grouped bars of ratios (median, with min-max whiskers) per group, and a dashed line at ``target``."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 3.8))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        mids = [v[1] for v in values]
        whiskers = [[m - v[0] for m, v in zip(mids, values)], [v[2] - m for m, v in zip(mids, values)]]
        ax.bar(xs, mids, width, yerr=whiskers, capsize=2, label=name, color=plt.cm.tab10.colors[i])
    ax.axhline(target, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def frontier_plot(path: str | Path, curves: dict[str, Sequence[tuple[float, float, str]]], title: str,
                  xlabel: str, ylabel: str) -> Path:
    """One line per curve through its (x, y) points, each point labelled with its note (the knob value)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    markers = "osD^v<>ph*"
    for i, (name, points) in enumerate(curves.items()):
        xs, ys, notes = zip(*points)
        color = plt.cm.tab10.colors[i % 10]
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=color, label=name, linewidth=1.2, markersize=5)
        for x, y, note in points:
            ax.annotate(note, (x, y), fontsize=6, color=color, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def line_panels(path: str | Path, panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
                xlabels: Sequence[str], title: str) -> Path:
    """One panel per entry of ``panels`` (its title → {series: (xs, ys)}), a line per series; saved as PNG."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, series), xlabel in zip(axes[0], panels.items(), xlabels):
        for i, (label, (xs, ys)) in enumerate(series.items()):
            ax.plot(xs, ys, marker="osD^v"[i % 5], label=label, color=plt.cm.tab10.colors[i % 10])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(plt, fig, path)
