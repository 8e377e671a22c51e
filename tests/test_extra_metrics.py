"""train.metrics: f1_macro from the summed confusion matrix, user metric functions, checks."""
import numpy as np
import pytest
import torch

from hpctrain.dist.backends import NoneBackend
from hpctrain.errors import ConfigError
from hpctrain.train.extra_metrics import ExtraMetrics, check_metrics, f1_macro, metric_keys
from hpctrain.train.losses import MetricSums

BACKEND = NoneBackend(device_preference="cpu")


def reference_f1_macro(y, p, classes):
    scores = []
    for c in range(classes):
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        scores.append(0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def test_f1_macro_and_confusion_of_a_multiclass_epoch_match_the_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    extra = ExtraMetrics(["f1_macro", "confusion"], "multiclass", 4)
    sums = MetricSums("multiclass", extra=extra)
    for lo in range(0, 300, 64):  # batches, as the trainer adds them
        logits = torch.nn.functional.one_hot(torch.as_tensor(p[lo:lo + 64]), 4).float()
        sums.add(logits, torch.as_tensor(y[lo:lo + 64]), torch.tensor(0.5), 64)
    out = sums.compute(BACKEND, "val")
    assert out["val_f1_macro"] == pytest.approx(reference_f1_macro(y, p, 4), abs=1e-12)
    expected = np.zeros((4, 4), dtype=np.int64)
    np.add.at(expected, (y, p), 1)
    assert (extra.confusion == expected).all()
    assert metric_keys(["f1_macro", "confusion", "m.x:bal"]) == ("f1_macro", "bal")


def test_a_class_never_seen_counts_zero():
    confusion = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert f1_macro(confusion) == pytest.approx(2 / 3)


def test_a_user_metric_function_gets_the_whole_split(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "import numpy as np\n"
        "def balanced(y_true, y_pred):\n"
        "    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = ExtraMetrics(["my_metrics:balanced"], "multiclass", 3)
    sums = MetricSums("multiclass", extra=extra)
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    p = torch.tensor([0, 0, 1, 1, 2, 0])
    sums.add(torch.nn.functional.one_hot(p, 3).float(), y, torch.tensor(0.1), 6)
    assert sums.compute(BACKEND, "val")["val_balanced"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


@pytest.mark.parametrize("names, task, message", [
    (["f1"], "multiclass", "'f1' is not a metric"),
    (["f1_macro"], "regression", "does not apply to task 'regression'"),
    (["nosuchmodule_xyz:f"], "binary", "train.metrics: 'nosuchmodule_xyz:f': cannot import"),
])
def test_bad_metric_names_are_named(names, task, message):
    with pytest.raises(ConfigError) as info:
        check_metrics(names, task)
    assert message in str(info.value)
