"""The verdict of ``yolosafe doctor``: likely causes, in order (the run's own findings first, then the processes on
the GPUs, then the environment), each with the exact command or flag that addresses it. The batch remedies are
computed with ``plan`` (half the per-GPU batch, the same effective batch), never with arithmetic of their own.
"""

from __future__ import annotations

import shlex

from yolosafe import gpus, oom
from yolosafe.gpus import nvml_index
from yolosafe.planning import trainplan as plan
from yolosafe.readers import report
from yolosafe.readers.doctor.diagnosis import Cause, Environment, GPUView, Machine, RunView
from yolosafe.readers.holders import ASK, PROVEN, Holder
from yolosafe.rundir.records import VAL_PHASES, Failure, Story, epoch_label


def story_plan(story: Story, batch: int | None = None) -> plan.TrainPlan | None:
    """The run's plan as ``plan.TrainPlan`` (with another total batch if given); None for an unreadable plan."""
    try:
        return plan.replan(story.plan, **({} if batch is None else {"batch": batch}))
    except (plan.PlanError, KeyError, TypeError, ValueError):
        return None


def _where(record: Failure, story: Story) -> str:
    gpu = nvml_index(story.plan_gpus, record.gpu)
    epoch = f" at {epoch_label(record.epoch, story.plan.get('epochs'))}" if record.epoch is not None else ""
    return f"{epoch}{f' on GPU {gpu}' if gpu is not None else ''}"


def _val_cause(ooms: list[Failure], story: Story) -> Cause | None:
    val = [f for f in ooms if f.phase in VAL_PHASES and f.val_batch]
    if not val:
        return None
    worst = min(val, key=lambda f: f.val_batch or 0)
    half = max((worst.val_batch or 1) // 2, 1)
    return Cause(f"an OOM in validation{_where(worst, story)} with val batch {worst.val_batch} per GPU: validation "
                 "is the peak (Ultralytics alone uses twice the train batch)", f"--val-batch {half}")


def _train_cause(ooms: list[Failure], story: Story) -> Cause | None:
    train = [f for f in ooms if f.phase not in VAL_PHASES and f.batch]
    base = story_plan(story)
    if not train or base is None:
        return None
    worst = min(train, key=lambda f: f.batch or 0)
    failed = story_plan(story, (worst.batch or 1) * base.world_size)
    smaller = failed.halved() if failed else None
    if smaller is None:
        return Cause(f"an OOM in training{_where(worst, story)} with 1 image per GPU", "a smaller --imgsz or model")
    return Cause(f"an OOM in training{_where(worst, story)} with {worst.batch} per GPU: half the per-GPU batch, the "
                 f"same effective batch (accumulation {failed.accumulate} -> {smaller.accumulate})",
                 f"--batch {smaller.batch} --effective-batch {smaller.effective_batch}")


def _fragmentation(ooms: list[Failure], story: Story) -> Cause | None:
    wasted = max(((f.figures or {}).get("reserved_unallocated_mib") or 0 for f in ooms), default=0)
    if wasted <= oom.FRAGMENTED_MIB:
        return None
    expandable = "expandable_segments:True" in (story.allocator or {}).get("PYTORCH_CUDA_ALLOC_CONF", "")
    if expandable:
        return Cause(f"{wasted:.0f} MiB was reserved by PyTorch but unallocated at the OOM (fragmentation), although "
                     "expandable_segments was on", "a smaller batch (above)")
    return Cause(f"{wasted:.0f} MiB was reserved by PyTorch but unallocated at the OOM (fragmentation)",
                 "--alloc-conf expandable_segments:True")


def run_causes(view: RunView | None) -> list[Cause]:
    if view is None:
        return []
    if view.story is None:
        return [Cause(f"the run cannot be read: {view.problem}", f"yolosafe doctor ANOTHER_RUN_DIR (or repair "
                                                                 f"{view.path})")]
    story = view.story
    damaged = [Cause(f"a run file cannot be read: {view.problem}", "the story alone is used; repair or remove "
                     "that file")] if view.problem else []
    ooms = [f for f in view.failures if f.oom]
    done = [a for a in story.attempts if a.outcome == "completed"]
    in_place = [f for f in ooms if f.recovered]
    if story.outcome == "completed" and in_place and len(in_place) == len(ooms):
        worked = min(int(f.extra.get("next_val_batch") or 1) for f in in_place)
        return [Cause(f"validation ran out of memory {len(in_place)} time(s) and was recovered in place (no relaunch): "
                      f"the smallest validation batch that worked was {worked} per GPU", f"--val-batch {worked}")]
    if story.outcome == "completed" and ooms and done and done[-1].batch:
        last = done[-1]
        nbs = last.nbs or story.plan.get("effective_batch")
        return [Cause(f"the run ran out of memory and recovered: attempt {last.attempt} completed with batch "
                      f"{last.batch} ({last.per_gpu_batch} per GPU), val batch {last.val_batch} per GPU",
                      f"--batch {last.batch} --effective-batch {nbs} --val-batch {last.val_batch}")]
    found = [_val_cause(ooms, story), _train_cause(ooms, story), _fragmentation(ooms, story)]
    slow = [Cause(line, "check that GPU's clocks and temperature (nvidia-smi -q -d PERFORMANCE,TEMPERATURE), "
                  "what else runs on it or on its CPU cores, and the disk the data is read from")
            for line in report.stragglers(view.path)]
    return [*damaged, *_hang_causes(view), *(c for c in found if c is not None), *_near_misses(view), *slow]


def _hang_causes(view: RunView) -> list[Cause]:
    """Each hang the watch found: where the stuck rank was, and where its stack is."""
    found = []
    epochs = view.story.plan.get("epochs") if view.story else None
    for hang in view.hangs:
        who = "the worker" if (hang.rank or 0) < 0 else f"rank {hang.rank}"
        how = "was stopped (SIGSTOP: a debugger, a job control stop, a scheduler's suspend)" if hang.stopped else \
            f"made no progress for {hang.stuck_s:g} s"
        frame = f", in {hang.frame}" if hang.frame else ""
        stack = next((s for s in hang.stacks or [] if s.endswith(f"rank-{max(hang.rank or 0, 0)}.txt")), None)
        found.append(Cause(f"attempt {hang.attempt} hung: {who} {how} in {hang.phase} at "
                           f"{epoch_label(hang.epoch, epochs)}{frame}",
                           f"read its stack: {stack or 'not written'} (every rank's beside it); if the pause was "
                           f"legitimate, a longer --hang-timeout (this one: {hang.timeout_s:g} s, "
                           f"{hang.timeout_source})"))
    return found


def _near_misses(view: RunView) -> list[Cause]:
    """The assigner's OOMs: the step went on, slowly, one image at a time; a smaller batch avoids the next."""
    found = []
    for miss in (view.memory or {}).get("near_misses", []):
        epoch = "" if miss.get("epoch") is None else f" in epoch {miss['epoch'] + 1}"
        rank = "" if miss.get("rank") in (None, -1) else f" on rank {miss['rank']}"
        found.append(Cause(f"the training step ran out of memory in the assigner at batch {miss.get('batch')}{epoch}"
                           f"{rank} and went on slowly (one image at a time; max_num_obj {miss.get('max_num_obj')})",
                           "a smaller --batch, or images with fewer objects"))
    return found


def _holder_cause(h: Holder, rest: str) -> Cause | None:
    what = f"pid {h.pid} ({(h.command or '?')[:60]}; {h.user or '?'}) holds {h.used_mib or 0:.0f} MiB on GPU {h.gpu}"
    if h.action == PROVEN:
        return Cause(f"{what}: {h.reason}", "yolosafe fix --yes")
    if h.action == ASK:
        return Cause(f"{what}: {h.reason}", f"kill -TERM {h.pid} once you know it, or yolosafe fix (asks first)")
    if h.advice and h.kind == "yolosafe run":
        return Cause(f"GPU {h.gpu} is in use by {h.reason}; it is not free", f"wait for it, or --gpus {rest}")
    if h.advice:
        return Cause(f"{what}: {h.reason}", h.advice)
    if (h.used_mib or 0) > gpus.BUSY_MIB:
        return Cause(f"{what}: {h.reason}", f"--gpus {rest} (leave that GPU out)")
    return None


def _rest(gpus: list[GPUView], busy: set[int], visible: list[int]) -> str:
    return ",".join(str(g.index) for g in gpus if g.index not in busy and g.index in visible) or "cpu"


def machine_causes(box: Machine, environ: Environment) -> list[Cause]:
    busy = {g.index for g in box.gpus if g.others_mib > gpus.BUSY_MIB}
    causes = []
    for gpu in box.gpus:
        rest = _rest(box.gpus, busy | {gpu.index}, environ.visible_gpus)
        causes += [c for c in (_holder_cause(h, rest) for h in gpu.holders) if c]
    if busy:
        named = ", ".join(map(str, sorted(busy)))
        causes.append(Cause(f"GPU(s) {named} hold more than {gpus.BUSY_MIB:.0f} MiB of other processes",
                            f"--gpus {_rest(box.gpus, busy, environ.visible_gpus)}"))
    return causes


def env_causes(environ: Environment, box: Machine) -> list[Cause]:
    causes = []
    for var in environ.allocator:
        if var.problem:
            causes.append(Cause(var.problem, f"unset {var.name}, or export a valid value"))
        elif var.note:
            causes.append(Cause(f"{var.name}: {var.note}", f"export {var.name}=... with True/False spelled so"))
    if box.gpus and environ.expandable_segments not in ("True", "invalid"):
        causes.append(Cause(f"expandable_segments is {environ.expandable_segments} in this shell: yolosafe train "
                            "sets it for its workers, your own scripts and notebooks fragment more",
                            "yolosafe fix (adds the export to your shell rc, merged with your settings)"))
    if box.gpus and environ.cuda_visible_devices is not None and not environ.visible_gpus:
        causes.append(Cause(f"CUDA_VISIBLE_DEVICES={environ.cuda_visible_devices!r} hides every GPU",
                            "unset CUDA_VISIBLE_DEVICES"))
    if environ.stray:
        names = " ".join(environ.stray)
        causes.append(Cause(f"{names} set in this shell: yolosafe train strips them, but a plain Ultralytics or "
                            "torch run would act as a DDP rank", f"unset {names}"))
    return causes


def verdict(box: Machine, environ: Environment, view: RunView | None) -> list[Cause]:
    try:
        from_run = run_causes(view)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a plan of the wrong shape: one line
        from_run = [Cause(f"the run's plan cannot be read ({type(exc).__name__}: {exc})", "yolosafe doctor RUN_DIR "
                          "of another run")]
    causes = [*from_run, *machine_causes(box, environ), *env_causes(environ, box)]
    run = f" --run {shlex.quote(view.path)}" if view else ""
    causes.append(Cause("to repair step by step (asks before each change)", f"yolosafe fix --config YOUR.yaml{run}"))
    return causes
