"""The sweep figures: legends outside the axes, integer epoch ticks, one strip of points per
swept key (categories, log or linear x, never a line across values), stopped runs marked."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpctrain.report import plots
from hpctrain.report.runs import Curves, RunRecord, SweepData

LRS = [1e-4, 1e-3, 1e-2, 1e-1]
HIDDEN = [[8], [16, 16], [32, 32, 32]]
ACTIVATIONS = ["relu", "gelu"]


def make_run(index: int, lr: float, hidden: list, activation: str, status: str = "done") -> RunRecord:
    epochs = np.arange(1, 8)
    floor = 0.1 + abs(np.log10(lr) + 2.5) * 0.1 + 0.02 * len(hidden) + (0.05 if activation == "relu" else 0.0)
    val = floor + 1.0 / epochs
    curves = Curves(["train_loss", "val_loss", "val_accuracy"], epochs,
                    np.column_stack([val + 0.05, val, 1 - val / 2]))
    run = RunRecord(index, f"run{index:02d}", {"optim.lr": lr, "model.hidden": hidden, "model.activation": activation},
                    Path(f"/nowhere/run{index:02d}"), status, curves=curves)
    run.best_value, run.best_epoch = float(val.min()), 7
    return run


def three_key_runs() -> list[RunRecord]:
    runs, index = [], 0
    for lr in LRS:
        for hidden in HIDDEN:
            for activation in ACTIVATIONS:
                runs.append(make_run(index, lr, hidden, activation))
                index += 1
    runs[5].status, runs[9].status, runs[13].status = "failed", "diverged", "running"
    runs[20].best_value = None   # no value yet: not drawn
    return runs


def drawn(fig):
    """The figure's axes and renderer after an Agg draw, so artists know their extents."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return fig.axes[0], canvas.get_renderer()


def scatter_points(ax, gid: str) -> np.ndarray:
    found = [c for c in ax.collections if c.get_gid() == gid]
    return found[0].get_offsets() if found else np.zeros((0, 2))


def assert_legend_outside(fig):
    ax, renderer = drawn(fig)
    legend = ax.get_legend()
    assert legend is not None
    box, axes_box, fig_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer), fig.bbox
    assert box.x0 >= axes_box.x1             # right of the axes: covers no curve or point
    assert box.x1 <= fig_box.x1 + 0.5        # and not cut off by the figure's edge


def test_curves_legend_is_outside_and_epoch_ticks_are_integers():
    runs = three_key_runs()
    fig = plots.curves_figure(runs, "loss", runs[:5], metric_label="val_loss")
    assert_legend_outside(fig)
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_strip_for_a_log_spaced_key_shows_every_run_as_a_point():
    runs = three_key_runs()
    fig = plots.strip_figure(runs, "optim.lr", "val_loss", "min")
    ax, _ = drawn(fig)
    assert ax.get_xscale() == "log"
    assert ax.get_lines() == []              # no line joins the values
    points = np.concatenate([scatter_points(ax, f"runs:{name}") for name, _, _ in plots.STATE_GROUPS])
    with_value = [r for r in runs if r.best_value is not None]
    assert len(points) == len(with_value) == 23
    # every point sits in its value's strip: within a factor of ~1.6 of the lr, on the log axis
    for run in with_value:
        near = points[np.isclose(points[:, 1], run.best_value)]
        assert any(abs(np.log10(x) - np.log10(run.params["optim.lr"])) < 0.35 for x in near[:, 0])
    assert_legend_outside(fig)


def test_strip_for_a_categorical_key_uses_labelled_positions():
    runs = three_key_runs()
    fig = plots.strip_figure(runs, "model.hidden", "val_loss", "min")
    ax, _ = drawn(fig)
    assert ax.get_xscale() == "linear" and ax.get_lines() == []
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16x16", "32x32x32"]
    assert list(ax.get_xticks()) == [0, 1, 2]
    points = np.concatenate([scatter_points(ax, f"runs:{name}") for name, _, _ in plots.STATE_GROUPS])
    assert np.all(np.abs(points[:, 0] - np.round(points[:, 0])) < 0.5)
    bars = [c for c in ax.collections if c.get_gid() == "best-per-value"][0].get_segments()
    best = {i: min(r.best_value for r in runs if r.best_value is not None and r.params["model.hidden"] == h)
            for i, h in enumerate(HIDDEN)}
    assert sorted((round(float(np.mean(s[:, 0]))), s[0, 1]) for s in bars) == sorted(best.items())


def test_stopped_and_partial_runs_are_marked_apart():
    runs = three_key_runs()
    ax, _ = drawn(plots.strip_figure(runs, "model.activation", "val_loss", "min"))
    assert len(scatter_points(ax, "runs:stopped early")) == 2      # failed, diverged
    assert len(scatter_points(ax, "runs:partial")) == 1            # running
    assert len(scatter_points(ax, "runs:finished")) == 20
    star = scatter_points(ax, "best-point")
    assert star[0, 1] == min(r.best_value for r in runs if r.best_value is not None)


def test_strip_for_a_linear_key_and_max_mode():
    runs = [make_run(i, 1e-2, [8], "relu") for i in range(4)]
    for run, batch in zip(runs, [100, 200, 300, 400]):
        run.params["data.batch_size"] = batch
        run.best_value = batch / 1000
    ax, _ = drawn(plots.strip_figure(runs, "data.batch_size", "val_accuracy", "max"))
    assert ax.get_xscale() == "linear"
    assert scatter_points(ax, "best-point")[0].tolist() == [400, 0.4]   # alone in its strip: centred
    assert "higher is better" in ax.get_ylabel()


def test_log_axis_rule():
    assert plots._log_axis("data.batch_size", [32, 64, 128, 256])       # evenly spaced in log
    assert not plots._log_axis("data.batch_size", [100, 200, 300, 400])
    assert plots._log_axis("optim.lr", [0.1, 0.2])                      # an lr-like name
    assert not plots._log_axis("model.activation", ["relu", "gelu"])


def test_write_plots_writes_a_strip_per_key_and_no_heatmap_for_three_keys(tmp_path):
    runs = three_key_runs()
    data = SweepData(tmp_path, ["optim.lr", "model.hidden", "model.activation"], runs)
    ranked = sorted((r for r in runs if r.best_value is not None), key=lambda r: r.best_value)
    written = plots.write_plots(data, ranked, tmp_path / "plots", "val_accuracy", "max", top=3)
    assert sorted(p.name for p in written) == ["accuracy.png", "by_model.activation.png", "by_model.hidden.png",
                                                "by_optim.lr.png", "loss.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_write_plots_draws_a_heatmap_for_two_keys(tmp_path):
    runs = [r for r in three_key_runs() if r.params["model.activation"] == "gelu"]
    for r in runs:
        del r.params["model.activation"]
    data = SweepData(tmp_path, ["optim.lr", "model.hidden"], runs)
    written = plots.write_plots(data, runs, tmp_path / "plots", "val_loss", "min")
    assert "heatmap.png" in {p.name for p in written}
    assert not any(p.name.startswith("best_vs_") for p in written)
