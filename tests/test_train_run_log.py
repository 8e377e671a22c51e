"""The run's records: metrics.csv text, appended rows, restart at a checkpoint, throttled reports."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from hpctrain.train import checkpoint as ckpt
from hpctrain.train.run_log import MetricRows, RunLog, Throttled, metrics_csv, parse_metrics_csv, timing_line

ROWS = [{"epoch": 1, "step": 11, "lr": 0.001, "train_loss": 0.1 + 0.2, "val_loss": float("nan"), "val_auc": None},
        {"epoch": 2, "step": 22, "lr": 1e-05, "train_loss": 1 / 3, "val_loss": -2.5e-300, "val_auc": 0.75}]


def test_metrics_text_reads_back_to_equal_rows_and_bytes():
    text = metrics_csv(ROWS)
    assert text.splitlines()[0] == "epoch,step,lr,train_loss,val_loss,val_auc"
    back = parse_metrics_csv(text)
    assert back[1] == ROWS[1] and isinstance(back[0]["epoch"], int) and back[0]["val_auc"] is None
    assert math.isnan(back[0]["val_loss"])
    assert metrics_csv(back) == text


def test_metric_rows_add_exactly_the_text_of_the_whole_file():
    rows = MetricRows()
    added = "".join(rows.append(dict(r)) for r in ROWS)
    assert added == rows.text() == metrics_csv(ROWS)
    assert MetricRows(ROWS).text() == metrics_csv(ROWS) and len(rows) == 2 and rows[-1]["epoch"] == 2


def test_restart_cuts_both_files_to_the_checkpoint_then_appends(tmp_path):
    log = RunLog(tmp_path)
    rows = MetricRows()
    log.restart(rows.text(), 0)
    assert not (tmp_path / "metrics.csv").exists()  # a fresh run has no rows yet
    for epoch, row in enumerate(ROWS, 1):
        log.append(rows.append(row), timing_line(epoch, 0.5, 100.0, float(epoch)))
    assert (tmp_path / "metrics.csv").read_text() == metrics_csv(ROWS)  # flushed, readable while open
    log.close()
    # A later process resumes from a checkpoint of epoch 1: epoch 2's lines go.
    again = RunLog(tmp_path)
    again.restart(MetricRows(ROWS[:1]).text(), 1)
    again.close()
    assert (tmp_path / "metrics.csv").read_text() == metrics_csv(ROWS[:1])
    timing = (tmp_path / "timing.csv").read_text().splitlines()
    assert timing == ["epoch,epoch_time_s,samples_per_s,elapsed_s", "1,0.5000,100.0,1.000"]


def test_restart_at_epoch_zero_removes_stale_files_and_writes_the_timing_header_once(tmp_path):
    (tmp_path / "metrics.csv").write_text("old\n")
    (tmp_path / "timing.csv").write_text("epoch,epoch_time_s,samples_per_s,elapsed_s\n3,1,1,1\n")
    log = RunLog(tmp_path)
    log.restart("", 0)
    log.append(MetricRows().append(ROWS[0]), timing_line(1, 0.25, 10.0, 2.0))
    log.sync()
    log.close()
    assert (tmp_path / "metrics.csv").read_text() == metrics_csv(ROWS[:1])
    assert (tmp_path / "timing.csv").read_text().splitlines()[1:] == ["1,0.2500,10.0,2.000"]


def _progress(status="running", message="", epoch=None):
    return SimpleNamespace(status=status, message=message, epoch=epoch)


def test_throttled_passes_transitions_the_first_epoch_and_one_epoch_report_per_period():
    seen, now = [], [0.0]
    listen = Throttled(seen.append, every_s=10.0, clock=lambda: now[0])
    listen(_progress(message="resumed from last.pt"))
    for t in (1.0, 2.0, 3.0, 11.5, 12.0):
        now[0] = t
        listen(_progress(epoch=t))
    now[0] = 12.5
    listen(_progress("done", "finished 5 epochs"))
    assert [(p.status, p.epoch) for p in seen] == [("running", None), ("running", 1.0), ("running", 11.5),
                                                   ("done", None)]


def test_a_fresh_run_shows_its_first_epoch_at_once():
    """A fresh start reports "running" with no message: its first epoch must still pass."""
    seen, now = [], [0.0]
    listen = Throttled(seen.append, every_s=10.0, clock=lambda: now[0])
    listen(_progress())
    for t in (0.5, 1.0, 1.5):
        now[0] = t
        listen(_progress(epoch=t))
    assert [p.epoch for p in seen] == [None, 0.5]


def test_a_checkpoint_this_process_wrote_is_retired_without_reading_it_back(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LAST
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    reads = []
    real = ckpt.load_checkpoint
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda p, *a: reads.append(p) or real(p, *a))
    ckpt.save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, keep_previous=True)
    assert reads == [] and (tmp_path / ckpt.PREVIOUS).exists()
    path.write_bytes(path.read_bytes()[:-7])  # changed since this process wrote it: read back, found bad
    ckpt.save_checkpoint(path, {"model": {"w": torch.full((2,), 2.0)}}, keep_previous=True)
    assert reads == [path] and (tmp_path / (ckpt.LAST + ckpt.CORRUPT_SUFFIX)).exists()
    assert torch.equal(ckpt.load_checkpoint(tmp_path / ckpt.PREVIOUS)["model"]["w"], torch.ones(2))  # kept


def test_scalar_lists_digest_as_the_item_by_item_feed_does():
    items = [1, 2.5, "a", None, True]
    import hashlib
    h = hashlib.sha256()
    h.update(f"L{len(items)}".encode())
    for item in items:
        h.update(f"V{type(item).__name__}:{item!r}".encode())
    assert ckpt.content_digest(items) == h.hexdigest()
