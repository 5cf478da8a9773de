"""Recovery every node agrees on: how a multi-node attempt ended, decided the same way on every node.

When a rank on any node dies (an OOM), torchrun ends that node's ranks; the other nodes' ranks fail at their next
collective, or, where they would hang (NCCL waits up to Ultralytics' 3-hour timeout), their supervisor stops them
:data:`PEER_GRACE_S` after it sees the failed node's end record. Then each node's supervisor:

1. writes how the attempt ended here, ``attempt-N-nodeR.json``: exit status, signal, the failure records of its own
   ranks, the end of its log, and on node 0 the checkpoint rank 0 left;
2. waits until every node has written its own or is gone (:class:`yolosafe.supervisor.multinode.cluster.Peers`): a
node waits only for
   peers that are alive, so never forever;
3. derives the outcome from those end records alone, in node order, with the single-node classifier
   (:func:`yolosafe.supervisor.policy.classify`). Every node reads the same records, so every node reaches the same
   outcome,
   and the same policy (:func:`yolosafe.supervisor.policy.next_step`) gives every node the same next plan: half the
   per-GPU
   batch, the same ``nbs``, the same checkpoint. Nothing is sent between nodes but these files.

An interrupted node (Ctrl-C) writes its end record and leaves at once; the others read "SIGINT on node R" and stop.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolosafe.planning import nodes
from yolosafe.proc import AttemptResult, ProcessTree
from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Hang, Outcome, failures_from, load_failures
from yolosafe.rundir.runspec import FINAL_VAL, RunSpec
from yolosafe.supervisor.hangwatch import found_in, hung_end
from yolosafe.supervisor.multinode import cluster
from yolosafe.supervisor.policy import AttemptEnd, classify

PEER_GRACE_S = 10.0  # after another node's attempt failed: our ranks get this long to fail by themselves
WATCH_S = 0.5  # how often a training node looks for the other nodes' end records
LOG_TAIL = 4000  # characters of each node's log in its end record (the classifier reads the OOM lines there)


def decide(ends: list[dict[str, Any]], nproc: int) -> AttemptEnd:
    """The attempt's outcome from every node's end record (or the record of its absence), in node order: pure, so
    every node computes the same one."""
    for end in ends:
        if end.get("interrupted"):
            return AttemptEnd(Outcome.INTERRUPTED, message=f"{end['interrupted']} on node {end['node']}",
                              node=end["node"])
    for end in ends:
        if end.get("stopped"):  # a node whose yolosafe ended interrupted (its own Ctrl-C, or another node's)
            return AttemptEnd(Outcome.INTERRUPTED, message=end["stopped"], node=end["node"])
    for end in ends:  # a node's hang watch stopped its ranks: the other nodes' errors follow from it
        if isinstance(end.get("hang"), dict):
            return hung_end(Hang.from_dict(end["hang"]))
    for end in ends:
        if end.get("gone"):
            return AttemptEnd(Outcome.FAILED, message=f"{end['gone']}; the other nodes cannot train without it",
                           node=end["node"])
    # the exit status of a node that failed by itself, before that of one its supervisor stopped after a peer failed
    by_itself = sorted(ends, key=lambda e: bool(e.get("stopped_for")))
    code = next((e["exit_code"] for e in by_itself if e.get("exit_code")), 0)
    result = AttemptResult(code, max(float(e.get("duration_s") or 0) for e in ends))
    records = [r for e in ends for r in failures_from(e.get("records", []))]
    failure = classify(result, records, "\n".join(e.get("log_tail", "") for e in ends))
    if failure.rank is not None and failure.rank >= 0 and failure.outcome != Outcome.COMPLETED:
        failure.node = failure.rank // max(nproc, 1)
        failure.node_gpus = tuple(ends[failure.node].get("gpus") or ()) if failure.node < len(ends) else None
    return failure


def own_records(run: RunDir, attempt: int, nproc: int) -> list[dict[str, Any]]:
    """The failure records of the ranks of ``run``'s node (global ranks ``node * nproc ..``); the single process of a
    final validation counts as rank 0."""
    return [r.to_dict() for r in load_failures(run, attempt) if max(r.rank or 0, 0) // nproc == run.node]


@dataclass
class MultiNode:
    """A supervisor's handle on the other nodes: join, heartbeat, the watch during an attempt, the agreement after."""

    run_dir: Path
    nodes: nodes.Nodes
    gpus: tuple[int, ...]  # this node's plan GPUs (NVML numbering)
    say: Callable[[str], None]
    session: str | None = None  # node 0's marker's: states of earlier sessions are not this run's nodes
    beat: cluster.Heartbeat = field(init=False)
    stopped_for: str | None = None  # why this node stopped its own ranks in the current attempt
    stopped_by: str | None = None  # "SIGINT on node R": the interruption that ended the run, here or elsewhere

    def __post_init__(self) -> None:
        self.beat = cluster.Heartbeat(self.run, {"session": self.session})

    @property
    def node(self) -> int:
        return self.nodes.node_rank

    @property
    def run(self) -> RunDir:
        """The run directory, as this node names its files."""
        return RunDir(self.run_dir, self.node)

    @property
    def timeout(self) -> float:
        """How long this node waits for the others to join (and in torchrun's rendezvous); --rdzv-timeout."""
        return float(self.nodes.timeout or cluster.DEFAULT_TIMEOUT_S)

    @property
    def nproc(self) -> int:
        return max(len(self.gpus), 1)

    def peers(self) -> cluster.Peers:
        return cluster.Peers(self.run, self.nodes.nnodes, self.session)

    def start(self) -> str | None:
        """Announce this node and wait for the others (bounded); one line when some never came."""
        self.beat.start(state="joined", gpus=list(self.gpus))
        return self.peers().wait_joined(self.timeout, self.say)

    def stop(self, outcome: str | None) -> None:
        """This node's supervisor is done: the others stop waiting for it (and read why: ``stopped``, after an
        interruption; a Ctrl-C between attempts is a KeyboardInterrupt, so SIGINT). Node 0 marks the run as ended."""
        if outcome == Outcome.INTERRUPTED and self.stopped_by is None:
            self.stopped_by = f"SIGINT on node {self.node}"
        self.beat.stop(state="done", outcome=outcome, stopped=self.stopped_by)
        if self.node == 0:
            found = cluster.read(self.run.nodes_marker) or {}
            rundir.write_json(self.run.nodes_marker, {**found, "state": "ended", "outcome": outcome})

    def runs_here(self, spec: RunSpec) -> bool:
        """A final validation only (training is over) runs on node 0 alone; the other nodes wait for its outcome."""
        return self.node == 0 or spec.mode != FINAL_VAL

    def launch_shape(self, spec: RunSpec) -> tuple[nodes.Nodes, int]:
        """(the nodes, ranks on this node): torchrun's static rendezvous over every node, this node's GPUs."""
        return self.nodes, self.nproc

    def resume_flags(self) -> str:
        rdzv_id = f" --rdzv-id {self.nodes.rdzv_id}" if self.nodes.rdzv_id else ""
        return (f" --nnodes {self.nodes.nnodes} --node-rank {self.node} --rdzv-endpoint {self.nodes.endpoint}"
                f"{rdzv_id} (the same on every node, with its own --node-rank)")

    def watch(self, attempt: int, then: Callable[[ProcessTree], None] | None) -> Callable[[ProcessTree], None]:
        """``run_child``'s ``on_start``: also watch the other nodes while this attempt runs (:meth:`_watch`)."""
        self.stopped_for = None

        def on_start(tree: ProcessTree) -> None:
            if then is not None:
                then(tree)
            self.beat.set(state="training", attempt=attempt)
            threading.Thread(target=self._watch, args=(attempt, tree), name="yolosafe-peers", daemon=True).start()

        return on_start

    def _watch(self, attempt: int, tree: ProcessTree) -> None:
        """Stop this node's ranks once another node's attempt has failed (or that node is gone) and ours did not
        end by themselves within :data:`PEER_GRACE_S` (at once after a Ctrl-C there)."""
        peers, noticed = self.peers(), None
        while tree.root in tree.pids():
            problem = noticed[1] if noticed else self._peer_problem(attempt, peers)
            if problem and noticed is None:
                noticed = (time.monotonic(), problem)
            if noticed and time.monotonic() - noticed[0] >= noticed[1][1]:
                self.stopped_for = noticed[1][0]
                self.say(f"{self.stopped_for}: stopping this node's ranks")
                tree.signal_all(signal.SIGTERM)
                return
            time.sleep(WATCH_S)

    def _peer_problem(self, attempt: int, peers: cluster.Peers) -> tuple[str, float] | None:
        """(why, grace) when another node will not finish this attempt."""
        for other in peers.others():
            end = cluster.read(self.run.node_end(attempt, other))
            if end is not None and (end.get("interrupted") or end.get("exit_code")):
                how = end.get("interrupted") or f"exit status {end.get('exit_code')}"
                grace = 0.0 if end.get("interrupted") else PEER_GRACE_S
                return f"node {other}'s attempt {attempt} ended ({how})", grace
            gone = peers.gone(other) if end is None else None
            if gone:
                return gone["gone"], 0.0 if gone.get("stopped") else PEER_GRACE_S
        return None

    def agree(self, attempt: int, result: AttemptResult, log_tail: str) -> AttemptEnd:
        """Write this node's end record, wait for every node's (bounded by their liveness), decide."""
        interrupted = signal.Signals(result.interrupted).name if result.interrupted else None
        mine = {"node": self.node, "attempt": attempt, "exit_code": result.exit_code, "interrupted": interrupted,
                "stopped_for": self.stopped_for, "duration_s": round(result.duration_s, 2), "gpus": list(self.gpus),
                "records": own_records(self.run, attempt, self.nproc), "log_tail": log_tail[-LOG_TAIL:],
                "checkpoint": self._checkpoint() if self.node == 0 else None, "t": time.time(),
                "hang": hang.to_dict() if (hang := found_in(self.run, attempt)) else None}
        rundir.write_json(self.run.node_end(attempt, self.node), mine)
        if interrupted:  # the user wants this node out now; the others read it from the end record
            self.stopped_by = f"{interrupted} on node {self.node}"
            return AttemptEnd(Outcome.INTERRUPTED, message=interrupted)
        self.beat.set(state="deciding", attempt=attempt)
        ends = self._wait_ends(attempt)
        failure = decide(ends, self.nproc)
        if failure.outcome == Outcome.INTERRUPTED:
            self.stopped_by = failure.message
        retried = failure.outcome in (Outcome.OOM, Outcome.HUNG) and self.node != 0  # resumes from node 0's checkpoint
        if retried and not self._checkpoint_visible(ends[0].get("checkpoint")):
            last = self.run.last_checkpoint.relative_to(self.run.path).as_posix()
            return AttemptEnd(Outcome.FAILED, message=f"{last} written by node 0 is not visible here after "
                                             f"{self.timeout:g} s: the run directory must be on storage every node "
                                             "shares")
        return failure

    def _wait_ends(self, attempt: int) -> list[dict[str, Any]]:
        peers = self.peers()
        while True:
            ends = [cluster.read(self.run.node_end(attempt, n)) or peers.gone(n)
                    for n in range(self.nodes.nnodes)]
            if all(ends):
                return [e for e in ends if e is not None]
            time.sleep(cluster.POLL_S)

    def _checkpoint(self) -> dict[str, float] | None:
        last = self.run.last_checkpoint
        try:
            stat = last.stat()
        except OSError:
            return None
        return {"size": stat.st_size, "mtime": stat.st_mtime}

    def _checkpoint_visible(self, expected: dict[str, float] | None) -> bool:
        """Node 0's last.pt, as node 0 saw it, seen here too (shared storage may show a new file late)."""
        deadline = time.monotonic() + self.timeout
        while expected is not None and (self._checkpoint() or {}).get("size") != expected.get("size"):
            if time.monotonic() >= deadline:
                return False
            time.sleep(cluster.POLL_S)
        return True
