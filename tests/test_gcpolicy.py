"""gcpolicy: a run's start makes no full collections of the import-time heap, and full
collections resume, with that heap frozen, once the run's parts are built."""
from __future__ import annotations

import gc
import json
import subprocess
import textwrap

from conftest import PYTHON, REPO
from hpctrain import gcpolicy


def test_settle_freezes_the_heap_and_restores_the_thresholds():
    before = gc.get_threshold()
    try:
        gcpolicy.defer_full_collections()
        gcpolicy.defer_full_collections()  # a second call keeps the thresholds saved by the first
        assert gcpolicy.deferred() and gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**6
        gcpolicy.settle()
        assert not gcpolicy.deferred() and gc.get_threshold() == before
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        gcpolicy.settle()  # nothing deferred: nothing done
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_hpctrain_run_starts_without_full_collections_and_resumes_them_for_training(tmp_path):
    (tmp_path / "c.yaml").write_text(textwrap.dedent(f"""
        name: gc
        data: {{path: {tmp_path / 'data'}, task: binary, batch_size: 64, synth: {{rows: 600, features: 4, shards: 1}}}}
        model: {{hidden: [8]}}
        train: {{epochs: 2}}
    """))
    probe = textwrap.dedent(f"""
        import gc, json, sys
        from hpctrain import gcpolicy  # imports nothing heavy: torch comes with the run
        settled = {{}}
        full = []  # for each full collection: whether it came before the runner settled
        gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2
                            and full.append(not settled))
        settle = gcpolicy.settle
        def watched():
            if gcpolicy.deferred() and not settled:
                settled.update(torch_loaded="torch" in sys.modules, frozen_before=gc.get_freeze_count())
            settle()
            settled.setdefault("frozen", gc.get_freeze_count())
        gcpolicy.settle = watched
        from hpctrain.cli import main
        code = main(["run", {str(tmp_path / 'c.yaml')!r}, "--sweep-dir", {str(tmp_path / 'sweep')!r}])
        print("PROBE " + json.dumps(dict(settled, code=code, full=full, deferred=gcpolicy.deferred(),
                                         thresholds=gc.get_threshold())))
    """)
    out = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("PROBE "))
    seen = json.loads(line[len("PROBE "):])
    assert seen["code"] == 0
    assert seen["torch_loaded"] and seen["frozen_before"] == 0  # the heavy imports came in the deferred start
    assert True not in seen["full"]  # no full collection before the run's parts were built
    assert seen["frozen"] > 10_000  # the import-time heap, frozen out of later collections
    assert not seen["deferred"] and seen["thresholds"][2] < 1000  # full collections resumed for training
