#!/usr/bin/env python3
"""Render jobs/*.sbatch from jobs/profiles.yaml through hpctrain's one script template.

    python scripts/make-jobs.py           write the scripts
    python scripts/make-jobs.py --check   exit 1 and name the scripts that differ
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from hpctrain.launch.sbatch import render_job_template

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def rendered() -> dict[Path, str]:
    profiles = yaml.safe_load((JOBS / "profiles.yaml").read_text(encoding="utf-8"))
    return {JOBS / p["file"]: render_job_template(p) for p in profiles}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args()
    stale = []
    for path, text in rendered().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            path.chmod(0o755)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/make-jobs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
