"""The hang watch: a thread of the supervisor that reads every rank's heartbeat (:mod:`yolosafe.rundir.heartbeat`)
and finds a rank that makes no progress, long before a collective's own timeout (Ultralytics sets 3 hours for NCCL,
gloo 30 minutes; a lone stopped process has none).

Timeouts are learnt from the run itself (:class:`Timeouts`): per state a rank can be in (set-up, training steps,
validation batches, the checkpoint save, the wait for rank 0 after an epoch, the final validation), a safety factor
times the longest interval between two beats seen in that state so far (never under :data:`MIN_LEARNT_S`), and
before one was seen the state's floor. ``--hang-timeout S`` replaces the learnt values by S (the set-up keeps its
floor: it includes dataset caching, which beats nothing). The watch lives for the run, so a relaunch starts with
what the earlier attempts taught it.

A rank is overdue when its last beat is older than its state's timeout. A rank that waits for rank 0 after an epoch
(``sync``) while another rank is still within its own timeout is not a hang. Otherwise every rank's stack is written
(:mod:`yolosafe.supervisor.stacks`), the stuck rank is named (a stopped one first; else one that is not waiting in a
collective: the others wait for it), the hang is recorded (``hang-N.json``), and every process of the attempt is
killed: a hung rank may not answer SIGTERM. The attempt loop then relaunches from the last checkpoint
(``--max-hang-restarts``).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from yolosafe.proc import ProcessTree
from yolosafe.rundir import heartbeat as beats
from yolosafe.rundir import records
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Hang, Outcome, epoch_label
from yolosafe.supervisor import stacks, stragglers
from yolosafe.supervisor.policy import AttemptEnd

POLL_S = 1.0  # the sampling period: a hang is found within its timeout plus this
SAFETY_FACTOR = 10.0
MIN_LEARNT_S = 60.0  # a learnt timeout is never shorter (a GC pause, a log flush, a slow batch of a slow disk)
FLOORS = {"setup": 1800.0, "train": 600.0, "val": 600.0, "save": 600.0, "sync": 600.0, "final": 1800.0,
          "end": 600.0}
UNBEATEN = ("setup", "end")  # long stretches without beats (dataset caching; the plots): --hang-timeout keeps the floor
STEPS = ("train", "val", "final")  # the states whose beats count batches
WAITING = ("sync",)  # a rank in this state waits for another rank (rank 0's save) in a collective
DONE = "done"


@dataclass
class Timeouts:
    """The timeout of each state: ``override`` (--hang-timeout; None: learnt), else the safety factor times the
    longest interval seen in the state (at least :data:`MIN_LEARNT_S`), else the state's floor."""

    override: float | None = None
    factor: float = SAFETY_FACTOR
    longest: dict[str, float] = field(default_factory=dict)

    def learn(self, state: str, interval: float) -> None:
        if interval >= 0:
            self.longest[state] = max(self.longest.get(state, 0.0), interval)

    def of(self, state: str) -> tuple[float, str]:
        """(seconds, where it comes from: "--hang-timeout", "learnt" or "floor")."""
        floor = FLOORS.get(state, max(FLOORS.values()))
        learnt = max(MIN_LEARNT_S, self.factor * self.longest[state]) if state in self.longest else None
        if self.override is not None:
            if state in UNBEATEN:
                return max(self.override, learnt if learnt is not None else floor), "floor"
            return self.override, "--hang-timeout"
        return (learnt, "learnt") if learnt is not None else (floor, "floor")


@dataclass
class RankSeen:
    """One rank as the watch last read it."""

    beat: beats.Beat
    seen: float  # time.time() when this beat (its count n) was first read


def overdue(seen: Mapping[int, RankSeen], timeouts: Timeouts, now: float) -> list[int]:
    """The ranks whose last beat is older than their state's timeout, unless each of them only waits (``sync``)
    for a rank that is still within its own."""
    late = [r for r, s in seen.items() if s.beat.state != DONE and now - s.beat.t > timeouts.of(s.beat.state)[0]]
    if not late:
        return []
    waiting_only = all(seen[r].beat.state in WAITING for r in late)
    others_fine = any(r not in late and s.beat.state not in (DONE, *WAITING) for r, s in seen.items())
    return [] if waiting_only and others_fine else late


def culprit(seen: Mapping[int, RankSeen], late: list[int], found: Mapping[int, stacks.RankStack],
            stopped: set[int]) -> int:
    """The stuck rank: a stopped one; else a late one whose main thread is not waiting in a collective (the others
    wait for it); else any rank that is not; else the one whose last beat is the oldest."""
    def age(rank: int) -> float:
        return seen[rank].beat.t

    for group in (sorted(stopped), [r for r in late if r in found and not found[r].collective],
                  [r for r in seen if r in found and not found[r].collective and seen[r].beat.state != DONE]):
        if group:
            return min(group, key=age)
    return min(late or list(seen), key=age)


class HangWatch:
    """Watches one attempt at a time (``start`` ... ``stop``); ``found`` is the hang it found in the attempt, if any.
    ``say`` prints one line; ``epochs`` the run's, for the line. In a multi-node run (``other_nodes``), when every
    rank of this node only waits in a collective, the watch waits one more timeout for another node's watch to name
    its stuck rank (that node's end record then ends the attempt on every node) before it acts itself."""

    def __init__(self, run: RunDir, override: float | None, say: Callable[[str], None], epochs: int | None = None,
                 poll: float = POLL_S, other_nodes: bool = False) -> None:
        self.run, self.say, self.epochs, self.poll = run, say, epochs, poll
        self.other_nodes = other_nodes  # a multi-node run: ranks here that only wait may wait for another node
        self.timeouts = Timeouts(override)
        self.found: Hang | None = None
        self.stragglers: list[dict[str, Any]] = []  # every straggler named in the run (once per rank)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, attempt: int, tree: ProcessTree) -> None:
        self.found = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(attempt, tree), name="yolosafe-hangs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(stacks.DUMP_WAIT_S + stacks.PYSPY_TIMEOUT_S + 5)

    def _run(self, attempt: int, tree: ProcessTree) -> None:
        try:
            self._loop(attempt, tree)
        except Exception as exc:  # never let the watch take training down: say why, stop watching
            self.say(f"hang watch stopped: {type(exc).__name__}: {exc}")

    def _loop(self, attempt: int, tree: ProcessTree) -> None:
        seen: dict[int, RankSeen] = {}
        deferred: float | None = None  # multi-node: until when this node waits for another node's verdict
        compare = stragglers.Stragglers()
        while not self._stop.wait(self.poll):
            now = time.time()
            for path in self.run.heartbeats(attempt):
                beat = beats.read(path)
                if beat is None:
                    continue
                before = seen.get(beat.rank)
                if before is None or beat.n != before.beat.n:
                    for state, interval in beat.longest.items():  # measured by the rank: none is missed
                        self.timeouts.learn(state, interval)
                    seen[beat.rank] = RankSeen(beat, now)
            self._straggler(attempt, compare, seen)
            late = overdue(seen, self.timeouts, now)
            if not late or self._stop.is_set() or (deferred is not None and now < deferred):
                continue
            record = self._examine(attempt, tree, seen, late, now)
            if self.other_nodes and deferred is None and not record.stopped and record.rank in (record.waiting or []):
                deferred = now + (record.timeout_s or 0)
                self.say(f"hang watch: every rank of node {self.run.node} waits in a collective ({record.frame}); "
                         f"waiting up to {record.timeout_s:g} s for the other nodes' watches")
                continue
            records.save_hang(self.run, record)
            self.say(record.message or "hang")
            self.found = record
            tree.signal_all(signal.SIGKILL)  # every process of the attempt: launcher, ranks, their workers
            return

    def _straggler(self, attempt: int, compare: stragglers.Stragglers, seen: Mapping[int, RankSeen]) -> None:
        """One warning per straggler and run."""
        named = compare.feed({r: s.beat for r, s in seen.items() if s.beat.state != DONE})
        if named is None or any(f["rank"] == named["rank"] for f in self.stragglers):
            return
        named = {"attempt": attempt, "node": self.run.node, **named,
                 "message": stragglers.describe(named, self.run.node)}
        self.stragglers.append(named)
        self.say(named["message"])

    def _examine(self, attempt: int, tree: ProcessTree, seen: dict[int, RankSeen], late: list[int],
                 now: float) -> Hang:
        """Every rank's stack written, the stuck one named: the hang's record."""
        ours = tree.refresh()
        pids = {r: s.beat.pid for r, s in seen.items() if s.beat.pid in ours}  # only this attempt's processes
        stopped = {r for r, pid in pids.items() if stacks.is_stopped(pid)}
        found = stacks.dump(pids, {r: self.run.stack(attempt, r) for r in pids},
                            {r: self.run.stack(attempt, r, native=True) for r in pids})
        rank = culprit(seen, late, found, stopped)
        beat = seen[rank].beat
        timeout, source = self.timeouts.of(beat.state)
        stack = found.get(rank)
        record = Hang.new(attempt=attempt, node=self.run.node, rank=beat.rank, pid=beat.pid, phase=beat.state,
                          epoch=beat.epoch, iteration=in_batch(beat), stuck_s=round(now - beat.t, 1),
                          timeout_s=round(timeout, 1), timeout_source=source, frame=stack.frame if stack else None,
                          stopped=rank in stopped, waiting=sorted(r for r, s in found.items() if s.collective),
                          stacks=[str(s.path) for s in found.values()],
                          native=[str(s.native) for s in found.values() if s.native], t=now)
        record.message = describe(record, self.epochs, self.run)
        return record


def in_batch(beat: beats.Beat) -> int | None:
    """The batch a rank works on after its last beat: the one after the batch that beat ended (the first after a
    phase's start); None outside training steps and validation batches."""
    return beat.iteration + 1 if beat.state in STEPS else None


def describe(hang: Hang, epochs: int | None, run: RunDir) -> str:
    """The one line that names the stuck rank, its phase, for how long and the frame it is in."""
    who = "the worker" if (hang.rank or 0) < 0 else f"rank {hang.rank}"
    node = f" of node {hang.node}" if hang.node else ""
    state = "stopped (SIGSTOP, state T)" if hang.stopped else "stuck"
    where = f" in {hang.frame}" if hang.frame else ""
    batch = f", batch {hang.iteration}" if hang.iteration is not None else ""
    stacks_dir = run.stack(hang.attempt or 0, 0).parent
    return (f"hang: {who}{node} {state} in {hang.phase} at {epoch_label(hang.epoch, epochs)}{batch}, for "
            f"{hang.stuck_s:g} s (timeout {hang.timeout_s:g} s, {hang.timeout_source}){where}; every rank's stack in "
            f"{stacks_dir}; stopping every rank")


def hung_end(hang: Hang) -> AttemptEnd:
    """The end of an attempt whose ranks the watch stopped, for the attempt loop (a relaunch, bounded)."""
    return AttemptEnd(Outcome.HUNG, hang.phase, hang.epoch, hang.rank, message=hang.message or "hang",
                      node=hang.node if hang.node else None)


def found_in(run: RunDir, attempt: int) -> Hang | None:
    """The hang this node's watch recorded in ``attempt``, if it found one."""
    path = run.hang(attempt)
    if not path.is_file():
        return None
    try:
        return records.load_hang(path)
    except records.RecordError:
        return Hang.new(attempt=attempt, node=run.node, message=f"hang (its record {path} is damaged)")
