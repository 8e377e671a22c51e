"""scripts/bench/steadiness.py, run as run-all.sh runs it: its figures hang together and a
bad argument is refused with a message naming it."""
from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, REPO

SCRIPT = REPO / "scripts" / "bench" / "steadiness.py"


def test_steadiness_prints_and_writes_a_spread_of_each_kind_of_work(tmp_path):
    out = tmp_path / "steadiness.json"
    done = subprocess.run([PYTHON, str(SCRIPT), "--repeats", "3", "--json", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["repeats"] == 3
    for kind in ("compute", "memory", "python"):
        f = figures[kind]
        assert 0 < f["fastest_s"] <= f["median_s"] <= f["slowest_s"], f
        assert f["spread"] >= 1.0 and abs(f["spread"] - f["slowest_s"] / f["fastest_s"]) < 0.01, f
        assert f"{kind:8s} fastest" in done.stdout
    assert figures["worst_spread"] == max(figures[k]["spread"] for k in ("compute", "memory", "python"))
    assert 0.0 <= figures["steal_fraction"] <= 1.0
    assert f"worst spread {figures['worst_spread']:.2f}x" in done.stdout


def test_steadiness_refuses_fewer_than_two_repeats():
    done = subprocess.run([PYTHON, str(SCRIPT), "--repeats", "1"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 2
    assert "--repeats: 1; expected at least 2" in done.stderr
