"""The supervisor: runs training in a child process, watches it, classifies how it ended, and retries after an OOM.

``yolosafe train`` never trains in its own process. Each attempt writes a run spec into the run directory and
starts ``python -m yolosafe.worker SPEC`` (one GPU, or the CPU) or yolosafe's rank launcher (several GPUs, one rank
each: :mod:`yolosafe.launch`) in its own session, with the allocator settings in its environment and stray
``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` removed. Its output is streamed to the terminal and to ``train.log``; Ctrl-C or
SIGTERM stops the whole process tree, every rank included (:mod:`yolosafe.proc`).

After an OOM (on any rank, in training or validation) the next attempt halves the batch, keeps ``nbs`` so the
effective batch is unchanged, and resumes from ``weights/last.pt``; the policy is :func:`next_step`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yolosafe import launch, oom, proc, rundir, terminal
from yolosafe.advice import advice
from yolosafe.gpus import nvml_index, open_backend
from yolosafe.plan import TrainPlan
from yolosafe.proc import AttemptResult, ProcessTree, run_child
from yolosafe.watch import MemoryWatch

if TYPE_CHECKING:
    from yolosafe.agree import MultiNode

EXIT_OK, EXIT_FAILED, EXIT_OOM_EXHAUSTED, EXIT_INTERRUPTED = 0, 1, 3, 130


def training_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The environment of an attempt's processes (worker, launcher, every rank)."""
    env = proc.child_env(base, extra)
    # CUDA numbers GPUs fastest first, NVML and nvidia-smi by PCI bus: make --gpus 2 the GPU that yolosafe gpus and
    # the memory watch call GPU 2.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    # Offline first: no update checks, analytics or error reporting from inside Ultralytics (set YOLO_OFFLINE=0 to
    # allow them). Weights the user names explicitly are still fetched as usual.
    env.setdefault("YOLO_OFFLINE", "1")
    return env


@dataclass
class Failure:
    """How an attempt ended, as the retry policy needs it."""

    kind: str  # completed | oom | failed | killed | interrupted
    phase: str | None = None  # train | val | final, for an OOM
    epoch: int | None = None
    rank: int | None = None
    gpu: int | None = None
    message: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    node: int | None = None  # multi-node: the node of the rank that failed (yolosafe.agree)
    node_gpus: tuple[int, ...] | None = None  # that node's plan GPUs, which ``gpu`` indexes (None: this node's)

    def nvml_gpu(self, plan: TrainPlan) -> int | None:
        """The failed rank's GPU in NVML numbering (of its own node)."""
        return nvml_index(self.node_gpus or plan.gpus, self.gpu)


TEARDOWN_SIGNALS = ("SIGTERM", "SIGINT")  # what torch.distributed.run sends the other ranks when one fails


def classify(result: AttemptResult, records: list[dict[str, Any]], log_tail: str) -> Failure:
    """An attempt's outcome from its exit status, the failure records its ranks wrote, and the end of its log.

    An OOM anywhere makes the attempt an OOM: the NCCL or timeout errors of the other ranks follow from it.
    """
    if result.interrupted:
        return Failure("interrupted", message=signal.Signals(result.interrupted).name)
    if result.exit_code == 0:
        return Failure("completed")
    ooms = [r for r in records if r.get("oom")]
    if ooms:
        first = min(ooms, key=lambda r: r.get("t", 0))
        return Failure("oom", first.get("phase") or "train", first.get("epoch"), first.get("rank"),
                       first.get("gpu"), first.get("message", ""), ooms)
    killed = [r for r in records if r.get("signal")]
    if killed:  # a rank killed by a signal (kill -9, the kernel's OOM killer): the others' errors follow from it
        # The launcher SIGTERMs the surviving ranks after the first death, and its timestamps are whole seconds:
        # a SIGTERM is the cause only when nothing else killed a rank.
        first = min(killed, key=lambda r: (r.get("signal") in TEARDOWN_SIGNALS, r.get("t") or 0))
        return Failure("killed", rank=first.get("rank"), gpu=first.get("gpu"), message=first.get("message", ""),
                       records=records)
    if oom.is_oom_text(log_tail):  # an OOM where no record could be written (e.g. while building the model)
        line = next((ln for ln in reversed(log_tail.splitlines()) if oom.is_oom_text(ln)), "")
        return Failure("oom", "train", message=line.strip(), records=[])
    if result.exit_code < 0:
        name = signal.Signals(-result.exit_code).name
        return Failure("killed", message=f"the worker was killed by {name}")
    first = records[0] if records else {}
    last_line = next((ln for ln in reversed(log_tail.splitlines()) if ln.strip()), "")
    message = first.get("message") or terminal.exception_line(log_tail) or last_line
    if first.get("error") and first.get("message"):
        message = f"{first['error']}: {message}"
    return Failure("failed", first.get("phase"), first.get("epoch"), first.get("rank"), message=terminal.plain(message),
                   records=records)


@dataclass(frozen=True)
class Step:
    """What the next attempt does: the plan it runs, and whether it only re-runs the final validation."""

    plan: TrainPlan
    final_val_only: bool
    change: str  # one line for the terminal and yolosafe.json


def next_step(plan: TrainPlan, failure: Failure, val_ooms: int, min_batch: int) -> Step | None:
    """The retry policy after an OOM; None when nothing smaller is allowed.

    - final validation (training finished): re-run only the validation, with half the validation batch;
    - validation: first halve the validation batch (training was fine), then the train batch if it happens again;
    - training: halve the per-GPU batch, keep ``nbs`` (accumulation doubles, the effective batch stays).
    """
    half_val = plan.val_batch // 2
    if failure.phase == "final":
        if half_val < 1:
            return None
        return Step(plan.with_val_batch(half_val), True, f"final validation again with val batch {half_val}")
    if failure.phase == "val" and val_ooms <= 1 and half_val >= 1:
        return Step(plan.with_val_batch(half_val), False, f"val batch {plan.val_batch} -> {half_val} per GPU")
    smaller = plan.halved(min_batch)
    if smaller is None:
        return None
    return Step(
        smaller,
        False,
        f"batch {plan.batch} -> {smaller.batch} ({plan.per_gpu_batch} -> {smaller.per_gpu_batch} per GPU), "
        f"accumulate {plan.accumulate} -> {smaller.accumulate}, effective batch {smaller.real_effective_batch}",
    )


def tail(path: Path, start: int, limit: int = 20000) -> str:
    """The text written to ``path`` since byte ``start`` (its last ``limit`` bytes)."""
    with open(path, "rb") as fh:
        fh.seek(max(start, fh.seek(0, os.SEEK_END) - limit))
        return fh.read().decode(errors="replace")


def launch_device(plan: TrainPlan, simulate_on_cpu: bool) -> tuple[str, str | None]:
    """Ultralytics' ``device`` and the worker's ``CUDA_VISIBLE_DEVICES``.

    The worker sees exactly the plan's GPUs, numbered 0..n-1 in the plan's order: torch's device i of every rank is
    then the plan's i-th GPU, which is how the events, failure records and memory report name NVML's GPU. With fake
    GPUs the worker trains on the CPU.
    """
    if simulate_on_cpu or not plan.gpus:
        return "cpu", None
    return ",".join(str(i) for i in range(len(plan.gpus))), plan.device


@dataclass
class RunOptions:
    """How the supervisor runs attempts (everything but the plan)."""

    env: dict[str, str]  # the child's environment: allocator settings in, stray DDP variables out
    max_retries: int = 3
    min_batch: int = 1
    simulate_on_cpu: bool = False  # fake GPUs: the plan is for GPUs, the worker trains on CPU
    watch_interval: float = 0.1  # seconds between NVML samples of the memory watch; 0 turns it off
    warn_at: float = 0.9  # used/total share of a GPU that prints a memory warning
    clear_before_val: bool = True  # gc + empty_cache on every rank right before validation
    multinode: MultiNode | None = None  # several machines: the other nodes (yolosafe.agree); None on one machine


def versions() -> dict[str, str | None]:
    """Package versions, read from metadata: no torch import in the supervisor."""
    from importlib import metadata

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in ("yolosafe", "torch", "torchvision", "ultralytics", "nvidia-ml-py"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


class Supervisor:
    """One run: attempts until training completes, fails for another reason, or OOM retries run out."""

    def __init__(self, run_dir: Path, options: RunOptions, story: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.options = options
        self.story = story
        self.story.setdefault("attempts", [])
        self.watch: MemoryWatch | None = None  # made at the first attempt, kept for the run (warn once per run)
        self.node = options.multinode.node if options.multinode else 0  # multi-node: this node's files carry it

    def save(self) -> None:
        rundir.write_json(self.run_dir / rundir.node_file(rundir.STORY, self.node), self.story)

    def resume_command(self) -> str:
        flags = self.options.multinode.resume_flags() if self.options.multinode else ""  # multi-node hook
        return f"yolosafe train --resume {self.run_dir}{flags}"

    def spec(self, plan: TrainPlan, attempt: int, resume: Path | None, final_val_only: bool) -> dict[str, Any]:
        kwargs = {
            **plan.train_kwargs(),
            "model": plan.model,
            "project": str(self.run_dir.parent),
            "name": self.run_dir.name,
            "exist_ok": True,  # the run dir is yolosafe's, made fresh by new_run_dir
        }
        kwargs["device"], visible = launch_device(plan, self.options.simulate_on_cpu)
        mode = "final_val" if final_val_only else "train"
        return {
            "attempt": attempt,
            "mode": mode,
            "world_size": plan.world_size if mode == "train" else 1,  # the final validation runs alone
            "node_rank": self.node,  # multi-node: where this node's ranks write their events
            "cpu_ranks": self.options.simulate_on_cpu,
            "run_dir": str(self.run_dir),
            "model": plan.model,
            "resume": str(resume) if resume else None,
            "val_batch": plan.val_batch,
            "clear_before_val": self.options.clear_before_val,
            "cuda_visible_devices": visible,
            "plan": plan.summary(),
            "train_kwargs": kwargs,
        }

    def command(self, spec: dict[str, Any], path: Path) -> list[str]:
        """The worker itself for one process; yolosafe's launcher (torch.distributed.run) for one rank per GPU."""
        if spec["world_size"] <= 1:
            return [sys.executable, "-m", "yolosafe.worker", str(path)]
        log_dir = rundir.ranks_log_dir(self.run_dir, spec["attempt"], self.node)
        ranks = launch.Launch(spec["world_size"], launch.free_port(), log_dir)
        if self.options.multinode:  # multi-node hook: this node's ranks, torchrun's static rendezvous at node 0
            ranks = self.options.multinode.launch(spec["attempt"], log_dir)
        return launch.command(sys.executable, ranks, path)

    def attempt(self, spec: dict[str, Any]) -> tuple[AttemptResult, Failure]:
        attempt = spec["attempt"]
        path = rundir.spec_path(self.run_dir, attempt, self.node)
        rundir.write_json(path, spec)
        cmd = self.command(spec, path)
        self.story["attempts"][-1]["command"] = cmd
        self.save()
        extra = {rundir.RUN_DIR_ENV: str(self.run_dir), rundir.SPEC_ENV: str(path)}
        if spec["cuda_visible_devices"]:
            extra["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
        env = training_env(self.options.env, extra)
        log_path = self.run_dir / rundir.node_file(rundir.LOG, self.node)
        multi = self.options.multinode
        with open(log_path, "ab") as log:
            start = log.tell()
            header = f"\n=== yolosafe attempt {attempt} ({spec['mode']}): {' '.join(cmd)}\n".encode()
            log.write(header)
            with self.memory_watch(spec) as on_start:
                if multi and not multi.runs_here(spec):  # multi-node hook: a final validation is node 0's alone
                    result = AttemptResult(0, 0.0)
                else:  # multi-node hook: also stop this node's ranks when another node's attempt failed
                    on_start = multi.watch(attempt, on_start) if multi else on_start
                    result = run_child(cmd, env, log, on_start=on_start,
                                       out=terminal.TracebackFilter(sys.stdout.buffer))
        if multi:  # multi-node hook: the outcome every node derives from every node's end record
            return result, multi.agree(attempt, result, tail(log_path, start))
        failure = classify(result, rundir.failure_records(self.run_dir, attempt), tail(log_path, start))
        return result, failure

    @contextlib.contextmanager
    def memory_watch(self, spec: dict[str, Any]) -> Iterator[Callable[[ProcessTree], None] | None]:
        """Sample the attempt's GPUs from the moment its worker starts (``run_child``'s ``on_start``, which hands
        over the process tree: the worker and its DDP ranks) until it has exited; yields None when the watch is off."""
        gpu_ids = spec["plan"]["gpus"]
        if not gpu_ids or self.options.watch_interval <= 0:
            yield None
            return
        if self.watch is None:
            self.watch = MemoryWatch(self.run_dir, gpu_ids, self.options.watch_interval, self.options.warn_at,
                                     lambda: open_backend(self.options.env), say, node=self.node)
        watch = self.watch
        try:
            yield lambda tree: watch.start(spec["attempt"], tree.pids)
        finally:
            watch.stop()
            self.story["memory_watch"] = watch.status()

    def run(self, plan: TrainPlan, resume: Path | None = None, final_val_only: bool = False) -> int:
        """Attempts until done; returns the exit status for ``yolosafe train``."""
        self.story["supervisor"] = proc.identity(os.getpid())  # lets a later reader tell a dead run from a live one
        multi = self.options.multinode
        try:
            missing = multi.start() if multi else None  # multi-node hook: every node joined (bounded wait)
            if missing:
                self.story["outcome"] = "failed"
                self.save()
                say(missing)
                return EXIT_FAILED
            return self._attempts(plan, resume, final_val_only)
        except KeyboardInterrupt:  # Ctrl-C between attempts (during one, run_child handles it)
            self.story["outcome"] = "interrupted"
            self.save()
            say(f"stopped; resume with: {self.resume_command()}")
            return EXIT_INTERRUPTED
        finally:
            if multi:  # multi-node hook: the other nodes stop waiting for this one
                multi.stop(self.story.get("outcome"))

    def _attempts(self, plan: TrainPlan, resume: Path | None, final_val_only: bool) -> int:
        retries, val_ooms = 0, 0
        while True:
            attempt = len(self.story["attempts"]) + 1
            if resume is not None:
                resume = self.keep_checkpoint(resume, attempt)
            spec = self.spec(plan, attempt, resume, final_val_only)
            worker_file = rundir.worker_path(self.run_dir, attempt)
            entry = new_entry(plan, spec, resume)
            self.story["attempts"].append(entry)
            self.story["outcome"] = "running"
            self.save()
            result, failure = self.attempt(spec)
            observed = rundir.read_json(worker_file) if worker_file.is_file() else {}
            if observed.get("torch_cuda"):
                self.story.setdefault("versions", {})["torch_cuda"] = observed["torch_cuda"]
            entry.update(
                duration_s=round(result.duration_s, 2),
                exit_code=result.exit_code,
                outcome=failure.kind,
                reason=failure.message[:500],
                phase=failure.phase,
                epoch=failure.epoch,
                rank=failure.rank,
                gpu=failure.nvml_gpu(plan),
                node=failure.node,
                resumed_from_epoch=observed.get("resumed_from_epoch"),
            )
            self.story["outcome"] = failure.kind
            self._record_results()
            self.save()
            ended = self._ended(failure, plan)
            if ended is not None:
                return ended
            say(f"OOM in {failure.phase} at {epoch_text(failure.epoch, plan.epochs)}{where_gpu(plan, failure)} "
                f"(batch {plan.per_gpu_batch}/GPU, val batch {plan.val_batch}/GPU)")
            val_ooms += failure.phase == "val"
            allowed = retries < self.options.max_retries
            step = next_step(plan, failure, val_ooms, self.options.min_batch) if allowed else None
            if step is None:
                self.story["outcome"] = "oom_exhausted"
                self.save()
                say(f"giving up after {retries} retr{'y' if retries == 1 else 'ies'}; next steps:")
                for tip in advice(failure, plan, self.others_mib(), self.options.min_batch if allowed else None):
                    say(f"  - {tip}")
                return EXIT_OOM_EXHAUSTED
            retries += 1
            plan, final_val_only = step.plan, step.final_val_only
            last = self.run_dir / "weights" / "last.pt"
            resume = last if last.is_file() and not final_val_only else None
            entry["next"] = step.change
            self.save()
            how = "final validation only" if final_val_only else (f"resuming from {last}" if resume else "from scratch")
            say(f"retry {retries}/{self.options.max_retries}: {step.change}; {how}")

    def _ended(self, failure: Failure, plan: TrainPlan) -> int | None:
        """The exit status of an attempt that ends the run (anything but an OOM), said in one line; None for an OOM."""
        if failure.kind == "completed":
            return EXIT_OK
        if failure.kind == "interrupted":
            say(f"stopped by {failure.message}; resume with: {self.resume_command()}")
            return EXIT_INTERRUPTED
        if failure.kind == "killed":
            gpu = failure.nvml_gpu(plan)
            on_gpu = f" on GPU {gpu}" if gpu is not None else ""
            on_gpu += f" of node {failure.node}" if failure.node is not None else ""
            say(f"{failure.message}{on_gpu} (the kernel's OOM killer if host RAM ran out, or kill -9); "
                f"resume with: {self.resume_command()}")
            return EXIT_FAILED
        if failure.kind == "failed":
            where = f" in {failure.phase} at {epoch_text(failure.epoch, plan.epochs)}" if failure.phase else ""
            where += where_gpu(plan, failure)
            say(f"training failed{where}, not an OOM, not retried: {failure.message or 'no message'} "
                f"(traceback: {self.run_dir / rundir.node_file(rundir.LOG, self.node)})")
            return EXIT_FAILED
        return None

    def others_mib(self) -> dict[int, float]:
        """The most memory other processes (a stale kernel, a colleague) held on each GPU of the run: at launch, and
        while the memory watch sampled."""
        found = {g["index"]: sum(p["used_mib"] or 0 for p in g["processes"]) for g in self.story.get("gpus", [])}
        for gpu, mib in (self.watch.peak_others if self.watch else {}).items():
            found[gpu] = max(found.get(gpu, 0.0), mib)
        return found

    def keep_checkpoint(self, last: Path, attempt: int) -> Path:
        """A copy of the checkpoint an attempt resumes from: Ultralytics overwrites last.pt at every epoch. Written
        beside it and renamed, so a rank never reads half of it; on several nodes by node 0 only (its ranks start,
        and so every node's ranks start, only after it is there)."""
        kept = last.with_name(f"last-before-attempt{attempt}.pt")
        if self.node == 0:  # multi-node hook: one writer
            partial = kept.with_name(f".{kept.name}.partial")
            shutil.copy2(last, partial)
            partial.replace(kept)
        return kept

    def _record_results(self) -> None:
        weights = self.run_dir / "weights"
        found = {name: weights / f"{name}.pt" for name in ("last", "best")}
        self.story["weights"] = {name: str(path) for name, path in found.items() if path.is_file()}
        metrics = self.run_dir / rundir.FINAL_METRICS
        if metrics.is_file():
            self.story["final_metrics"] = rundir.read_json(metrics)


def new_entry(plan: TrainPlan, spec: dict[str, Any], resume: Path | None) -> dict[str, Any]:
    """An attempt's record in ``yolosafe.json`` as it starts; its outcome is added when it ends."""
    return {
        "attempt": spec["attempt"],
        "mode": spec["mode"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "batch": plan.batch,
        "per_gpu_batch": plan.per_gpu_batch,
        "val_batch": plan.val_batch,
        "nbs": plan.effective_batch,
        "accumulate": plan.accumulate,
        "resumed_from": str(resume) if resume else None,
    }


def epoch_text(epoch: int | None, epochs: int) -> str:
    """An epoch as Ultralytics shows it: 1-based, "epoch 2/3"."""
    return "an unknown epoch" if epoch is None else f"epoch {epoch + 1}/{epochs}"


def where_gpu(plan: TrainPlan, failure: Failure) -> str:
    """" on rank 1, GPU 3" (NVML numbering), as far as the failure records tell; " on node 1, rank 2, GPU 0" over
    several nodes."""
    parts = [] if failure.node is None else [f"node {failure.node}"]
    parts += [] if failure.rank in (None, -1) else [f"rank {failure.rank}"]
    gpu = failure.nvml_gpu(plan)
    if gpu is not None:
        parts.append(f"GPU {gpu}")
    return f" on {', '.join(parts)}" if parts else ""


def say(message: str) -> None:
    print(f"yolosafe: {message}", file=sys.stderr, flush=True)
