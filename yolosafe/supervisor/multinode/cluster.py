"""Who is in a multi-node run: one run directory on storage every node shares, found by every node, and each node's
supervisor telling the others it is alive.

There is no protocol of yolosafe's own between the nodes and no socket: torch.distributed.run's static rendezvous
joins the ranks, and the supervisors meet only through small JSON files in the shared run directory, each written by
one node (atomic rename), so no two nodes ever write one file:

- ``nodes.json``, node 0's *marker*: node 0 creates the run directory and writes it (the rendezvous endpoint and id,
  the plan, the attempt it starts with). Every other node waits for it (bounded), checks its own plan against it and
  takes its own lock; a node that never sees it is not on the same storage, and says so in one line.
- ``node-R.json``, node R's *state*: where it is (joined, training attempt N, deciding, done and how) and a heartbeat
  counter, rewritten every :data:`HEARTBEAT_S`. A node whose counter has not moved for :data:`SILENT_S` (seen on the
  reader's own clock, so clocks need not agree) is gone: its supervisor died with its machine or a SIGKILL.

What the nodes do with that at the end of each attempt is :mod:`yolosafe.supervisor.multinode.agree`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolosafe.errors import YolosafeError
from yolosafe.planning.nodes import Nodes
from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir

POLL_S = 0.2  # how often a waiting node looks at the shared directory again
HEARTBEAT_S = 2.0  # how often a node rewrites its state file
SILENT_S = 30.0  # a node whose heartbeat has not moved for this long is gone
DEFAULT_TIMEOUT_S = 300  # --rdzv-timeout: the wait for the other nodes at start, in and around the rendezvous
PLAN_KEYS = ("nnodes", "batch", "effective_batch", "val_batch", "imgsz", "epochs")  # must be the same on every node


class ClusterError(YolosafeError):
    """The nodes cannot form the run; ``str()`` is one line that says what to do."""


def _plan_key(plan: dict[str, Any]) -> dict[str, Any]:
    return {**{k: plan.get(k) for k in PLAN_KEYS}, "gpus_per_node": len(plan.get("gpus") or ())}


def read(path: Path) -> dict[str, Any] | None:
    """A JSON object written atomically by another node, or None while there is none (or it is mid-replace)."""
    try:
        data = rundir.read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker(nodes: Nodes, plan: dict[str, Any], attempt: int) -> dict[str, Any]:
    """Node 0's marker: what the other nodes must match to join, the attempt the run (re)starts with, and a new
    session (the heartbeats of this session carry it)."""
    return {"rdzv_id": nodes.rdzv_id, "endpoint": nodes.endpoint, "nnodes": nodes.nnodes, "plan": _plan_key(plan),
            "attempt": attempt, "state": "running", "session": uuid.uuid4().hex, "host": socket.gethostname(),
            "pid": os.getpid(), "t": time.time()}


def create(run_dir: Path, nodes: Nodes, plan: dict[str, Any]) -> Path:
    """Node 0 of a new run: make the run directory (never an existing one), lock it, write the marker."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()
    except FileExistsError:
        raise ClusterError(f"{run_dir} exists: a multi-node run starts in a new directory (another --name or "
                           f"--rdzv-id), or continues with --resume {run_dir}") from None
    except OSError as exc:
        raise ClusterError(f"cannot create {run_dir}: {exc.strerror}") from None
    run_dir = run_dir.resolve()
    RunDir(run_dir).lock()  # held until this process exits
    announce(run_dir, nodes, plan, 1)
    return run_dir


def announce(run_dir: Path, nodes: Nodes, plan: dict[str, Any], attempt: int) -> None:
    """Node 0 (which holds its lock): the run goes on with ``attempt``; the others may join."""
    rundir.write_json(RunDir(run_dir).nodes_marker, marker(nodes, plan, attempt))


def join(run_dir: Path, nodes: Nodes, plan: dict[str, Any], attempt: int, say: Callable[[str], None],
         lock: bool = True) -> Path:
    """Node R > 0: wait (at most the nodes' timeout) for node 0's marker of this run, live, at ``attempt``; check this
    node's plan against it; take this node's lock. Raises :class:`ClusterError` with one line."""
    timeout = nodes.timeout or DEFAULT_TIMEOUT_S
    found = _wait_marker(run_dir, nodes, attempt, timeout, say)
    if found is None:
        raise ClusterError(f"node {nodes.node_rank}: no run directory from node 0 at {run_dir.resolve()} after "
                           f"{timeout:g} s: the project must be on storage every node shares, at the same path "
                           "(e.g. --project /shared/runs), and node 0 started with the same --name/--rdzv-id")
    mine = _plan_key(plan)
    differ = [f"{k} {mine[k]} (node 0: {found['plan'].get(k)})" for k in mine if found["plan"].get(k) != mine[k]]
    if differ:
        raise ClusterError(f"node {nodes.node_rank}: this node's plan differs from node 0's: {', '.join(differ)}; "
                           "run every node with the same options")
    run_dir = run_dir.resolve()
    try:
        if lock:
            RunDir(run_dir, nodes.node_rank).lock()
    except rundir.RunLocked as exc:
        raise ClusterError(f"node {nodes.node_rank} of {run_dir} is already running (yolosafe pid {exc.pid})") from None
    return run_dir


def _wait_marker(run_dir: Path, nodes: Nodes, attempt: int, timeout: float,
                 say: Callable[[str], None]) -> dict[str, Any] | None:
    """Node 0's marker for this job, written by a node 0 that is alive now (its heartbeat moves: a marker left by an
    earlier session is not taken), at ``attempt``; None after ``timeout``."""
    deadline, told, beats = time.monotonic() + timeout, False, set()
    while True:
        found = _live_marker(run_dir, nodes, beats)
        if found is not None and found.get("attempt") != attempt:
            raise ClusterError(f"node 0 goes on with attempt {found.get('attempt')}, node {nodes.node_rank} with "
                               f"attempt {attempt}: this node did not take part in the same attempts")
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            return None
        if not told:
            say(f"node {nodes.node_rank}: waiting for node 0's run directory {run_dir} (up to {timeout:g} s)")
            told = True
        time.sleep(POLL_S)


def _live_marker(run_dir: Path, nodes: Nodes, beats: set[Any]) -> dict[str, Any] | None:
    """The marker once node 0's heartbeat (same session) was seen to move (``beats``: the counters seen so far). A
    marker of another job (other endpoint, rendezvous id or node count) is an error: the name is another run's."""
    found = read(RunDir(run_dir).nodes_marker)
    if found is None:
        return None
    if (found.get("rdzv_id"), found.get("endpoint"), found.get("nnodes")) != (nodes.rdzv_id, nodes.endpoint,
                                                                               nodes.nnodes):
        raise ClusterError(f"{run_dir} belongs to another multi-node run (endpoint {found.get('endpoint')}, rdzv id "
                           f"{found.get('rdzv_id')}, {found.get('nnodes')} nodes); give another --name")
    state = read(RunDir(run_dir).node_state(0)) or {}
    live = found.get("state") == "running" and state.get("state") != "done"
    if live and state.get("session") == found.get("session"):
        beats.add(state.get("beat"))
    return found if len(beats) > 1 else None


@dataclass
class Heartbeat:
    """This node's state file, rewritten every :data:`HEARTBEAT_S` by a daemon thread until :meth:`stop`."""

    run: RunDir  # this node's view of the run directory
    state: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, **state: Any) -> None:
        self.set(**state)
        threading.Thread(target=self._run, name="yolosafe-heartbeat", daemon=True).start()

    def set(self, **state: Any) -> None:
        """Change the state and write it now (other nodes act on some changes: "done", an attempt's start)."""
        with self._lock:
            self.state.update(state, node=self.run.node, host=socket.gethostname(), pid=os.getpid(),
                              beat=int(self.state.get("beat", 0)) + 1, t=time.time())
            rundir.write_json(self.run.node_state(self.run.node), self.state)

    def stop(self, **state: Any) -> None:
        self._stop.set()
        self.set(**state)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.set()
            except OSError:  # shared storage hiccup: the next beat may pass; a long silence makes us "gone"
                continue


@dataclass
class Peers:
    """The other nodes as this node sees them: each one's last state, and whether it is gone.

    Silence is measured on this node's clock from the last change of the peer's heartbeat counter; a peer never
    seen in this ``session`` (node 0's marker: a state file left by an earlier session of a resumed run does not
    count) is "missing" until :data:`SILENT_S` have passed since this object was made."""

    run: RunDir  # this node's view of the run directory
    nnodes: int
    session: str | None
    _seen: dict[int, tuple[int, float]] = field(default_factory=dict)
    _since: float = field(default_factory=time.monotonic)

    def others(self) -> list[int]:
        return [n for n in range(self.nnodes) if n != self.run.node]

    def state(self, node: int) -> dict[str, Any] | None:
        found = read(self.run.node_state(node))
        if found is not None and found.get("session") != self.session:
            found = None  # an earlier session's
        now = time.monotonic()
        if found is not None:
            beat = int(found.get("beat") or 0)
            if self._seen.get(node, (None, 0.0))[0] != beat:
                self._seen[node] = (beat, now)
        return found

    def gone(self, node: int) -> dict[str, Any] | None:
        """Why ``node`` is no longer in the run (its supervisor ended, fell silent, never came), else None."""
        found = self.state(node)
        now = time.monotonic()
        if found is None:
            if now - self._since < SILENT_S:
                return None
            return {"node": node, "gone": f"node {node} never joined"}
        if found.get("state") == "done":
            return {"node": node, "gone": f"node {node}'s yolosafe ended ({found.get('outcome') or 'ended'})",
                    "stopped": found.get("stopped")}
        if now - self._seen[node][1] > SILENT_S:
            return {"node": node, "gone": f"node {node} stopped reporting ({SILENT_S:g} s without a heartbeat)"}
        return None

    def wait_joined(self, timeout: float, say: Callable[[str], None]) -> str | None:
        """Every other node's state file, within ``timeout`` s; one line naming the missing ones otherwise."""
        deadline, told = time.monotonic() + timeout, False
        while True:
            missing = [n for n in self.others() if self.state(n) is None]
            if not missing:
                return None
            if not told:
                waiting = ", ".join(map(str, missing))
                say(f"node {self.run.node}: waiting for node {waiting} to join (up to {timeout:g} s)")
                told = True
            if time.monotonic() >= deadline:
                names = ", ".join(map(str, missing))
                return (f"node{'s' if len(missing) > 1 else ''} {names} did not join {self.run.path} within "
                        f"{timeout:g} s: start yolosafe there with the same options, and the project on storage every "
                        "node shares")
            time.sleep(POLL_S)
