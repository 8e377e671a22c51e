"""TensorBoard event contents of a sweep: tag names, HParams summaries, and the event files
``hpctrain collect --tensorboard`` writes.

Events are TensorBoard's own protobufs framed by its own record writer, so the files are
exactly what TensorBoard reads. TensorBoard is imported inside the functions: hpctrain
starts without it, and only the commands that write events need it.

HParams: each run's folder holds a session start (its grid values), the experiment (the
swept keys and the monitored metric; the same for every run of a sweep, so whichever run
TensorBoard reads it from describes them all) and, once the run has ended, a session end.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from ..errors import HpctrainError
from ..fsutil import atomic_write_bytes

# A fixed name (no creation time or host) keeps repeated collects identical.
EVENT_FILE = "events.out.tfevents.0000000000.hpctrain"
INSTALL_HINT = "pip install tensorboard"


def require_tensorboard(what: str) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise HpctrainError(f"{what} needs the tensorboard package ({INSTALL_HINT})") from None


def tag_for(column: str) -> str:
    """train_loss -> train/loss, so TensorBoard groups the splits; lr stays lr."""
    split, _, name = column.partition("_")
    return f"{split}/{name}" if split in ("train", "val") and name else column


# --------------------------------------------------------------------------- summaries


def hparam_value(value: Any) -> Any:
    """A grid value as HParams takes it: bools and numbers as they are, anything else
    (layer sizes, names, None) as its label."""
    from .plots import value_label

    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value_label(value)


def _hparams_summary(tag: str, plugin_data) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data))])


def experiment_summary(params: dict[str, Any], metric_columns: Iterable[str]):
    """The HParams experiment: one hyperparameter per grid key, the metrics by their tags."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def data_type(value: Any) -> int:
        if isinstance(value, bool):
            return api_pb2.DATA_TYPE_BOOL
        return api_pb2.DATA_TYPE_FLOAT64 if isinstance(value, float) else api_pb2.DATA_TYPE_STRING

    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=data_type(hparam_value(v))) for k, v in params.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag_for(c))) for c in metric_columns])
    return _hparams_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def session_start_summary(params: dict[str, Any], start_time_s: float = 0.0):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time_s)
    for key, value in params.items():
        v = hparam_value(value)
        if isinstance(v, bool):
            start.hparams[key].bool_value = v
        elif isinstance(v, float):
            start.hparams[key].number_value = v
        else:
            start.hparams[key].string_value = v
    plugin_data = plugin_data_pb2.HParamsPluginData(session_start_info=start)
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, plugin_data)


def session_status(run_status: str) -> Optional[int]:
    """The HParams session status of a run status; None while the run may go on (running,
    or preempted: it resumes)."""
    from tensorboard.plugins.hparams import api_pb2

    return {"done": api_pb2.STATUS_SUCCESS, "failed": api_pb2.STATUS_FAILURE,
            "diverged": api_pb2.STATUS_FAILURE}.get(run_status)


def session_end_summary(status: int, end_time_s: float = 0.0):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=end_time_s)
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))


def scalars_summary(values: Iterable[tuple[str, float]]):
    """One summary of the finite values, tagged by ``tag_for`` of their columns."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag_for(c), simple_value=v) for c, v in values if math.isfinite(v)])


# --------------------------------------------------------------------------- a sweep, at collect time


def run_folder_names(runs, param_keys: list[str]) -> dict[str, str]:
    """run_id -> sub-folder named by its hyperparameters (``lr=0.001,hidden=64x64``); full
    dotted keys when short names clash, the run id when there is no grid or names repeat."""
    from .plots import value_label

    def name(run, short: bool) -> str:
        parts = [f"{k.split('.')[-1] if short else k}={value_label(run.params[k])}"
                 for k in param_keys if k in run.params]
        text = ",".join(parts)
        return "".join(ch if ch.isalnum() or ch in "=,.+-_" else "_" for ch in text)[:200]

    short_names = [k.split(".")[-1] for k in param_keys]
    short = len(set(short_names)) == len(short_names)
    names = {run.run_id: name(run, short) for run in runs}
    if not param_keys or len(set(names.values())) != len(names) or not all(names.values()):
        return {run.run_id: run.run_id for run in runs}
    return names


def write_sweep_events(data, folder: str | Path, metric: Optional[str] = None) -> list[Path]:
    """One sub-folder per run that has curves: its scalars by epoch and its HParams (with
    ``metric``, the one the sweep is ranked by, as the HParams metric)."""
    from .runs import read_timing

    require_tensorboard("--tensorboard")
    folder = Path(folder)
    names = run_folder_names(data.runs, data.param_keys)
    written = []
    for run in data.runs:
        curves = run.curves
        if curves is None or not len(curves.epochs):
            continue
        walls = _wall_times(run, curves.epochs, read_timing)
        path = folder / names[run.run_id] / EVENT_FILE
        atomic_write_bytes(path, _run_events(run, walls, [metric] if metric else []))
        written.append(path)
    return written


def _run_events(run, walls: list[float], metrics: list[str]) -> bytes:
    from tensorboard.compat.proto.event_pb2 import Event

    curves = run.curves
    columns = [c for c in curves.columns if c != "step"]
    events = [Event(wall_time=walls[0], step=0, file_version="brain.Event:2"),
              Event(wall_time=walls[0], step=0, summary=experiment_summary(run.params, metrics)),
              Event(wall_time=walls[0], step=0, summary=session_start_summary(run.params, walls[0]))]
    for i, epoch in enumerate(curves.epochs.tolist()):
        summary = scalars_summary((c, float(curves.values[i, curves.columns.index(c)])) for c in columns)
        if summary.value:
            events.append(Event(wall_time=walls[i], step=int(epoch), summary=summary))
    status = session_status(run.status)
    if status is not None:
        events.append(Event(wall_time=walls[-1], step=int(curves.epochs[-1]),
                            summary=session_end_summary(status, walls[-1])))
    return records(event.SerializeToString() for event in events)


def records(payloads: Iterable[bytes]) -> bytes:
    """The payloads framed as a TFRecord stream, by TensorBoard's record writer."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    buf = io.BytesIO()
    writer = RecordWriter(buf)
    for payload in payloads:
        writer.write(payload)
    return buf.getvalue()


def _wall_times(run, epochs: np.ndarray, read_timing) -> list[float]:
    """started_at + elapsed_s of timing.csv when both are known; else the epoch number, which
    keeps TensorBoard's relative time axis meaningful and the files reproducible."""
    started = run.state.started_at if run.state is not None else None
    timing = read_timing(run.run_dir) if isinstance(started, (int, float)) else None
    if timing is None:
        return [float(e) for e in epochs]
    elapsed = dict(zip(timing[0].tolist(), timing[1].tolist()))
    if not all(e in elapsed and np.isfinite(elapsed[e]) for e in epochs.tolist()):
        return [float(e) for e in epochs]
    return [float(started) + elapsed[e] for e in epochs.tolist()]
