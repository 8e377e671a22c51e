"""The submitit callable of a sweep, and the same element as a local process.

Both run :func:`hpctrain.launch.element.run_element` on every task of the element; signals,
checkpoints and the requeue decision live there. The Worker replaces submitit's own
signal handlers while it runs: those checkpoint from inside the handler and exit rank 0 at
once, which would leave the other ranks waiting in a collective. ``checkpoint()`` is still
there for submitit, for a signal that arrives before the run installs its flag.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Optional

from .. import exitcodes


@dataclass
class Worker:
    """Picklable callable of one sweep: ``Worker(sweep_dir, max_requeues)(index)``."""
    sweep_dir: str
    max_requeues: int = 3

    def __call__(self, index: int) -> dict:
        from ..gcpolicy import defer_full_collections

        defer_full_collections()  # until the runner has built the run's parts (gcpolicy.py)
        from ..runner import load_prepared_sweep, pick
        from .element import run_element

        sweep, specs = load_prepared_sweep(self.sweep_dir)
        spec = pick(specs, index, str(sweep.config_path))
        state = run_element(sweep, spec, max_requeues=self.max_requeues, log=_log)
        return {"index": index, "run_id": state.run_id, "status": state.status, "message": state.message}

    def checkpoint(self, index: int) -> Any:
        """submitit's hook: resubmit the same call; the run resumes from its own last.pt."""
        import submitit

        from .element import may_requeue

        if not may_requeue(self.max_requeues):
            return None  # submitit then records the element as not requeued
        return submitit.helpers.DelayedSubmission(Worker(self.sweep_dir, self.max_requeues), index)


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m hpctrain.launch.worker SWEEP_DIR INDEX``: one element as a local process."""
    from ..dist.backends import CollectiveError
    from ..errors import HpctrainError

    p = argparse.ArgumentParser(prog="python -m hpctrain.launch.worker")
    p.add_argument("sweep_dir")
    p.add_argument("index", type=int)
    p.add_argument("--max-requeues", type=int, default=0)
    args = p.parse_args(argv)
    try:
        result = Worker(args.sweep_dir, args.max_requeues)(args.index)
    except HpctrainError as e:
        print(f"hpctrain worker: error: {e}", file=sys.stderr)
        return exitcodes.USAGE
    except CollectiveError:
        return exitcodes.RANK_LOST
    except Exception:  # recorded as failed in state.json by the runner, with its traceback logged
        return exitcodes.FAILED
    return exitcodes.for_status(result["status"])


if __name__ == "__main__":
    sys.exit(main())
