"""Figures of a sweep: curves of every run by epoch, and the monitored metric over the grid.

Legends sit outside the axes, to the right, so they never hide a curve or a point; epoch
axes carry integer ticks only. Figures are built with matplotlib's object API (no pyplot state) by functions that return
the Figure, so tests can inspect the artists; ``save_png`` renders them with the Agg
backend without the Software/date metadata, so an unchanged sweep gives identical PNGs.

In a curves figure, the runs that are not highlighted are drawn as one LineCollection per
style (a thousand runs render in a fraction of a second); the best K runs are separate,
labelled lines on top. Each artist's gid says what it is: ``train``/``val`` for a
collection (one segment per run), ``train:<run_id>``/``val:<run_id>`` for a line.

Over the grid, a strip plot per swept key shows every run as a point above its value of
the key (no line joins the values: they are separate settings, often categories); a
heatmap adds the best value of each pair when exactly two keys are swept.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..fsutil import atomic_write_bytes
from .runs import RunRecord, SweepData

# Keys whose values span decades: the best metric against them is drawn on a log x axis.
LOG_KEYS = ("lr", "weight_decay", "l1", "l2", "eps", "min_lr", "max_lr", "decay_rate")
DPI = 100


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI)


def save_png(fig, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- curves by epoch


def _points(run: RunRecord, column: str) -> Optional[np.ndarray]:
    values = run.curves.get(column) if run.curves is not None else None
    if values is None:
        return None
    keep = np.isfinite(values)
    if not keep.any():
        return None
    return np.column_stack([run.curves.epochs[keep], values[keep]])


def curves_figure(runs: list[RunRecord], name: str = "loss", highlight: list[RunRecord] = (),
                  log_scale: bool = False, metric_label: str = ""):
    """train_<name> dashed and val_<name> solid for every run, coloured by run (grid order);
    the ``highlight`` runs (best first) drawn thick and labelled."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection

    labels = {r.run_id: _highlight_label(rank, r, metric_label) for rank, r in enumerate(highlight)}
    legend_in = _legend_width(list(labels.values()) + [f"best {len(highlight)}"]) if highlight else 0.0
    fig = _figure((10 + legend_in, 6))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    top = {r.run_id: rank for rank, r in enumerate(highlight)}
    n = max(len(runs) - 1, 1)
    for split, style in (("train", "--"), ("val", "-")):
        segments, colours = [], []
        for i, run in enumerate(runs):
            pts = _points(run, f"{split}_{name}")
            if pts is not None and run.run_id not in top:
                segments.append(pts)
                colours.append(cmap(i / n))
        if segments:
            alpha = 0.5 if len(segments) <= 50 else 0.25
            coll = LineCollection(segments, colors=colours, linestyles=style, linewidths=0.8, alpha=alpha)
            coll.set_gid(split)
            ax.add_collection(coll)
    palette = colormaps["tab10"]
    for run in highlight:
        rank = top[run.run_id]
        for split, style in (("train", "--"), ("val", "-")):
            pts = _points(run, f"{split}_{name}")
            if pts is None:
                continue
            line, = ax.plot(pts[:, 0], pts[:, 1], style, color=palette(rank % 10), linewidth=2.0,
                            label=labels[run.run_id] if split == "val" else None, zorder=3)
            line.set_gid(f"{split}:{run.run_id}")
    ax.autoscale_view()
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel(name)
    ax.set_title(f"{name} by epoch, {len(runs)} runs (train dashed, val solid)")
    ax.grid(True, alpha=0.3)
    if highlight:
        _outside_legend(ax, title=f"best {len(highlight)}")
    _margins(fig, left_in=0.8, bottom_in=0.6, right_in=0.25 + legend_in)
    return fig


def _highlight_label(rank: int, run: RunRecord, metric_label: str) -> str:
    value = f" ({metric_label}={run.best_value:.4g})" if metric_label and run.best_value is not None else ""
    return f"#{rank + 1} {run.run_id}{value}"


# Inches per character of a "small" legend entry, and the legend's handle, padding and gap.
_CHAR_IN, _LEGEND_PAD_IN = 0.068, 0.7


def _legend_width(labels: list[str]) -> float:
    """Room to keep right of the axes for a legend of these labels, in inches."""
    return _LEGEND_PAD_IN + _CHAR_IN * max((len(t) for t in labels), default=0)


def _outside_legend(ax, title: str = None):
    """A legend right of the axes, top aligned: it can never cover what the axes show."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
                     title=title, title_fontsize="small")


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def run_lines(fig, split: str) -> list[str]:
    """One entry per run drawn for ``split`` (train or val): collection segments and lines."""
    found: list[str] = []
    for ax in fig.axes:
        for coll in ax.collections:
            if coll.get_gid() == split:
                found.extend(f"{split}:segment" for _ in coll.get_segments())
        found.extend(line.get_gid() for line in ax.lines if (line.get_gid() or "").startswith(f"{split}:"))
    return found


# --------------------------------------------------------------------------- best over the grid


def value_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def value_label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "x".join(value_label(v) for v in value) or "[]"
    return str(value)


def grid_values(runs: list[RunRecord], key: str) -> list[Any]:
    """Distinct values of a grid key in grid order (numbers sorted ascending)."""
    seen: dict[str, Any] = {}
    for run in runs:
        if key in run.params:
            seen.setdefault(value_key(run.params[key]), run.params[key])
    values = list(seen.values())
    if values and all(_is_number(v) for v in values):
        values.sort()
    return values


def swept_keys(data: SweepData) -> list[str]:
    return [k for k in data.param_keys if len(grid_values(data.runs, k)) > 1]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def best_by(runs: list[RunRecord], keys: list[str], mode: str) -> dict[tuple, float]:
    """Best metric over the runs sharing each combination of ``keys`` values."""
    best: dict[tuple, float] = {}
    for run in runs:
        if run.best_value is None or not all(k in run.params for k in keys):
            continue
        at = tuple(value_key(run.params[k]) for k in keys)
        old = best.get(at)
        if old is None or (run.best_value < old if mode == "min" else run.best_value > old):
            best[at] = run.best_value
    return best


def _log_axis(key: str, values: list[Any]) -> bool:
    """Log x for positive numbers that are lr-like by name, span 100x or more, or are spaced
    evenly in log rather than linearly (32, 64, 128, 256)."""
    if not values or not all(_is_number(v) and v > 0 for v in values):
        return False
    if key.split(".")[-1] in LOG_KEYS or max(values) / min(values) >= 100:
        return True
    return len(values) >= 3 and _spread_ratio(np.log(values)) < _spread_ratio(np.asarray(values, float))


def _spread_ratio(points: np.ndarray) -> float:
    """How uneven the gaps between sorted points are: max gap / min gap."""
    gaps = np.diff(np.sort(points))
    return float(gaps.max() / gaps.min()) if gaps.min() > 0 else math.inf


# How runs are drawn by state: finished, still partial, or stopped early (failed, diverged,
# pruned): a stopped run's value is the best it reached before it stopped.
STATE_GROUPS = (
    ("finished", ("done",), dict(marker="o", facecolors="tab:blue", edgecolors="tab:blue")),
    ("partial", ("running", "preempted", "unknown"), dict(marker="o", facecolors="none", edgecolors="tab:blue")),
    ("stopped early", None, dict(marker="X", facecolors="tab:red", edgecolors="tab:red")),
)


def _state_group(status: str) -> str:
    for name, states, _ in STATE_GROUPS:
        if states is None or status in states:
            return name
    return STATE_GROUPS[-1][0]


class _XAxis:
    """Where each value of a grid key sits on the x axis: its index for categories, else
    the value itself (in log10 units on a log axis), with the half-width of a strip."""

    def __init__(self, key: str, values: list[Any]):
        self.numeric = all(_is_number(v) for v in values)
        self.log = self.numeric and _log_axis(key, values)
        if not self.numeric:
            centres = np.arange(len(values), dtype=float)
        else:
            centres = np.log10(np.asarray(values, float)) if self.log else np.asarray(values, float)
        self.centres = {value_key(v): float(c) for v, c in zip(values, centres)}
        gaps = np.diff(np.sort(centres))
        self.half_width = 0.3 * (float(gaps.min()) if len(gaps) else 1.0)

    def to_data(self, position: float) -> float:
        return 10.0 ** position if self.log else position


def _spread(n: int, half_width: float) -> np.ndarray:
    """Offsets of n points across a strip, evenly spaced (reproducible, unlike random jitter)."""
    if n == 1:
        return np.zeros(1)
    return np.linspace(-half_width, half_width, n) * min(1.0, n / 8)


def strip_figure(runs: list[RunRecord], key: str, metric: str, mode: str):
    """Every run's best ``metric`` as a point above its value of ``key``, spread across a strip;
    a bar marks the best run of each value and a star the best of all. Values are categories
    (evenly spaced, labelled) unless numeric; numbers go on a log axis when log-spaced."""
    values = grid_values(runs, key)
    axis = _XAxis(key, values)
    by_value: dict[str, list[RunRecord]] = {}
    for run in runs:
        if run.best_value is not None and math.isfinite(run.best_value) and key in run.params:
            by_value.setdefault(value_key(run.params[key]), []).append(run)
    fig = _figure((7.5 + _legend_width(["stopped early", "best of each value"]), 4.5))
    ax = fig.add_subplot()
    where = _draw_points(ax, axis, by_value)
    _draw_best_bars(ax, axis, by_value, mode)
    _draw_best_star(ax, where, by_value, mode)
    _label_strip_axes(ax, axis, key, values)
    shown = sum(len(group) for group in by_value.values())
    ax.set_ylabel(f"best {metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    ax.set_title(f"{metric} by {key}: {shown} of {len(runs)} runs have a value")
    ax.grid(True, axis="y", alpha=0.3)
    _outside_legend(ax)
    longest = max((len(value_label(v)) for v in values), default=0) if not axis.numeric else 0
    _margins(fig, left_in=0.9, bottom_in=0.7 + (0.07 * longest if len(values) > 6 else 0.0),
             right_in=0.25 + _legend_width(["stopped early", "best of each value"]))
    return fig


def _draw_points(ax, axis: _XAxis, by_value: dict[str, list[RunRecord]]) -> dict[str, float]:
    """One scatter per state group; returns each run's x."""
    where: dict[str, float] = {}
    xs: dict[str, list[float]] = {name: [] for name, _, _ in STATE_GROUPS}
    ys: dict[str, list[float]] = {name: [] for name, _, _ in STATE_GROUPS}
    for at, group in by_value.items():
        for offset, run in zip(_spread(len(group), axis.half_width), group):
            name = _state_group(run.status)
            where[run.run_id] = axis.to_data(axis.centres[at] + offset)
            xs[name].append(where[run.run_id])
            ys[name].append(run.best_value)
    for name, _, style in STATE_GROUPS:
        if xs[name]:
            ax.scatter(xs[name], ys[name], s=28, linewidths=1.2, zorder=3, label=name, gid=f"runs:{name}", **style)
    return where


def _draw_best_bars(ax, axis: _XAxis, by_value: dict[str, list[RunRecord]], mode: str) -> None:
    from matplotlib.collections import LineCollection

    pick = min if mode == "min" else max
    bars = []
    for at, group in by_value.items():
        y = pick(r.best_value for r in group)
        c = axis.centres[at]
        bars.append([(axis.to_data(c - axis.half_width * 1.2), y), (axis.to_data(c + axis.half_width * 1.2), y)])
    if bars:
        coll = LineCollection(bars, colors="0.35", linewidths=1.5, zorder=2, label="best of each value")
        coll.set_gid("best-per-value")
        ax.add_collection(coll)


def _draw_best_star(ax, where: dict[str, float], by_value: dict[str, list[RunRecord]], mode: str) -> None:
    everyone = [r for group in by_value.values() for r in group]
    if not everyone:
        return
    best = (min if mode == "min" else max)(everyone, key=lambda r: r.best_value)
    ax.scatter([where[best.run_id]], [best.best_value], marker="*", s=220, color="gold",
               edgecolors="black", linewidths=0.8, zorder=4, label="best run", gid="best-point")


def _label_strip_axes(ax, axis: _XAxis, key: str, values: list[Any]) -> None:
    ticks = [axis.to_data(axis.centres[value_key(v)]) for v in values]
    if axis.log:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(ticks, [value_label(v) for v in values], rotation=30 if len(values) > 6 else 0)
    if values:
        pad = axis.half_width * 2
        lo, hi = axis.centres[value_key(values[0])] - pad, axis.centres[value_key(values[-1])] + pad
        ax.set_xlim(axis.to_data(lo), axis.to_data(hi))
    ax.autoscale_view(scalex=False)
    ax.set_xlabel(key)


def heatmap_figure(runs: list[RunRecord], rows_key: str, cols_key: str, metric: str, mode: str):
    """Best ``metric`` for each pair of values of two grid keys; empty cells have no value yet."""
    rows, cols = grid_values(runs, rows_key), grid_values(runs, cols_key)
    best = best_by(runs, [rows_key, cols_key], mode)
    table = np.array([[best.get((value_key(r), value_key(c)), np.nan) for c in cols] for r in rows])
    fig = _figure((max(5.0, 1.1 * len(cols) + 3), max(3.5, 0.6 * len(rows) + 2)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(table), cmap="viridis_r" if mode == "min" else "viridis",
                      aspect="auto")
    image.set_gid("heatmap")
    ax.set_xticks(range(len(cols)), [value_label(c) for c in cols])
    ax.set_yticks(range(len(rows)), [value_label(r) for r in rows])
    ax.set_xlabel(cols_key)
    ax.set_ylabel(rows_key)
    if table.size <= 400:
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isfinite(table[i, j]):
                    r, g, b, _ = image.cmap(image.norm(table[i, j]))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, f"{table[i, j]:.3g}", ha="center", va="center", fontsize="small", color=ink)
    if np.isfinite(table).any():
        flat = np.where(np.isfinite(table), table, np.inf if mode == "min" else -np.inf)
        i, j = np.unravel_index(np.argmin(flat) if mode == "min" else np.argmax(flat), table.shape)
        ax.add_patch(_cell_box(i, j))
    fig.colorbar(image, ax=ax, label=f"best {metric}")
    ax.set_title(f"best {metric} over {rows_key} x {cols_key}")
    longest = max(len(value_label(r)) for r in rows)
    _margins(fig, left_in=0.6 + 0.08 * longest, bottom_in=0.7, right_in=1.3)
    return fig


def _margins(fig, left_in: float, bottom_in: float, right_in: float = 0.25, top_in: float = 0.45) -> None:
    """Fixed margins in inches. A layout engine (tight_layout) would make savefig draw every
    figure twice, which for a thousand-run curve plot doubles the cost of the plots."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=min(left_in / width, 0.45), right=1 - right_in / width,
                        bottom=min(bottom_in / height, 0.45), top=1 - top_in / height)


def _cell_box(i: int, j: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=2.5)


# --------------------------------------------------------------------------- all plots of a sweep


def write_plots(data: SweepData, ranked: list[RunRecord], out_dir: str | Path, metric: str, mode: str,
                top: int = 5, log_scale: bool = False) -> list[Path]:
    """loss.png (and <metric>.png when the metric is another per-epoch curve), by_<key>.png
    (every run's ``metric`` per value) for every swept key, heatmap.png for a grid over
    exactly two keys. ``metric`` is the one the runs are ranked by. Returns the files."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    highlight = ranked[:top]
    label = metric if metric.startswith("val_") else ""
    names = ["loss"]
    base = metric.split("_", 1)[1] if metric.startswith(("train_", "val_")) else None
    if base and base != "loss":
        names.append(base)
    for name in names:
        fig = curves_figure(data.runs, name, highlight, log_scale, label)
        written.append(_save(fig, out_dir / f"{name}.png"))
    keys = swept_keys(data)
    if ranked:
        for key in keys:
            written.append(_save(strip_figure(data.runs, key, metric, mode),
                                 out_dir / f"by_{_file_part(key)}.png"))
        if len(keys) == 2:
            written.append(_save(heatmap_figure(data.runs, keys[0], keys[1], metric, mode),
                                 out_dir / "heatmap.png"))
    return written


def _save(fig, path: Path) -> Path:
    save_png(fig, path)
    return path


def _file_part(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)
