"""The attempt loop: attempts until the training completes, fails for another reason, or the OOM retries run out.

It numbers the attempts, keeps the checkpoint each one resumes from, records each in ``yolosafe.json``, asks the
retry policy (:mod:`yolosafe.supervisor.policy`) for the next step and says what happens in one line per event. It
starts no
process itself: it is handed the function that runs one attempt (the supervisor's, which starts the worker or the
rank launcher and watches it), so its whole sequence of plans is unit-tested with a stub in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from yolosafe import bench
from yolosafe.exits import Exit
from yolosafe.planning.trainplan import TrainPlan
from yolosafe.proc import AttemptResult, stop_signals
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records, steps
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Attempt, Outcome, Story
from yolosafe.supervisor import terminal
from yolosafe.supervisor.advice import advice, space_hint
from yolosafe.supervisor.policy import AttemptEnd, epoch_text, next_step, where


@dataclass(frozen=True)
class Request:
    """What one attempt runs: its number, its plan, the checkpoint it resumes from, or only the final validation."""

    attempt: int
    plan: TrainPlan
    resume: Path | None
    final_val_only: bool


ChildRunner = Callable[[Request], tuple[AttemptResult, AttemptEnd]]  # runs one attempt to its end


@dataclass(frozen=True)
class Limits:
    max_retries: int = 3  # relaunches after an OOM
    min_batch: int = 1  # the per-GPU batch is never halved below this
    max_hang_restarts: int = 1  # relaunches after a hang (yolosafe.supervisor.hangwatch)


@dataclass
class Stops:
    """SIGINT, SIGTERM and SIGHUP between attempts (during one, the child runner has its own handler): a stop, one
    line and a resumable story, never a silent death. While the loop records how an attempt ended and what runs next
    (``held``), a stop waits until that record is saved."""

    held: bool = False
    received: list[int] = field(default_factory=list)

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        if not self.held:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handle) for s in stop_signals()}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def release(self) -> None:
        """The record is saved: a stop that came meanwhile takes effect now."""
        self.held = False
        if self.received:
            raise KeyboardInterrupt

    def by(self) -> str:
        """" by SIGTERM", or nothing when the stop came as Ctrl-C through Python itself."""
        return f" by {signal.Signals(self.received[0]).name}" if self.received else ""


class AttemptLoop:
    """One run's attempts. ``others_mib`` tells the advice how much memory other processes held on each GPU; the
    node of ``run`` is this machine's place in a multi-node run (its story and log carry it; node 0 keeps the
    checkpoints), whose ``resume_hint`` names the node options too."""

    def __init__(self, run: RunDir | Path, story: Story, run_child: ChildRunner, limits: Limits,
                 others_mib: Callable[[], dict[int, float]] = dict, say: Callable[[str], None] = terminal.say,
                 resume_hint: str | None = None) -> None:
        self.files = RunDir.of(run)  # the run directory, as this node names its files
        self.story = story
        self.run_child = run_child
        self.limits = limits
        self.others_mib = others_mib
        self.say = say
        self.resume_hint = resume_hint or f"yolosafe train --resume {self.files.path}"
        self.stops = Stops()
        self._failed_at: dict[int, tuple[float, int | None]] = {}  # attempt -> when it failed, at which iteration

    def save(self) -> None:
        records.save_story(self.files, self.story)

    def run(self, plan: TrainPlan, resume: Path | None = None, final_val_only: bool = False) -> Exit:
        """Attempts until done; returns the exit status for ``yolosafe train``."""
        try:
            with self.stops.installed():
                return self._loop(plan, resume, final_val_only)
        except KeyboardInterrupt:  # a stop between attempts (during one, the child runner handles it)
            self.stops.held = True  # a second signal now must not cut the record short
            for entry in self.story.attempts[-1:]:
                if entry.outcome in (None, Outcome.RUNNING):  # stopped before its child ran, or as it ended
                    entry.outcome = Outcome.INTERRUPTED
                    entry.reason = f"stopped{self.stops.by()} before the attempt ran"
            self.story.outcome = Outcome.INTERRUPTED
            self.save()
            self.say(f"stopped{self.stops.by()}; resume with: {self.resume_hint}")
            return self.story.outcome.exit_status

    def _loop(self, plan: TrainPlan, resume: Path | None, final_val_only: bool) -> Exit:
        retries, val_ooms, hangs = 0, 0, 0
        while True:
            number = len(self.story.attempts) + 1
            point = steps.resume_point(self.files, resume, plan.world_size, plan.per_gpu_batch)
            failed_at = self._failed_at.pop(number - 1, None)
            redone = steps.redone(self.files, number - 1, point, *(failed_at or (None, None))) if number > 1 else None
            if resume is not None:
                resume = keep_checkpoint(self.files, resume, number, writer=self.files.node == 0)
            request = Request(number, plan, resume, final_val_only)
            entry = self._start(request)
            entry.resumed_at, entry.redone = point, redone
            result, end = self.run_child(request)
            self.stops.held = True  # until what happens next is in the story
            self._finish(entry, request, result, end)
            ended = self._ended(end, plan)
            if ended is not None:
                return ended
            if end.outcome == Outcome.HUNG:
                if hangs >= self.limits.max_hang_restarts:
                    return self._hung_out(hangs)
                hangs += 1
                self._failed_at[number] = (time.time(), None)
                resume = self._relaunch(entry, hangs, final_val_only, plan)
                continue
            failing = next((r for r in end.records if r.rank == end.rank), None)
            iteration = getattr(failing, "iteration", None) if end.phase == "train" else None
            self._failed_at[number] = (getattr(failing, "t", None) or time.time(), iteration)  # the OOM's time
            self.say(f"OOM in {end.phase} at {epoch_text(end.epoch, plan.epochs)}{where(plan, end)} "
                     f"(batch {plan.per_gpu_batch}/GPU, val batch {plan.val_batch}/GPU)")
            val_ooms += end.phase == "val"
            allowed = retries < self.limits.max_retries
            step = next_step(plan, end, val_ooms, self.limits.min_batch) if allowed else None
            if step is None:
                return self._give_up(end, plan, retries, allowed)
            retries += 1
            plan, final_val_only = step.plan, step.final_val_only
            last = resume_checkpoint(self.files)
            resume = last if last.is_file() and not final_val_only else None
            entry.next = step.change
            entry.extra["next_plan"] = {"batch": plan.batch, "val_batch": plan.val_batch,
                                        "final_val_only": final_val_only}  # what a resume runs after a stop here
            self.save()
            how = self._how(last, resume, final_val_only, plan)
            self.say(f"retry {retries}/{self.limits.max_retries}: {step.change}; {how}")
            self.stops.release()

    def _relaunch(self, entry: Attempt, hangs: int, final_val_only: bool, plan: TrainPlan) -> Path | None:
        """After a hang: the same plan again, from the last checkpoint (the ranks were stopped, nothing is wrong with
        the plan); returns what the next attempt resumes from."""
        last = resume_checkpoint(self.files)
        resume = last if last.is_file() and not final_val_only else None
        entry.next = "relaunch after a hang"
        self.save()
        self.say(f"relaunch {hangs}/{self.limits.max_hang_restarts} after the hang; "
                 f"{self._how(last, resume, final_val_only, plan)}")
        self.stops.release()
        return resume

    def _how(self, last: Path, resume: Path | None, final_val_only: bool, plan: TrainPlan) -> str:
        """Where the next attempt starts: ``resuming from …/step.pt from epoch 2, iteration 4 of 6``."""
        if final_val_only:
            return "final validation only"
        if resume is None:
            return "from scratch"
        at = steps.words(steps.resume_point(self.files, resume, plan.world_size, plan.per_gpu_batch), plan.world_size)
        return f"resuming from {last}{' ' + at if at else ''}"

    def _hung_out(self, hangs: int) -> Exit:
        """A hang with no relaunch left: the run ends, resumable."""
        self.story.outcome = Outcome.HUNG
        self.save()
        self.say(f"giving up after {hangs} relaunch{'' if hangs == 1 else 'es'} after hangs (--max-hang-restarts "
                 f"{self.limits.max_hang_restarts}); the stacks are in "
                 f"{self.files.stack(len(self.story.attempts), 0).parent}; resume with: "
                 f"{self.resume_hint}")
        return self.story.outcome.exit_status

    def _start(self, request: Request) -> Attempt:
        """The attempt's record in ``yolosafe.json`` as it starts; the run says "running" until it ends."""
        plan = request.plan
        entry = Attempt.new(
            attempt=request.attempt,
            mode="final_val" if request.final_val_only else "train",
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            batch=plan.batch,
            per_gpu_batch=plan.per_gpu_batch,
            val_batch=plan.val_batch,
            nbs=plan.ultralytics_args()["nbs"],
            accumulate=plan.accumulate,
            resumed_from=str(request.resume) if request.resume else None,
        )
        self.story.attempts.append(entry)
        self.story.outcome = Outcome.RUNNING
        self.save()
        return entry

    def _finish(self, entry: Attempt, request: Request, result: AttemptResult, end: AttemptEnd) -> None:
        """How the attempt ended, what its worker saw, and the run's weights and metrics so far."""
        seen_file = self.files.worker(request.attempt)
        seen = rundir.read_json(seen_file) if seen_file.is_file() else {}
        if seen.get("torch_cuda"):
            self.story.versions = {**(self.story.versions or {}), "torch_cuda": seen["torch_cuda"]}
        entry.duration_s = round(result.duration_s, 2)
        entry.exit_code = result.exit_code
        entry.outcome = end.outcome
        entry.reason = end.message[:500]
        entry.phase, entry.epoch, entry.rank, entry.node = end.phase, end.epoch, end.rank, end.node
        entry.gpu = end.nvml_gpu(request.plan)
        entry.resumed_from_epoch = seen.get("resumed_from_epoch")
        self.story.outcome = end.outcome
        self._record_results()
        self.save()

    def _ended(self, end: AttemptEnd, plan: TrainPlan) -> Exit | None:
        """The exit status of an attempt that ends the run, said in one line; None for an end the loop acts on (an OOM,
        a hang: :attr:`Outcome.retried`)."""
        resume_hint = f"resume with: {self.resume_hint}"
        if end.outcome.retried:
            return None
        if end.outcome == Outcome.COMPLETED:
            return end.outcome.exit_status
        if end.outcome == Outcome.INTERRUPTED:
            self.say(f"stopped by {end.message}; {resume_hint}")
            return end.outcome.exit_status
        if end.outcome == Outcome.KILLED:
            gpu = end.nvml_gpu(plan)
            on_gpu = f" on GPU {gpu}" if gpu is not None else ""
            on_gpu += f" of node {end.node}" if end.node is not None else ""
            self.say(f"{end.message}{on_gpu} (the kernel's OOM killer if host RAM ran out, or kill -9); {resume_hint}")
            return end.outcome.exit_status
        if end.outcome == Outcome.FAILED:
            place = f" in {end.phase} at {epoch_text(end.epoch, plan.epochs)}" if end.phase else ""
            log = self.files.log
            full = "No space left on device" in end.message
            then = f"; {space_hint(self.files.weights)}, then {resume_hint}" if full else ""
            self.say(f"training failed{place}{where(plan, end)}, not an OOM, not retried: "
                     f"{end.message or 'no message'} (traceback: {log}){then}")
        return end.outcome.exit_status

    def _give_up(self, end: AttemptEnd, plan: TrainPlan, retries: int, allowed: bool) -> Exit:
        """No smaller step is allowed (retries or the minimum batch ran out): the next steps, fitted to the case."""
        self.story.outcome = Outcome.OOM_EXHAUSTED
        self.save()
        self.say(f"giving up after {retries} retr{'y' if retries == 1 else 'ies'}; next steps:")
        for tip in advice(end, plan, self.others_mib(), self.limits.min_batch if allowed else None):
            self.say(f"  - {tip}")
        return self.story.outcome.exit_status

    def _record_results(self) -> None:
        found = {"last": self.files.last_checkpoint, "best": self.files.best_checkpoint}
        self.story.weights = {name: str(path) for name, path in found.items() if path.is_file()}
        metrics = self.files.final_metrics
        if metrics.is_file():
            self.story.final_metrics = rundir.read_json(metrics)


UNVALIDATED = rundir.UNVALIDATED  # an epoch trained, not yet validated (yolosafe.training.valretry.UNVALIDATED)


def resume_checkpoint(run: RunDir | Path) -> Path:
    """What the next attempt resumes from: the epoch trained but not validated when a validation failed (rank 0
    keeps it only until that epoch's last.pt is written, so it is the newer), else the step checkpoint inside the
    epoch after last.pt's (removed once that epoch's last.pt is written), else ``last.pt``."""
    run = RunDir.of(run)
    for newer in (run.unvalidated, run.step_checkpoint):
        if newer.is_file():
            return newer
    return run.last_checkpoint


def keep_checkpoint(run: RunDir, last: Path, attempt: int, writer: bool = True) -> Path:
    """``last`` kept as the checkpoint an attempt resumes from: Ultralytics' saves replace last.pt at every epoch
    (yolosafe's are written beside and renamed: a new file), so a hard link keeps it without a byte copied or a byte
    of disk until then; a copy where the file system has no hard links. Made beside it and renamed, so a rank never
    reads half of it; over several nodes by node 0 alone (``writer``): every node's ranks start only once node 0's
    ranks have joined, after it is kept."""
    kept = run.kept_checkpoint(attempt)
    if writer:
        partial = kept.with_name(f".{kept.name}.partial")
        partial.unlink(missing_ok=True)
        try:
            try:
                if bench.bench_off("checkpoint"):  # Ultralytics' own saves write last.pt in place: never a link
                    raise OSError("saves in place")
                os.link(last, partial)
            except OSError:  # no hard links here (EPERM, EXDEV, ENOTSUP of some network and FAT file systems)
                shutil.copy2(last, partial)
            partial.replace(kept)
            partial.unlink(missing_ok=True)  # kept was already that file: rename leaves both names
        except BaseException:  # a stop or a full disk mid-copy: no half copy left behind
            partial.unlink(missing_ok=True)
            raise
    return kept
