"""search: sampled points beside the grid: stable, validated, listed by --dry-run."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hpctrain.errors import ConfigError
from hpctrain.sweep import expand

ROOT = Path(__file__).resolve().parent.parent
BASE = {"name": "s", "data": {"path": "data/x", "task": "binary"}}


def points(search, grid=None):
    return [s.params for s in expand({**BASE, "grid": grid or {}, "search": search})]


def test_random_points_are_drawn_from_the_seed_alone_and_cross_the_grid():
    search = {"kind": "random", "samples": 5, "seed": 3, "optim.lr": {"loguniform": [1e-5, 1e-1]},
              "model.dropout": {"uniform": [0.0, 0.5]}, "train.epochs": {"int": [2, 4]},
              "optim.name": {"choice": ["adam", "sgd"]}}
    first = points(search, {"model.hidden": [[8], [16]]})
    assert first == points(search, {"model.hidden": [[8], [16]]})  # stable: same ids on resubmit
    assert len(first) == 10 and first[:5] == [dict(p, **{"model.hidden": [8]}) for p in first[:5]]
    assert [p["optim.lr"] for p in first[:5]] == [p["optim.lr"] for p in first[5:]]
    for p in first:
        assert 1e-5 <= p["optim.lr"] <= 1e-1 and 0.0 <= p["model.dropout"] <= 0.5
        assert p["train.epochs"] in (2, 3, 4) and p["optim.name"] in ("adam", "sgd")
        assert float(f"{p['optim.lr']:.6g}") == p["optim.lr"]
    assert points(dict(search, seed=4), {"model.hidden": [[8], [16]]}) != first


def test_log_uniform_draws_spread_over_the_decades():
    lrs = [p["optim.lr"] for p in points({"kind": "random", "samples": 400, "optim.lr": {"loguniform": [1e-5, 1e-1]}})]
    per_decade = [sum(10 ** (k - 5) <= v < 10 ** (k - 4) for v in lrs) for k in range(4)]
    assert min(per_decade) > 60, per_decade  # ~100 each; a uniform draw would put ~360 in the last


def test_kind_grid_makes_choices_grid_axes():
    got = points({"optim.lr": {"choice": [0.1, 0.01]}, "model.dropout": {"choice": [0.0, 0.2]}})
    assert got == [{"optim.lr": a, "model.dropout": b} for a in (0.1, 0.01) for b in (0.0, 0.2)]


@pytest.mark.parametrize("search, message", [
    ({"kind": "random", "samples": 3, "optim.lr": {"loguniform": [0, 1]}}, "loguniform: low 0 must be > 0"),
    ({"kind": "random", "samples": 3, "optim.lr": {"normal": [0, 1]}}, "expected one distribution"),
    ({"kind": "random", "samples": 0, "optim.lr": {"uniform": [0, 1]}}, "search.samples: 0"),
    ({"kind": "random", "samples": 2, "optim.lr": {"uniform": [1, 0]}}, "low 1 must be below high 0"),
    ({"optim.lr": {"uniform": [0, 1]}}, "needs search.kind: random"),
    ({"kind": "bayes", "optim.lr": {"choice": [1]}}, "search.kind: 'bayes'"),
    ({"kind": "random", "samples": 2, "optim.nope": {"uniform": [0, 1]}}, "optim.nope"),
])
def test_bad_search_sections_are_named(search, message):
    with pytest.raises(ConfigError, match=None) as info:
        points(search)
    assert message in str(info.value)


def test_a_key_in_grid_and_search_is_refused():
    with pytest.raises(ConfigError, match="both in grid and in search"):
        points({"kind": "random", "samples": 2, "optim.lr": {"uniform": [0.1, 1]}}, {"optim.lr": [0.1]})


def test_dry_run_lists_the_sampled_points(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(textwrap.dedent(f"""
        name: s
        data: {{path: {tmp_path / 'd'}, task: binary, synth: {{rows: 100, features: 3}}}}
        search: {{kind: random, samples: 4, seed: 7, optim.lr: {{loguniform: [1e-4, 1e-1]}}}}
    """))
    out = subprocess.run([sys.executable, "-m", "hpctrain", "submit", str(cfg), "--executor", "local", "--dry-run",
                          "--sweep-dir", str(tmp_path / "sw")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lrs = [s.params["optim.lr"] for s in expand({**BASE, "search": {"kind": "random", "samples": 4, "seed": 7,
                                                               "optim.lr": {"loguniform": [1e-4, 1e-1]}}})]
    listed = [line for line in out.stdout.splitlines() if line.startswith("# run ")]
    assert len(listed) == 4 and all(f'"optim.lr": {lr}' in line for lr, line in zip(lrs, listed))
