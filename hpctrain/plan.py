"""What a submit of a sweep will do: which grid points run, and what happens to the runs
the sweep folder already holds.

``--dry-run`` prints the same plan the real submit carries out, so what it claims is what
happens. A sweep may evolve:

- grid values added (or never-started points removed): the new points join the sweep and
  finished runs are kept;
- ``train.epochs`` raised (``--extend-epochs N``): every run changes id (the id hashes the
  whole config), so each existing run folder is adopted under its new id, and a finished run
  continues from its last.pt, unless its schedule's length depends on the epochs (cosine,
  onecycle), it stopped early, or it reached train.max_steps; those are kept as they are and
  named;
- anything else (another model, a grid value taken away from a run that has results) makes
  a different sweep and is refused, naming the runs it would orphan.

A sweep is not changed while any of its runs is queued or running on Slurm: elements pick
their grid point by index, and new values can shift the indices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import LENGTH_DEPENDENT_SCHEDULES, ConfigError, base_dict, dump_yaml, read_raw
from .errors import HpctrainError
from .fsutil import atomic_write_text
from .runstate import FINAL_STATUSES, RunState, read_state
from .sweep import RunSpec, SweepDir, expand, lineage_key

RERUN_CHOICES = ("none", "failed", "diverged", "pruned", "all")


@dataclass
class Adoption:
    """An existing run folder that becomes grid point ``index`` under a new id."""
    old_id: str
    new_id: str
    index: int
    old_epochs: int
    new_epochs: int


@dataclass
class Plan:
    indices: list[int] = field(default_factory=list)            # grid points to run
    fresh: list[int] = field(default_factory=list)              # run from scratch (old folder kept aside)
    extended: list[int] = field(default_factory=list)           # finished runs continued to more epochs
    promoted: list[int] = field(default_factory=list)           # pruned runs continued (--rerun pruned)
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> indices
    added: list[int] = field(default_factory=list)              # points the sweep did not have
    adopted: list[Adoption] = field(default_factory=list)
    changes_sweep: bool = False                                 # sweep.yaml is rewritten

    def skip(self, reason: str, index: int) -> None:
        self.skipped.setdefault(reason, []).append(index)

    def describe(self) -> list[str]:
        """What the submit does to the sweep's existing runs, one line each (besides skips)."""
        lines = []
        if self.added:
            lines.append(f"adds {len(self.added)} grid point(s) to the sweep: {short(self.added)}")
        if self.adopted:
            a = self.adopted[0]
            lines.append(f"train.epochs {a.old_epochs} -> {a.new_epochs}: {len(self.adopted)} existing run(s) "
                         "keep their results under new ids")
        if self.promoted:
            lines.append(f"continues {len(self.promoted)} pruned run(s) from last.pt, promoted at the rung "
                         f"that stopped them: {short(self.promoted)}")
        if self.extended:
            lines.append(f"continues {len(self.extended)} finished run(s) from last.pt: {short(self.extended)}")
        return lines


def short(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:20]))
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 20 else "")


# --------------------------------------------------------------------------- a changed sweep


def _old_specs(sweep: SweepDir) -> Optional[list[RunSpec]]:
    if not sweep.config_path.exists():
        return None
    return expand(read_raw(sweep.config_path), str(sweep.config_path))


def evolve(sweep: SweepDir, raw: dict, specs: list[RunSpec], queued: Optional[set[str]], plan: Plan) -> None:
    """Fill in ``plan``'s additions and adoptions, or raise when the change is not allowed."""
    if not sweep.config_path.exists() or sweep.config_path.read_text(encoding="utf-8") == dump_yaml(raw):
        return
    old = _old_specs(sweep)
    on_disk = sweep.run_ids_on_disk()
    started = [s for s in old if s.run_id in on_disk]
    _refuse_while_queued(sweep, started, queued)
    new_ids = {s.run_id for s in specs}
    moved = [s for s in started if s.run_id not in new_ids]
    if moved:
        by_lineage = {lineage_key(s): s for s in specs}
        orphans = []
        for s in moved:
            target = by_lineage.get(lineage_key(s))
            if target is None:
                orphans.append(s)
            else:
                plan.adopted.append(Adoption(s.run_id, target.run_id, target.index,
                                             s.config.train.epochs, target.config.train.epochs))
        if orphans:
            raise ConfigError(_orphan_message(sweep, orphans))
    old_ids = {s.run_id for s in old} | {a.new_id for a in plan.adopted}
    plan.added = [s.index for s in specs if s.run_id not in old_ids and s.run_id not in on_disk]
    plan.changes_sweep = True


def _refuse_while_queued(sweep: SweepDir, started: list[RunSpec], queued: Optional[set[str]]) -> None:
    if not queued:
        return
    busy = []
    for spec in started:
        state = read_state(sweep.run_dir(spec.run_id))
        if state is not None and state.slurm_job_id in queued and state.status not in FINAL_STATUSES:
            busy.append(f"{spec.index} (job {state.slurm_job_id})")
    if busy:
        raise HpctrainError(f"{sweep.root}: the config changes the sweep while {len(busy)} of its run(s) are "
                            f"queued or running: {', '.join(busy[:10])}; elements find their grid point by "
                            "index, which the change can shift. Wait for them (hpctrain status) or scancel "
                            "them, then submit again")


def _orphan_message(sweep: SweepDir, orphans: list[RunSpec]) -> str:
    shown = "; ".join(f"{s.index}: {s.run_id}" for s in orphans[:5])
    return (f"{sweep.root} already holds a different sweep: {len(orphans)} run(s) with results there are "
            f"not points of this config ({shown}{', ...' if len(orphans) > 5 else ''}). Adding grid values "
            "and changing train.epochs evolve a sweep; other changes make a new one: choose another folder "
            "with --sweep-dir or another name with name=...")


def apply_evolution(sweep: SweepDir, specs: list[RunSpec], plan: Plan) -> None:
    """Move adopted run folders to their new ids (under the sweep's lock, before sweep.write)."""
    for a in plan.adopted:
        src, dest = sweep.run_dir(a.old_id), sweep.run_dir(a.new_id)
        if dest.exists():
            raise HpctrainError(f"{dest}: exists already; cannot adopt {src} as grid point {a.index}")
        src.rename(dest)
        spec = specs[a.index]
        atomic_write_text(dest / "config.yaml", dump_yaml(base_dict(spec.config)), durable=False)
        sweep.recorder(spec).adopt(spec.config.train.epochs)


def apply_promotions(sweep: SweepDir, specs: list[RunSpec], plan: Plan) -> None:
    from .prune import promote

    for index in plan.promoted:
        promote(sweep.root, specs[index].run_id)


# --------------------------------------------------------------------------- what to run


def make_plan(sweep: SweepDir, raw: dict, specs: list[RunSpec], *, rerun: str = "none",
              queued: Optional[set[str]] = None, only: Optional[list[int]] = None) -> Plan:
    """The whole plan of one submit; raises (before anything is written) when it is refused."""
    if rerun not in RERUN_CHOICES:
        raise HpctrainError(f"--rerun {rerun!r}: expected one of {', '.join(RERUN_CHOICES)}")
    chosen = _check_only(only, len(specs))
    plan = Plan()
    evolve(sweep, raw, specs, queued, plan)
    states = _states(sweep, specs, plan)
    for spec in specs:
        if chosen is not None and spec.index not in chosen:
            plan.skip("not in --only", spec.index)
            continue
        _place(plan, spec, states.get(spec.run_id), queued, "all" if chosen is not None and rerun == "none" else rerun)
    return plan


def _check_only(only: Optional[list[int]], size: int) -> Optional[set[int]]:
    if only is None:
        return None
    bad = [i for i in only if not 0 <= i < size]
    if bad:
        raise HpctrainError(f"--only {','.join(map(str, only))}: {short(bad)} out of range; the grid has "
                            f"{size} point(s), indices 0..{size - 1}")
    return set(only)


def _states(sweep: SweepDir, specs: list[RunSpec], plan: Plan) -> dict[str, RunState]:
    """Each started run's state, read once; an adopted run's under its new id."""
    on_disk = sweep.run_ids_on_disk()
    states = {s.run_id: read_state(sweep.run_dir(s.run_id)) for s in specs if s.run_id in on_disk}
    for a in plan.adopted:
        states[a.new_id] = read_state(sweep.run_dir(a.old_id))
    return {k: v for k, v in states.items() if v is not None}


def _place(plan: Plan, spec: RunSpec, state: Optional[RunState], queued: Optional[set[str]], rerun: str) -> None:
    status = state.status if state else "pending"
    job = state.slurm_job_id if state else None
    if queued is not None and job and job in queued and status in ("pending", "running", "preempted"):
        plan.skip(f"queued or running as job {job}", spec.index)
        return
    if status == "done" and rerun != "all":
        why = not_extendable(spec, state)
        if why is None:
            plan.extended.append(spec.index)
            plan.indices.append(spec.index)
        else:
            plan.skip(why, spec.index)
        return
    if status in FINAL_STATUSES:
        if rerun not in ("all", status):
            plan.skip(status, spec.index)
            return
        if status == "pruned" and rerun == "pruned":
            plan.promoted.append(spec.index)
        elif status != "failed":
            plan.fresh.append(spec.index)
    plan.indices.append(spec.index)


def not_extendable(spec: RunSpec, state: RunState) -> Optional[str]:
    """Why a done run is not continued (the skip reason), or None when it is continued."""
    epochs = spec.config.train.epochs
    if state.epoch >= epochs:
        return "done"
    schedule = spec.config.schedule.name
    if schedule in LENGTH_DEPENDENT_SCHEDULES:
        return (f"done with {state.epoch} epochs; not continued to {epochs}: its {schedule} schedule's "
                "length depends on train.epochs (--only or --rerun all starts it again)")
    if state.epoch < state.total_epochs:
        return f"done with {state.epoch} of {state.total_epochs} epochs (stopped early); not continued"
    if spec.config.train.max_steps is not None and state.step >= spec.config.train.max_steps:
        return f"done at train.max_steps={spec.config.train.max_steps}; not continued"
    return None


def set_aside(sweep: SweepDir, spec: RunSpec) -> Path:
    """Move a run's folder to ``replaced/`` so its re-run starts from scratch; nothing is deleted."""
    src = sweep.run_dir(spec.run_id)
    dest = sweep.root / "replaced" / f"{spec.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
        src.rename(dest)
    sweep.prepare_run(spec)
    return dest
