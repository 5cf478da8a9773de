"""``yolosafe train --resume RUN_DIR``: what a resume may change, and the plan it runs.

A run is resumed where its directory is now (moved or copied, it trains into that directory: the worker gives
Ultralytics this ``save_dir``, not the one inside the checkpoint). Ultralytics resumes with the checkpoint's own
arguments except a few it lets a resume change (``batch``, ``device``, ``imgsz``...); yolosafe passes ``nbs`` and the
validation batch itself. So a resume accepts the options that change how the same training is spread and retried
(GPUs, batches, retries, allocator, memory watch) and refuses, in one line, those that would make it another
training (model, data, epochs, image size, Ultralytics arguments, where the run goes).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from yolosafe import gpus
from yolosafe.planning import allocator, checkpoint, gpuselect, inputs, recovered, validate
from yolosafe.planning import trainplan as plan
from yolosafe.planning.trainoptions import TrainOptions, check_min_batch
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records, steps
from yolosafe.rundir.layout import RunDir

# Options a resume applies (and records); every other option given with --resume is refused.
APPLIED = ("gpus", "batch", "effective_batch", "val_batch", "max_retries", "min_batch", "alloc_conf",
           "watch_interval", "warn_at", "clear_before_val", "hang_timeout", "max_hang_restarts", "save_every")
REFUSED = MappingProxyType({"model": "--model", "data": "--data", "datasets_file": "--datasets", "imgsz": "--imgsz",
           "epochs": "--epochs", "config_file": "--config", "project": "--project", "name": "--name",
           "args": "Ultralytics key=value arguments", "memory_fraction": "--memory-fraction"})
RUN_OPTIONS = ("max_retries", "min_batch", "watch_interval", "warn_at", "clear_before_val", "hang_timeout",
               "max_hang_restarts", "save_every")  # kept in the story


@dataclass
class Resume:
    """Everything a resume needs: where, from what checkpoint, with which plan, environment and options."""

    run: RunDir  # the run's directory, as this node names its files
    last: Path | None  # None: stopped before its first checkpoint, so it trains from the start
    story: records.Story
    plan: plan.TrainPlan
    env: dict[str, str]
    options: TrainOptions  # the story's (TrainOptions.from_story), with the run options given over them
    simulated: bool
    lock_fd: int | None = None  # held for the life of this process (None for a dry run)
    gpus: list[dict[str, Any]] | None = None  # the plan's GPUs as this process sees them now (GPU.as_dict)
    final_val_only: bool = False  # every epoch trained: only the final validation is left
    notes: tuple[str, ...] = ()  # what the resume had to do otherwise than asked, said once the run resumes
    applied: dict[str, Any] = field(default_factory=dict)  # the options given that it applies, parsed

    @property
    def run_dir(self) -> Path:
        return self.run.path


def refused(given: dict[str, Any]) -> None:
    """Options that a resume cannot honour: one line naming them."""
    names = [flag for key, flag in REFUSED.items() if given.get(key) not in (None, (), [])]
    if names:
        raise validate.InputError(f"--resume continues the same training and cannot change {', '.join(names)}; "
                                  "start a new run for that (those it can change: --gpus, --batch, --effective-batch, "
                                  "--val-batch, --max-retries, --min-batch, --alloc-conf, --watch-interval, --warn-at)")


def read_story(run: RunDir) -> records.Story:
    """The node's own story; node R > 0 of a multi-node resume that has none yet (a run that grows onto more nodes)
    starts from node 0's, whose attempts are the run's."""
    if run.node and not run.story.is_file():
        run = run.on_node(0)
    if not run.story.is_file():
        raise validate.InputError(f"--resume {run.path}: not a yolosafe run directory (no {rundir.STORY})")
    try:
        return records.load_story(run)
    except records.RecordError as exc:  # "PATH: damaged, ...": the path is said once
        detail = str(exc).removeprefix(f"{run.story}: ")
        raise validate.InputError(f"--resume {run.path}: {rundir.STORY} is unreadable ({detail})") from None


def story_or_rebuilt(run: RunDir, dry_run: bool) -> tuple[records.Story, tuple[str, ...]]:
    """The story; when it is missing or damaged but ``weights/last.pt`` and ``args.yaml`` are there, one rebuilt
    from them (:mod:`yolosafe.planning.recovered`), with the line that says so."""
    try:
        return read_story(run), ()
    except validate.InputError as exc:
        if run.node or not recovered.can_recover(run):
            raise
        why = "missing" if not run.story_of_run.is_file() else "damaged"
        rebuilt = recovered.rebuild(run, why, keep_damaged=not dry_run)
        if rebuilt is None:
            raise validate.InputError(f"{exc}; {recovered.ARGS} cannot stand in for it") from None
        return rebuilt[0], (rebuilt[1],)


UNVALIDATED = rundir.UNVALIDATED  # an epoch trained, not yet validated (yolosafe.training.valretry.UNVALIDATED)


def _within(run: RunDir, path: Path) -> str:
    """A file of the run as its messages name it, relative to the run directory (``weights/last.pt``)."""
    return path.relative_to(run.path).as_posix()


def pending_validation(run: RunDir) -> Path | None:
    """The epoch trained but not validated when the run stopped (newer than last.pt: rank 0 removes it once that
    epoch's last.pt is written), the checkpoint the resume continues from; None when there is none."""
    pending = run.unvalidated
    if not pending.is_file():
        return None
    validate.check_checkpoint(pending, f"--resume {run.path}: {_within(run, pending)}")
    return pending


def pending_step(run: RunDir) -> Path | None:
    """The step checkpoint inside the epoch after last.pt's (rank 0 removes it once that epoch's last.pt is
    written), the checkpoint the resume continues from; None when there is none."""
    step = run.step_checkpoint
    if not step.is_file():
        return None
    validate.check_checkpoint(step, f"--resume {run.path}: {_within(run, step)}")
    return step


def never_saved(run: RunDir, story: records.Story) -> bool:
    """A run stopped before its first checkpoint: no weights at all, attempts that did not complete."""
    saved = run.weights.is_dir() and any(run.weights.glob("*.pt"))
    return not saved and bool(story.attempts) and story.outcome != records.Outcome.COMPLETED


def check_last(run: RunDir, story: records.Story) -> Path:
    """``weights/last.pt`` of a run not completed, readable; else one line naming the checkpoints that could stand in
    for it."""
    last, named = run.last_checkpoint, _within(run, run.last_checkpoint)
    others = sorted((p.name for p in run.checkpoints() if p.name != last.name),
                    key=lambda n: (n != run.best_checkpoint.name, n))
    instead = (f"; {', '.join(others)} {'is' if len(others) == 1 else 'are'} there: copy one to {named} "
               "to resume from it" if others else "; start a new run instead")
    if not last.is_file():
        raise validate.InputError(f"--resume {run.path}: no {named} to resume from{instead}")
    if story.outcome == records.Outcome.COMPLETED:
        raise validate.InputError(f"--resume {run.path}: this run already completed; start a new run instead")
    try:
        validate.check_checkpoint(last, f"--resume {run.path}: {named}")
    except validate.InputError as exc:
        raise validate.InputError(f"{exc}{instead}") from None
    return last


def prepare(where: RunDir | Path, given: dict[str, Any], dry_run: bool, nnodes: int = 1) -> Resume:
    """Check the run can be resumed here and now and build its plan; raises :class:`validate.InputError`.

    ``given`` holds the options the user gave. A real resume takes the run's lock first, so two resumes of one
    directory can never both start; a dry run only checks nobody holds it. Over several machines each node resumes
    its own part (the node of ``where``, of ``nnodes``: its story, its lock; a plain path: node 0).
    """
    refused(given)
    run = RunDir.of(where).resolve()
    run_dir = run.path
    if not run_dir.is_dir():
        raise validate.InputError(f"--resume {run_dir}: not a yolosafe run directory (no such directory)")
    inputs.writable_dir(run_dir, "--resume", "a resume writes its checkpoints and story there")
    story, notes = story_or_rebuilt(run, dry_run)
    lock_fd = None
    try:
        if dry_run:
            pid = run.holder()
            if pid is not None:
                raise rundir.RunLocked(run_dir, pid)
        else:
            lock_fd = run.lock()
    except rundir.RunLocked as exc:
        raise validate.InputError(f"--resume {run_dir}: still training (yolosafe pid {exc.pid}); "
                                  "wait for it or stop it first") from None
    if not notes and run.mark_if_orphaned(locked_here=lock_fd is not None):
        story = read_story(run)
    if never_saved(run, story):
        last, final_val_only = None, False
        notes = (*notes, "no checkpoint was saved before the run stopped: training again from the first epoch")
    else:
        last = pending_validation(run) or pending_step(run) or check_last(run, story)
        progress = checkpoint.progress(last) if last.name != UNVALIDATED else None  # its trainer validates first
        final_val_only = (progress is not None and progress.finished) or _next(story).get("final_val_only") is True
    options = TrainOptions.from_story(story).replace(**{k: given[k] for k in RUN_OPTIONS if given.get(k) is not None})
    options = options.replace(user_code=given.get("user_code") or last_user_code(run, story))
    keys = [key for key in APPLIED if given.get(key) is not None]
    applied = options.replace(**{key: given[key] for key in keys}, project=str(run_dir.parent),
                              name=run_dir.name)  # parsed as a new run's options are
    typed = applied.recorded(keys)
    p, simulated = _plan(story, typed, nnodes)
    if last is not None and _restarts_without_an_epoch(run, last, p):
        last = None
        notes = (*notes, f"the step checkpoint inside epoch 1 was written by another number of ranks than "
                         f"{p.world_size} and no epoch has ended yet: training again from the first epoch")
    check_min_batch(applied, p.per_gpu_batch)
    env = allocator.apply({**os.environ, **(story.allocator or {})}, typed.get("alloc_conf"))  # AllocConfError: usage
    if final_val_only:
        notes = (*notes, "every epoch is trained: only the final validation is left to run")
    return Resume(run, last, story, p, env, options, simulated, lock_fd, _gpu_records(p), final_val_only, notes,
                  typed)


def _restarts_without_an_epoch(run: RunDir, last: Path, p: plan.TrainPlan) -> bool:
    """Whether the step checkpoint resumed from was written by another number of ranks (its epoch restarts, from
    last.pt: :func:`yolosafe.rundir.steps.resume_point`) in the first epoch, before any last.pt."""
    point = steps.resume_point(run, last, p.world_size, p.per_gpu_batch)
    return bool(point and point.get("restart")) and not run.last_checkpoint.is_file()


def _gpu_records(p: plan.TrainPlan) -> list[dict[str, Any]] | None:
    """The plan's GPUs now (their UUIDs, a MIG device's own), which the next resume maps again; None without GPUs."""
    if not p.gpus:
        return None
    try:
        inventory = gpus.planning_inventory(gpus.read_inventory(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    except gpus.FakeGpusError:
        return None
    return [g.as_dict() for g in inventory.gpus if g.index in p.gpus] or None


def _next(story: records.Story) -> dict[str, Any]:
    """What the loop had decided to run next when the run was stopped between an OOM and the relaunch."""
    last = story.attempts[-1] if story.attempts else None
    planned = last.extra.get("next_plan") if last is not None and last.outcome == records.Outcome.OOM else None
    return planned if isinstance(planned, dict) else {}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _plan(story: records.Story, given: dict[str, Any], nnodes: int = 1) -> tuple[plan.TrainPlan, bool]:
    """The last attempt's plan, with the GPUs and batches the user gave instead."""
    summary = story.plan
    if not summary:
        raise validate.InputError(f"--resume: {rundir.STORY} has no plan; it is not a yolosafe run")
    last = story.attempts[-1] if story.attempts else records.Attempt(attempt=0)
    planned = _next(story)
    chosen = tuple(summary.get("gpus", ()))
    simulated = bool(story.simulated_on_cpu)
    if given.get("batch") == "auto":
        raise validate.InputError(f"--resume with --batch auto: a resume keeps the run's batch (the last attempt's "
                                  f"{last.batch or summary.get('batch')}); give a number, or leave --batch out")
    try:
        if given.get("gpus") is not None:
            inventory = gpus.planning_inventory(gpus.read_inventory(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            visible = gpus.visible_ids(inventory, os.environ.get("CUDA_VISIBLE_DEVICES"))
            chosen = gpuselect.parse_gpus(str(given["gpus"]), visible, inventory.problem)
            simulated = inventory.backend == "fake" and bool(chosen)
        elif chosen:
            chosen = map_gpus(story, gpus.read_inventory(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        p = plan.replan(
            summary, gpus=chosen, nnodes=nnodes,
            batch=_first(given.get("batch"), planned.get("batch"), last.batch, summary.get("batch")),
            effective_batch=_first(given.get("effective_batch"), summary.get("effective_batch")),
            val_batch=_first(given.get("val_batch"), planned.get("val_batch"), last.val_batch,
                             summary.get("val_batch")),
        )
    except (plan.PlanError, gpus.FakeGpusError, KeyError, TypeError) as exc:
        raise validate.InputError(f"--resume: {exc}") from None
    return p, simulated


def map_gpus(story: records.Story, inventory: gpus.Inventory, cuda_visible: str | None) -> tuple[int, ...]:
    """The run's GPUs (its plan's, in order) as this process sees them now: found by UUID among the GPUs
    ``CUDA_VISIBLE_DEVICES`` lets it use (a new allocation numbers them anew), by index where the run has no UUID;
    :class:`validate.InputError` when one of them is not there (another job's GPUs, or none)."""
    planned = story.plan_gpus
    uuids = {g.get("index"): g.get("uuid") for g in story.gpus or [] if isinstance(g, dict)}
    devices = gpus.visible_devices(gpus.planning_inventory(inventory, cuda_visible), cuda_visible)
    by_uuid = {d.uuid: d.index for d in devices if d.uuid}
    by_uuid.update({m.uuid: d.index for d in devices for m in d.mig_devices if m.uuid})
    found = [by_uuid.get(uuids[g]) if uuids.get(g) else (g if g in {d.index for d in devices} else None)
             for g in planned]
    if None in found or len(set(found)) != len(found):
        missing = [uuids.get(g) or f"GPU {g}" for g, f in zip(planned, found, strict=True) if f is None]
        where = "unset" if cuda_visible is None else repr(cuda_visible)
        raise validate.InputError(
            f"--resume: the run's GPUs are not all visible here ({', '.join(missing) or 'a GPU twice'}; "
            f"CUDA_VISIBLE_DEVICES is {where}); resume on GPUs this job may use with --gpus (yolosafe gpus lists "
            "them), or where CUDA_VISIBLE_DEVICES names the run's GPUs")
    return tuple(i for i in found if i is not None)


def last_user_code(run: RunDir, story: records.Story) -> dict[str, Any] | None:
    """The user's callbacks and trainer the run's last attempt had (its spec file holds them): a resume keeps them."""
    attempts = story.attempts or []
    last = attempts[-1] if attempts else None
    number = last.get("attempt") if isinstance(last, dict) else getattr(last, "attempt", None)
    if not isinstance(number, int):
        return None
    try:
        spec = rundir.read_json(run.spec(number))
    except (OSError, ValueError):
        return None
    code = spec.get("user_code") if isinstance(spec, dict) else None
    return code if isinstance(code, dict) else None


def record(r: Resume) -> None:
    """What this resume changed, where the run now is, and the options it runs with, in the story."""
    r.story.resumes = [*(r.story.resumes or []), {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(r.run_dir),
        "previous_run_dir": r.story.run_dir,
        "from": str(r.last) if r.last else None,
        "applied": r.applied,
    }]
    r.story.run_dir = str(r.run_dir)
    r.story.plan = r.plan.summary()
    r.story.simulated_on_cpu = r.simulated
    if r.gpus is not None:
        r.story.gpus = r.gpus
    r.story.allocator = {k: r.env[k] for k in allocator.ENV_VARS}
    for key, value in r.options.recorded(RUN_OPTIONS).items():
        setattr(r.story, key, value)
