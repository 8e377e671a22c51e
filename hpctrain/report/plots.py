"""Figures of a sweep: curves of every run by epoch, and the best metric over the grid.

Figures are built with matplotlib's object API (no pyplot state) by functions that return
the Figure, so tests can inspect the artists; ``save_png`` renders them with the Agg
backend without the Software/date metadata, so an unchanged sweep gives identical PNGs.

In a curves figure, the runs that are not highlighted are drawn as one LineCollection per
style (a thousand runs render in a fraction of a second); the best K runs are separate,
labelled lines on top. Each artist's gid says what it is: ``train``/``val`` for a
collection (one segment per run), ``train:<run_id>``/``val:<run_id>`` for a line.
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

    fig = _figure((10, 6))
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
            label = f"#{rank + 1} {run.run_id}" + (f" ({metric_label}={run.best_value:.4g})"
                                                     if split == "val" and metric_label else "")
            line, = ax.plot(pts[:, 0], pts[:, 1], style, color=palette(rank % 10), linewidth=2.0,
                            label=label if split == "val" else None, zorder=3)
            line.set_gid(f"{split}:{run.run_id}")
    ax.autoscale_view()
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(name)
    ax.set_title(f"{name} by epoch, {len(runs)} runs (train dashed, val solid)")
    ax.grid(True, alpha=0.3)
    if highlight:
        ax.legend(loc="upper right", fontsize="small", title=f"best {len(highlight)}")
    _margins(fig, left_in=0.8, bottom_in=0.6)
    return fig


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
    if not values or not all(_is_number(v) and v > 0 for v in values):
        return False
    return key.split(".")[-1] in LOG_KEYS or max(values) / min(values) >= 100


def grid_line_figure(runs: list[RunRecord], key: str, metric: str, mode: str):
    """Best ``metric`` against the values of one grid key (best over any other keys)."""
    values = grid_values(runs, key)
    best = best_by(runs, [key], mode)
    y = [best.get((value_key(v),), math.nan) for v in values]
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    numeric = all(_is_number(v) for v in values)
    x = values if numeric else list(range(len(values)))
    line, = ax.plot(x, y, "o-")
    line.set_gid(f"best:{key}")
    if not numeric:
        ax.set_xticks(x, [value_label(v) for v in values], rotation=30 if len(values) > 6 else 0)
    if _log_axis(key, values):
        ax.set_xscale("log")
    finite = [(xi, yi) for xi, yi in zip(x, y) if math.isfinite(yi)]
    if finite:
        bx, by = (min if mode == "min" else max)(finite, key=lambda p: p[1])
        ax.plot([bx], [by], "*", markersize=14, color="tab:red", gid="best-point")
    ax.set_xlabel(key)
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"best {metric} against {key}")
    ax.grid(True, alpha=0.3)
    labels = [] if numeric else [value_label(v) for v in values]
    _margins(fig, left_in=0.9, bottom_in=0.7 + (0.07 * max(map(len, labels)) if labels and len(values) > 6 else 0.0))
    return fig


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
    """loss.png (and <metric>.png when the metric is another per-epoch curve), best_vs_<key>.png
    for every swept key, heatmap.png for a grid over exactly two keys. Returns the files."""
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
            written.append(_save(grid_line_figure(data.runs, key, metric, mode),
                                 out_dir / f"best_vs_{_file_part(key)}.png"))
        if len(keys) == 2:
            written.append(_save(heatmap_figure(data.runs, keys[0], keys[1], metric, mode),
                                 out_dir / "heatmap.png"))
    return written


def _save(fig, path: Path) -> Path:
    save_png(fig, path)
    return path


def _file_part(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)
