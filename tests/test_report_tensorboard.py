"""TensorBoard events: written by rank 0 while a run trains (one scalar per epoch, equal to
metrics.csv, and the run's HParams), rewritten whole by a resumed run, skipped with one
line when TensorBoard is missing, and never imported by ``hpctrain --help``."""
from __future__ import annotations

import csv
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpctrain.report.live_tb import TB_FOLDER, LiveTensorBoard
from hpctrain.runstate import RunRecorder
from test_runner import hpctrain, run_dir, small_config

from tensorboard.backend.event_processing import event_accumulator  # a dependency: never skipped
from tensorboard.plugins.hparams import api_pb2, metadata  # noqa: E402

HEADER = "epoch,step,lr,train_loss,val_loss,val_accuracy"


def load(folder: Path):
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    return acc


def metrics_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hparams_of(acc):
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    end = (metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
           if metadata.SESSION_END_INFO_TAG in content else None)
    return start, experiment, end


def test_a_run_writes_one_scalar_per_epoch_and_its_hparams(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "--index", "1", "--sweep-dir", str(sweep))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "TensorBoard" not in out.stdout + out.stderr       # no line saying events were given up
    rd = run_dir(sweep, 1)
    rows = metrics_rows(rd / "metrics.csv")
    acc = load(rd / TB_FOLDER)
    for column, tag in (("val_loss", "val/loss"), ("train_loss", "train/loss"), ("val_accuracy", "val/accuracy"),
                        ("lr", "lr")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)
    start, experiment, end = hparams_of(acc)
    assert start.hparams["model.activation"].string_value == "tanh"
    assert [m.name.tag for m in experiment.metric_infos] == ["val/loss"]       # train.monitor
    assert [h.name for h in experiment.hparam_infos] == ["model.activation"]
    assert end is not None and end.status == api_pb2.STATUS_SUCCESS


def test_train_tensorboard_false_writes_no_events(tmp_path):
    sweep = tmp_path / "sweep"
    out = hpctrain("run", str(small_config(tmp_path)), "train.tensorboard=false", "train.epochs=1",
                   "--sweep-dir", str(sweep))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (run_dir(sweep, 0) / "metrics.csv").is_file() and not (run_dir(sweep, 0) / TB_FOLDER).exists()


@dataclass
class FakeProgress:
    status: str = "running"
    monitor: str = "val_accuracy"


def write_metrics(folder: Path, epochs: int) -> None:
    lines = [HEADER] + [f"{e},{10 * e},0.01,{1 / e!r},{2 / e!r},{1 - 0.1 / e!r}" for e in range(1, epochs + 1)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def started_run(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    RunRecorder(folder, index=3, run_id="r3", params={"optim.lr": 0.01, "model.hidden": [64, 64]}).running(
        total_epochs=5, world_size=1, backend="none")
    return folder


def test_each_report_is_on_disk_before_the_next_epoch(tmp_path):
    folder = started_run(tmp_path)
    live = LiveTensorBoard(folder, log=lambda m: None)
    live(FakeProgress())                                    # before the first epoch: nothing to write
    assert not list((folder / TB_FOLDER).glob("events.*"))
    for epoch in (1, 2, 3):
        write_metrics(folder, epoch)
        live(FakeProgress())
        assert [e.step for e in load(folder / TB_FOLDER).Scalars("val/accuracy")] == list(range(1, epoch + 1))
    start, experiment, end = hparams_of(load(folder / TB_FOLDER))
    assert start.hparams["optim.lr"].number_value == 0.01 and start.hparams["model.hidden"].string_value == "64x64"
    assert [m.name.tag for m in experiment.metric_infos] == ["val/accuracy"] and end is None
    live(FakeProgress(status="diverged"))
    assert hparams_of(load(folder / TB_FOLDER))[2].status == api_pb2.STATUS_FAILURE


def test_a_resumed_run_rewrites_the_events_without_duplicates(tmp_path):
    folder = started_run(tmp_path)
    first = LiveTensorBoard(folder, log=lambda m: None)
    write_metrics(folder, 3)
    first(FakeProgress())
    first(FakeProgress(status="preempted"))
    write_metrics(folder, 2)                    # the checkpoint was at epoch 2: epoch 3 is redone
    second = LiveTensorBoard(folder, log=lambda m: None)
    second(FakeProgress())
    write_metrics(folder, 4)
    second(FakeProgress(status="done"))
    assert len(list((folder / TB_FOLDER).glob("events.*"))) == 1
    events = load(folder / TB_FOLDER).Scalars("val/loss")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([2 / e for e in range(1, 5)])


def test_missing_tensorboard_is_one_line_and_no_failure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import raises ImportError
    folder = started_run(tmp_path)
    lines: list[str] = []
    live = LiveTensorBoard(folder, log=lines.append)
    for epoch in (1, 2):
        write_metrics(folder, epoch)
        live(FakeProgress())
    live(FakeProgress(status="done"))
    assert len(lines) == 1 and "pip install tensorboard" in lines[0]


def test_help_does_not_import_tensorboard():
    code = ("import sys\nfrom hpctrain import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
