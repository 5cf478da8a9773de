"""The memory watch: NVML samples of every GPU of the run, taken by the supervisor while an attempt trains.

A run that dies "during validation at epoch 134" while nvidia-smi shows 39 GB free afterwards peaked on one GPU, in
one phase, for a moment. Only a sampler running throughout sees that moment, and it must live outside the training
process: the supervisor survives the OOM, sees other people's processes on the same GPUs, and never competes with
the ranks for GPU memory. It runs in a background thread at a fixed rate and writes one CSV row per GPU and sample
(``memory.csv``, long format, all attempts, with each sample's phase and epoch), splitting each GPU's memory into
the run's own processes (the worker and its DDP ranks, matched by the supervisor's process tree) and everybody
else's.

It follows ``events.jsonl`` as the ranks append to it, so a GPU crossing the warning threshold is reported with its
phase and epoch, once per GPU and phase. The phase of a sample is the phase started by the latest event of the rank
on that GPU (``other`` after an end event: setup, checkpoints); :mod:`yolosafe.readers.report` applies the same rule
to the
whole file afterwards.

It must never slow or break training: a tick costs one NVML memory query per GPU, one ``stat`` of the events file
and one buffered CSV row per GPU; an NVML error is reported once, a GPU that keeps failing is dropped, and the
thread ends cleanly when none is left or anything unexpected happens.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from yolosafe.gpus import GPUBackend, GPUReadError, MemoryReading
from yolosafe.rundir.events import event_gpus, phase_after
from yolosafe.rundir.layout import RunDir
from yolosafe.supervisor.attribution import UNKNOWN_SPLIT, Namespace

# phase and epoch (0-based) are the GPU's at the sample, from its rank's latest event: a CSV reader can group by them
COLUMNS = ("t", "attempt", "gpu", "total_mib", "used_mib", "ours_mib", "others_mib", "phase", "epoch")
MAX_FAILED_READS = 50  # consecutive, per GPU (5 s at 10 Hz): then the GPU is no longer sampled
FLUSH_S = 1.0  # a crash of the supervisor loses at most this much of memory.csv
PIDS_S = 0.5  # how often the run's pids are asked again (the process tree itself refreshes every 0.5 s)
JOIN_S = 5.0
RELEASE_WAIT_S = 60.0  # before a relaunch: at most this long for the previous attempt's processes to leave the GPUs
RELEASE_POLL_S = 0.2
RELEASE_SLACK_MIB = 256.0  # used memory within this of the attempt's floor counts as released (the driver's own)


class PhaseTracker:
    """The current phase and epoch of each GPU, read incrementally from ``events.jsonl`` (one ``stat`` per poll)."""

    def __init__(self, path: Path, plan_gpus: Sequence[int]) -> None:
        self.path = path
        self.plan_gpus = tuple(plan_gpus)
        self.attempt: int | None = None
        self._offset = 0
        self._rest = b""
        self._state: dict[int, tuple[str, int | None]] = {}

    def begin(self, attempt: int) -> None:
        """A new attempt: earlier attempts' phases no longer apply."""
        self.attempt, self._state = attempt, {}

    def poll(self) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if size <= self._offset:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        self._offset += len(data)
        *lines, self._rest = (self._rest + data).split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("attempt") == self.attempt:
                for gpu in event_gpus(event, self.plan_gpus):
                    self._state[gpu] = (phase_after(event), event.get("epoch"))

    def at(self, gpu: int) -> tuple[str, int | None]:
        return self._state.get(gpu, ("other", None))


def _read_one(backend: GPUBackend, gpu: int, slices: Mapping[int, str] | None) -> MemoryReading:
    """GPU ``gpu``'s reading: of its MIG device when ``slices`` names one (the slice the run trains on)."""
    mig = (slices or {}).get(gpu)
    return backend.read_memory(gpu) if mig is None else backend.read_memory(gpu, mig)


def wait_released(backend: GPUBackend, gpus: Sequence[int], pids: set[int], timeout: float = RELEASE_WAIT_S,
                  poll: float = RELEASE_POLL_S, slices: Mapping[int, str] | None = None) -> set[int]:
    """Wait until NVML lists none of ``pids`` on ``gpus`` (a killed rank's memory is freed by the driver after it
    exits, and its dataloader workers share its device handles); the pids still listed when ``timeout`` ran out,
    empty once released. A GPU that cannot be read is not waited for."""
    deadline = time.monotonic() + timeout
    while True:
        held: set[int] = set()
        for gpu in gpus:
            try:
                reading = _read_one(backend, gpu, slices)
            except GPUReadError:
                continue
            held |= {p.pid for p in reading.processes or () if p.pid in pids}
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(poll)


def wait_memory_released(backend: GPUBackend, floors: Mapping[int, float], slices: Mapping[int, str] | None = None,
                         timeout: float = RELEASE_WAIT_S, poll: float = RELEASE_POLL_S) -> dict[int, float]:
    """Wait until each GPU of ``floors`` uses no more than its floor (the least it used while the previous attempt
    ran: other processes' memory) plus :data:`RELEASE_SLACK_MIB`: the wait where NVML's pids cannot be matched to the
    attempt's processes (a container's, a driver that hides them). The MiB still above each floor when ``timeout``
    ran out, empty once released. A GPU that cannot be read is not waited for."""
    deadline = time.monotonic() + timeout
    slices = slices or {}
    while True:
        above: dict[int, float] = {}
        for gpu, floor in floors.items():
            try:
                reading = _read_one(backend, gpu, slices)
            except GPUReadError:
                continue
            if reading.used_mib is not None and reading.used_mib > floor + RELEASE_SLACK_MIB:
                above[gpu] = reading.used_mib - floor
        if not above or time.monotonic() >= deadline:
            return above
        time.sleep(poll)


def _gib(mib: float | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f}"


class MemoryWatch:
    """Samples the run's GPUs in a background thread, one attempt at a time (``start`` ... ``stop``).

    ``pids`` (given to ``start``) returns the live pids of the attempt's process tree. ``say`` prints one line for
    the user. ``open_backend`` is called at each start; the backend is closed at each stop. On the node of ``run`` in a
    multi-node run it samples that node's GPUs into the node's own CSV, following its own ranks' events. ``slices``:
    the MIG device (UUID) a GPU in MIG mode stands for, sampled instead of the whole GPU (its total is the slice's,
    its processes the slice's).
    """

    def __init__(self, run: RunDir | Path, gpus: Sequence[int], interval: float, warn_at: float,
                 open_backend: Callable[[], GPUBackend], say: Callable[[str], None],
                 slices: Mapping[int, str] | None = None) -> None:
        self.run = RunDir.of(run)  # a plain path: node 0's files
        self.gpus, self.interval, self.warn_at = tuple(gpus), interval, warn_at
        self.slices = dict(slices or {})
        self.floors: dict[int, float] = {}  # per GPU: the least used memory of the latest attempt (others' memory)
        self._open_backend, self._say = open_backend, say
        self.csv_path = self.run.memory_csv
        self.tracker = PhaseTracker(self.run.events, self.gpus)
        self.samples = 0
        self.read_errors = 0
        self.cpu_s = 0.0  # CPU seconds the sampler thread used, all attempts: its cost, measured where it runs
        self.warnings: list[dict[str, Any]] = []
        self.peak_others: dict[int, float] = {}  # per GPU: the most other processes held while we sampled
        self.stopped: str | None = None  # why sampling ended early, if it did
        self.namespace = Namespace()  # whether NVML's pids are this PID namespace's, decided once per run
        self.attempt_pids: set[int] = set()  # every process of the latest attempt's tree the sampler saw
        self._warned: set[tuple[int, str]] = set()
        self._reported_error = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, attempt: int, pids: Callable[[], set[int]]) -> None:
        self.tracker.begin(attempt)
        self.attempt_pids, self.floors = set(), {}
        self._stop.clear()
        self.stopped = None
        self._thread = threading.Thread(target=self._run, args=(attempt, pids), name="yolosafe-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread; the CSV is complete when this returns."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(JOIN_S)

    def wait_released(self, timeout: float = RELEASE_WAIT_S) -> None:
        """Before a relaunch: wait (bounded) until NVML lists none of the previous attempt's processes on the run's
        GPUs, so the new attempt does not start on memory that is still being freed; one line if they stay."""
        by_memory = not self.namespace.ours  # NVML never listed a pid of the run's: a container, hidden processes
        if not (self.floors if by_memory else self.attempt_pids):
            return
        try:
            backend = self._open_backend()
            try:
                if by_memory:
                    above = wait_memory_released(backend, self.floors, self.slices, timeout)
                else:
                    held = wait_released(backend, self.gpus, self.attempt_pids, timeout, slices=self.slices)
            finally:
                backend.close()
        except Exception as exc:  # like sampling: never stop the run over it
            self._say(f"memory watch: cannot check that the GPUs were released ({type(exc).__name__}: {exc})")
            return
        if by_memory and above:
            gib = ", ".join(f"GPU {gpu} {_gib(mib)} GiB" for gpu, mib in sorted(above.items()))
            self._say(f"the GPUs still hold more than before the previous attempt after {timeout:g} s ({gib}); "
                      "starting the next attempt anyway")
        elif not by_memory and held:
            self._say(f"the previous attempt's processes (pids {', '.join(map(str, sorted(held)))}) still hold GPU "
                      f"memory after {timeout:g} s; starting the next attempt anyway")

    def status(self) -> dict[str, Any]:
        """What yolosafe.json records about the watch."""
        return {"interval_s": self.interval, "warn_at": self.warn_at, "samples": self.samples,
                "read_errors": self.read_errors, "cpu_s": round(self.cpu_s, 3), "stopped": self.stopped,
                "warnings": self.warnings, **({"split": f"unknown: {UNKNOWN_SPLIT}"} if self.namespace.foreign else {})}

    def _run(self, attempt: int, pids: Callable[[], set[int]]) -> None:
        path = self.csv_path
        backend: GPUBackend | None = None
        try:
            backend = self._open_backend()
            with open(path, "a", newline="") as fh:
                writer = csv.writer(fh)
                if fh.tell() == 0:
                    writer.writerow(COLUMNS)
                self._loop(backend, writer, fh, attempt, pids)
        except Exception as exc:  # never let the watch take training down: say why, stop sampling
            self._end(f"memory watch stopped: {type(exc).__name__}: {exc}")
        finally:
            if backend is not None:
                backend.close()
            self.cpu_s += time.thread_time()

    def _loop(self, backend: GPUBackend, writer: Any, fh: IO[str], attempt: int,
              pids: Callable[[], set[int]]) -> None:
        active = {gpu: 0 for gpu in self.gpus}  # consecutive failed reads
        due = flushed = asked = time.monotonic()
        ours = pids()
        while not self._stop.is_set():
            self.tracker.poll()
            before = {gpu: self.tracker.at(gpu) for gpu in active}
            now = time.time()
            if time.monotonic() - asked >= PIDS_S:
                ours, asked = pids(), time.monotonic()
            self.attempt_pids |= ours
            readings = self._read(backend, active)
            self.tracker.poll()  # a phase's memory lies inside its events: in a phase before or after the read
            for reading in readings:
                in_phase = "other" not in (before[reading.index][0], self.tracker.at(reading.index)[0])
                mine, theirs = self._split(reading, ours, backend.name == "nvml" or in_phase)
                writer.writerow((f"{now:.3f}", attempt, reading.index, _round(reading.total_mib),
                                 _round(reading.used_mib), _round(mine), _round(theirs), *before[reading.index]))
                self.samples += 1
                self._check(reading, mine, theirs)
            if not active:
                self._end("memory watch stopped: no GPU could be read")
                return
            if time.monotonic() - flushed >= FLUSH_S:
                fh.flush()
                flushed = time.monotonic()
            due = max(due + self.interval, time.monotonic())  # fixed rate; after a stall, no burst of catch-up ticks
            self._stop.wait(due - time.monotonic())
        self.namespace.settle(self._say)

    def _read(self, backend: GPUBackend, active: dict[int, int]) -> list[MemoryReading]:
        """One reading of every GPU still sampled; a GPU that keeps failing is dropped from ``active``."""
        readings = []
        for gpu in list(active):
            try:
                reading = _read_one(backend, gpu, self.slices)
            except GPUReadError as exc:
                self._failed(exc)
                active[gpu] += 1
                if active[gpu] >= MAX_FAILED_READS:
                    del active[gpu]
                continue
            active[gpu] = 0
            readings.append(reading)
            if reading.used_mib is not None:
                self.floors[gpu] = min(self.floors.get(gpu, reading.used_mib), reading.used_mib)
        return readings

    def _split(self, reading: MemoryReading, ours: set[int], foreign: bool) -> tuple[float | None, float | None]:
        """This run's and others' MiB of one reading, as far as the PID namespace verdict allows.
        ``foreign``: whether absent pids may mean another namespace (real NVML: always; fake GPUs: while the GPU's
        rank is in a phase, when its memory is listed; outside, a layout's made-up pids are other users')."""
        mine, theirs = self.namespace.split(reading, ours, foreign, self._say)
        if theirs is not None:
            self.peak_others[reading.index] = max(self.peak_others.get(reading.index, 0.0), theirs)
        return mine, theirs

    def _failed(self, exc: GPUReadError) -> None:
        self.read_errors += 1
        if not self._reported_error:
            self._reported_error = True
            self._say(f"memory watch: NVML read failed ({exc}); sampling goes on, GPUs that keep failing are dropped")

    def _check(self, reading: MemoryReading, ours: float | None, others: float | None) -> None:
        """Warn once per GPU and phase when used memory reaches ``warn_at`` of the total."""
        if not reading.total_mib or reading.used_mib is None or reading.used_mib < self.warn_at * reading.total_mib:
            return
        phase, epoch = self.tracker.at(reading.index)
        if (reading.index, phase) in self._warned:
            return
        self._warned.add((reading.index, phase))
        share = reading.used_mib / reading.total_mib
        self.warnings.append({"t": round(time.time(), 3), "gpu": reading.index, "phase": phase, "epoch": epoch,
                              "used_mib": _round(reading.used_mib), "total_mib": _round(reading.total_mib),
                              "ours_mib": _round(ours), "others_mib": _round(others)})
        shown = "?" if epoch is None else epoch + 1  # 1-based, as Ultralytics shows epochs
        self._say(f"memory warning: GPU {reading.index} at {share:.0%} in {phase}, epoch {shown}: "
                  f"{_gib(reading.used_mib)} of {_gib(reading.total_mib)} GiB used "
                  f"(this run {_gib(ours)}, other processes {_gib(others)})")

    def _end(self, why: str) -> None:
        self.stopped = why
        self._say(why)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
