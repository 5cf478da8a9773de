"""The supervisor: runs each attempt of a run in a child process and watches it.

``yolosafe train`` never trains in its own process. Each attempt writes its run spec into the run directory and
starts ``python -m yolosafe.training.worker SPEC`` (one GPU, or the CPU) or yolosafe's rank launcher (several GPUs,
one rank
each: :mod:`yolosafe.supervisor.launchcmd`) in its own session, with the allocator settings in its environment and stray
``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` removed. Its output is streamed to the terminal and to ``train.log``; Ctrl-C or
SIGTERM stops the whole process tree, every rank included (:mod:`yolosafe.proc`); the memory watch samples its GPUs
(:mod:`yolosafe.supervisor.watch`). How the attempt ended is classified by :mod:`yolosafe.supervisor.policy`; what
runs next is decided by
the attempt loop (:mod:`yolosafe.supervisor.loop`), which this module hands the function that runs one attempt.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yolosafe import bench, proc
from yolosafe.exits import Exit
from yolosafe.gpus import FakeGpusError, mig_slices, open_backend, rank_visible_devices, read_inventory
from yolosafe.planning.options import DEFAULTS
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.planning.trainplan import TrainPlan
from yolosafe.proc import AttemptResult, ProcessTree, run_child
from yolosafe.rundir import files as rundir
from yolosafe.rundir import heartbeat, records, runspec
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Outcome, Story
from yolosafe.rundir.runspec import RunSpec
from yolosafe.supervisor import launchcmd as launch
from yolosafe.supervisor import terminal
from yolosafe.supervisor.hangwatch import HangWatch
from yolosafe.supervisor.loop import AttemptLoop, Limits, Request
from yolosafe.supervisor.onenode import Machines, OneMachine, OnStart
from yolosafe.supervisor.policy import AttemptEnd
from yolosafe.supervisor.watch import MemoryWatch

if TYPE_CHECKING:
    from yolosafe.supervisor.multinode.agree import MultiNode


def training_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The environment of an attempt's processes (worker, launcher, every rank)."""
    env = proc.child_env(base, extra)
    # CUDA numbers GPUs fastest first, NVML and nvidia-smi by PCI bus: make --gpus 2 the GPU that yolosafe gpus and
    # the memory watch call GPU 2. Always: an inherited FASTEST_FIRST would make CUDA's numbers other GPUs than NVML's.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    # Offline first: no update checks, analytics or error reporting from inside Ultralytics (set YOLO_OFFLINE=0 to
    # allow them). Weights the user names explicitly are still fetched as usual.
    return proc.offline_env(env)


def tail(path: Path, start: int, limit: int = 20000) -> str:
    """The text written to ``path`` since byte ``start`` (its last ``limit`` bytes)."""
    with open(path, "rb") as fh:
        fh.seek(max(start, fh.seek(0, os.SEEK_END) - limit))
        return fh.read().decode(errors="replace")


def launch_device(plan: TrainPlan, simulate_on_cpu: bool,
                  env: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """Ultralytics' ``device`` and the worker's ``CUDA_VISIBLE_DEVICES``.

    The worker sees exactly the plan's GPUs, numbered 0..n-1 in the plan's order: torch's device i of every rank is
    then the plan's i-th GPU, which is how the events, failure records and memory report name NVML's GPU. They are
    named by UUID (a MIG device's own), read from the GPUs of ``env`` (default: this process's environment, whose
    ``CUDA_VISIBLE_DEVICES`` says which MIG device a GPU stands for), so no numbering (the scheduler's, a
    container's, CUDA's order) can make them other GPUs; by index only where a UUID is unknown. With fake GPUs the
    worker trains on the CPU.
    """
    if simulate_on_cpu or not plan.gpus:
        return "cpu", None
    env = os.environ if env is None else env
    try:
        inventory = read_inventory(env)
    except FakeGpusError:
        inventory = None
    uuids = None if inventory is None else rank_visible_devices(inventory, plan.gpus, env.get("CUDA_VISIBLE_DEVICES"))
    return ",".join(str(i) for i in range(len(plan.gpus))), uuids or plan.device


def watched_slices(plan_gpus: tuple[int, ...], env: Mapping[str, str]) -> dict[int, str]:
    """The MIG device each plan GPU in MIG mode stands for (``CUDA_VISIBLE_DEVICES`` of ``env``), which the memory
    watch samples instead of the whole GPU; empty without MIG (or when the GPUs cannot be read: the watch says so)."""
    try:
        inventory = read_inventory(env)
    except FakeGpusError:
        return {}
    return mig_slices(inventory, plan_gpus, env.get("CUDA_VISIBLE_DEVICES"))


@dataclass(frozen=True)
class RunOptions:
    """How the supervisor runs attempts (everything but the plan). Its values come from the resolved options
    (:mod:`yolosafe.planning.options` holds their defaults)."""

    env: dict[str, str]  # the child's environment: allocator settings in, stray DDP variables out
    max_retries: int
    min_batch: int
    simulate_on_cpu: bool  # fake GPUs: the plan is for GPUs, the worker trains on CPU
    watch_interval: float  # seconds between NVML samples of the memory watch; 0 turns it off
    warn_at: float  # used/total share of a GPU that prints a memory warning
    clear_before_val: bool  # gc + empty_cache on every rank right before validation
    multinode: MultiNode | None = None  # several machines: the other nodes (yolosafe.supervisor.multinode.agree);
                                        # None on one machine
    save_every: str = DEFAULTS["save_every"]  # the step checkpoint inside the epoch (planning.saveevery)
    val_oom: str = DEFAULTS["val_oom"]  # in-place or relaunch (yolosafe.training.valretry)
    hang_timeout: float | None = DEFAULTS["hang_timeout"]  # None: learnt; 0: no hang watch
    max_hang_restarts: int = DEFAULTS["max_hang_restarts"]
    user_code: dict[str, Any] | None = None  # the user's callbacks and trainer (yolosafe.planning.usercode)

    @classmethod
    def of(cls, env: dict[str, str], options: TrainOptions, simulated: bool,
           multinode: MultiNode | None = None) -> RunOptions:
        return cls(env=env, max_retries=options.max_retries, min_batch=options.min_batch,
                   simulate_on_cpu=simulated, watch_interval=options.watch_interval, warn_at=options.warn_at,
                   clear_before_val=options.clear_before_val, multinode=multinode, val_oom=options.val_oom,
                   hang_timeout=options.hang_timeout, max_hang_restarts=options.max_hang_restarts,
                   user_code=options.user_code, save_every=str(options.save_every))


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
    """One run: each attempt's child process, its environment, output and memory watch."""

    def __init__(self, run: RunDir, options: RunOptions, story: Story) -> None:
        self.options = options
        self.story = story
        self.watch: MemoryWatch | None = None  # made at the first attempt, kept for the run (warn once per run)
        self.machines: Machines = options.multinode or OneMachine(run)
        self.files = run  # the run directory as this node names its files
        timeout = options.hang_timeout
        epochs = story.plan.get("epochs") if isinstance(story.plan.get("epochs"), int) else None
        self.hangs = None if timeout == 0 else HangWatch(self.files, timeout, terminal.say, epochs,
                                                         other_nodes=options.multinode is not None)  # for the run

    def run(self, plan: TrainPlan, resume: Path | None = None, final_val_only: bool = False) -> Exit:
        """Attempts until done (:class:`yolosafe.supervisor.loop.AttemptLoop`); returns the exit status."""
        self.story.supervisor = proc.identity(os.getpid())  # lets a later reader tell a dead run from a live one
        limits = Limits(self.options.max_retries, self.options.min_batch, self.options.max_hang_restarts)
        hint = f"yolosafe train --resume {self.files.path}{self.machines.resume_flags()}"
        loop = AttemptLoop(self.files, self.story, self.run_attempt, limits, self.others_mib, resume_hint=hint)
        try:
            missing = self.machines.start()  # multi-node: every node joined (bounded wait)
            if missing:
                self.story.outcome = Outcome.FAILED
                loop.save()
                terminal.say(missing)
                return Exit.FAILED
            return loop.run(plan, resume, final_val_only)
        finally:
            self.machines.stop(self.story.outcome)  # multi-node: the other nodes stop waiting for this one

    def spec(self, plan: TrainPlan, attempt: int, resume: Path | None, final_val_only: bool) -> RunSpec:
        kwargs = {
            **plan.train_kwargs(),
            "model": plan.model,
            "project": str(self.files.path.parent),
            "name": self.files.path.name,
            "exist_ok": True,  # the run dir is yolosafe's, made fresh by new_run_dir
        }
        kwargs["device"], visible = launch_device(plan, self.options.simulate_on_cpu, self.options.env)
        mode = runspec.FINAL_VAL if final_val_only else runspec.TRAIN
        return RunSpec(
            attempt=attempt,
            mode=mode,
            world_size=plan.world_size if mode == runspec.TRAIN else 1,  # the final validation runs alone
            fake_gpus=self.options.simulate_on_cpu,
            run_dir=str(self.files.path),
            node_rank=self.files.node,
            model=plan.model,
            resume=str(resume) if resume else None,
            val_batch=plan.val_batch,
            clear_before_val=self.options.clear_before_val,
            cuda_visible_devices=visible,
            plan=plan.summary(),
            train_kwargs=kwargs,
            val_oom=self.options.val_oom,
            save_every=self.options.save_every,
            user_code=self.options.user_code,
        )

    def command(self, spec: RunSpec, path: Path) -> list[str]:
        """The worker itself for one process; yolosafe's launcher (torch.distributed.run) for one rank per GPU of this
        node (over several nodes, torchrun's static rendezvous at node 0)."""
        log_dir = self.files.ranks_log_dir(spec.attempt)
        nodes, local = self.machines.launch_shape(spec)
        return launch.child_command(path, spec.world_size, local, log_dir, nodes, spec.attempt)

    def run_attempt(self, request: Request) -> tuple[AttemptResult, AttemptEnd]:
        """Write the attempt's run spec, run its child to the end under the memory watch, and classify the end."""
        if self.watch is not None:  # a relaunch: the previous attempt's processes off the GPUs first (bounded)
            self.watch.wait_released()
        spec = self.spec(request.plan, request.attempt, request.resume, request.final_val_only)
        path = spec.save()
        cmd = self.command(spec, path)
        self.story.attempts[-1].command = cmd
        records.save_story(self.files, self.story)
        extra = {rundir.RUN_DIR_ENV: str(self.files.path)}  # only a marker: see rundir.RUN_DIR_ENV
        if spec.cuda_visible_devices:
            extra["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
        env = training_env(self.options.env, extra)
        log_path = self.files.log
        with open(log_path, "ab") as log:
            start = log.tell()
            log.write(f"\n=== yolosafe attempt {spec.attempt} ({spec.mode}): {' '.join(cmd)}\n".encode())
            with self.memory_watch(spec) as on_start:
                if not self.machines.runs_here(spec):  # a final validation is node 0's alone
                    result = AttemptResult(0, 0.0)
                else:  # multi-node: also stop this node's ranks when another node's attempt failed
                    on_start = self.machines.watch(spec.attempt, on_start)
                    with self.hang_watch(spec, on_start) as on_start:
                        shown = self.terminal(spec)
                        try:
                            result = run_child(cmd, env, log, on_start=on_start, out=shown,
                                               preempt=lambda: preempt(self.files, spec))
                        finally:
                            with contextlib.suppress(OSError, ValueError):  # a closed terminal: run_child said so
                                terminal.end(shown)
        # multi-node: the outcome every node derives from every node's end record
        return result, self.machines.agree(spec.attempt, result, tail(log_path, start))

    def terminal(self, spec: RunSpec) -> terminal.TracebackFilter | terminal.RankStream:
        """What of the attempt's output the terminal (or the notebook cell) shows: the worker's without tracebacks;
        of several ranks, the first rank of this node's, as if it ran alone (the log gets everything)."""
        raw = proc.byte_stream(sys.stdout)
        shown = raw if bench.bench_off("filter") else terminal.TracebackFilter(raw)
        if spec.world_size <= 1:
            return shown
        _, local = self.machines.launch_shape(spec)  # ranks on this node
        return terminal.RankStream(shown, shown=self.files.node * local)

    @contextlib.contextmanager
    def memory_watch(self, spec: RunSpec) -> Iterator[Callable[[ProcessTree], None] | None]:
        """Sample the attempt's GPUs from the moment its worker starts (``run_child``'s ``on_start``, which hands
        over the process tree: the worker and its DDP ranks) until it has exited; yields None when the watch is off."""
        gpu_ids = spec.plan["gpus"]
        if not gpu_ids or self.options.watch_interval <= 0:
            yield None
            return
        if self.watch is None:
            self.watch = MemoryWatch(self.files, gpu_ids, self.options.watch_interval, self.options.warn_at,
                                     lambda: open_backend(self.options.env), terminal.say,
                                     watched_slices(tuple(gpu_ids), self.options.env))
        watch = self.watch
        try:
            yield lambda tree: watch.start(spec.attempt, tree.pids)
        finally:
            watch.stop()
            self.story.memory_watch = watch.status()

    @contextlib.contextmanager
    def hang_watch(self, spec: RunSpec, then: OnStart | None) -> Iterator[OnStart | None]:
        """Watch the ranks' heartbeats from the moment the child starts until it has exited (off: ``then``)."""
        watch = self.hangs
        if watch is None:
            yield then
            return

        def on_start(tree: ProcessTree) -> None:
            if then is not None:
                then(tree)
            watch.start(spec.attempt, tree)

        try:
            yield on_start
        finally:
            watch.stop()
            self.story.stragglers = list(watch.stragglers) or None

    def others_mib(self) -> dict[int, float]:
        """The most memory other processes (a stale kernel, a colleague) held on each GPU of the run: at launch, and
        while the memory watch sampled."""
        found = {g["index"]: sum(p["used_mib"] or 0 for p in g["processes"]) for g in self.story.gpus or []}
        for gpu, mib in (self.watch.peak_others if self.watch else {}).items():
            found[gpu] = max(found.get(gpu, 0.0), mib)
        return found


PREEMPT_GRACE_S = 30.0  # a preemption: the most the ranks get to write their step checkpoint before the stop


def preempt(files: RunDir, spec: RunSpec, grace_s: float = PREEMPT_GRACE_S) -> None:
    """A preemption (SIGTERM, SIGUSR1): ask the ranks for a step checkpoint at their next step boundary
    (:mod:`yolosafe.training.stepckpt`: rank 0 removes the request once written) and wait for it, at most
    ``grace_s``; then the attempt is stopped as any stop is, resumable from the newest checkpoint."""
    request = files.preempt_request
    if spec.mode != "train" or not in_an_epoch(files, spec.attempt):
        return  # setting up, validating, saving: no step boundary comes soon, the stop is at once
    rundir.write_json(request, {"t": time.time()})
    deadline = time.monotonic() + grace_s
    while request.exists() and time.monotonic() < deadline and in_an_epoch(files, spec.attempt):
        time.sleep(0.2)
    request.unlink(missing_ok=True)


def in_an_epoch(files: RunDir, attempt: int) -> bool:
    """Whether a rank of this node is in a training epoch (its heartbeat's state), where its next step boundary
    writes the step checkpoint a preemption asks for."""
    beats = (heartbeat.read(path) for path in files.heartbeats(attempt))
    return any(beat is not None and beat.state in ("train", "save") for beat in beats)

