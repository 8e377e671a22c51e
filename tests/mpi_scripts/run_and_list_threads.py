"""Run under `mpirun -np 2`: one real `hpctrain run`, then list the threads this rank still has.

A communication library's thread that is still alive when the interpreter finalises can
abort the process after a finished run (a Gloo worker that drops a tensor then needs the
GIL). Prints `RESULT {"rank": R, "exit": S, "threads": [...]}` per rank, the thread names
as Linux reports them, once `hpctrain run` has returned.

Usage: python run_and_list_threads.py CONFIG SWEEP_DIR [KEY=VALUE ...]
"""
import json
import sys

from hpctrain.cli import main as hpctrain_main
from hpctrain.dist import discover
from threads import thread_names  # noqa: E402  (this folder is the script's sys.path[0])


def main() -> int:
    config, sweep_dir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    status = hpctrain_main(["run", config, *overrides, "--index", "0", "--sweep-dir", sweep_dir])
    result = {"rank": discover().rank, "exit": status, "threads": thread_names()}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
