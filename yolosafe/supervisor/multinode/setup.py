"""The command line of a multi-node run: the node options, their checks, the shared run directory, the dry run.

``yolosafe train --nnodes N --node-rank R --rdzv-endpoint HOST:PORT [--rdzv-id ID]`` on every node (or nothing extra
under ``srun``: :func:`yolosafe.planning.nodes.from_slurm`). Everything here happens before a run directory exists on
this
node and ends in one line and exit status 2 when something is wrong; no torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yolosafe.planning import nodes, validate
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.planning.trainplan import TrainPlan
from yolosafe.rundir import records
from yolosafe.rundir.layout import RunDir
from yolosafe.supervisor.multinode import cluster
from yolosafe.supervisor.terminal import say

if TYPE_CHECKING:
    from yolosafe.supervisor.multinode.agree import MultiNode

NODE_KEYS = ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "rdzv_timeout")


def resolve(params: dict[str, Any]) -> nodes.Nodes:
    """The flags, else SLURM's variables, else one machine; a usage error in one line."""
    where = nodes.resolve(params.get("nnodes"), params.get("node_rank"), params.get("rdzv_endpoint"),
                          params.get("rdzv_id"), os.environ)  # a NodesError: a usage error of its own
    timeout = params.get("rdzv_timeout")
    if timeout is not None and timeout < 1:
        raise validate.InputError(f"--rdzv-timeout {timeout}: give seconds, at least 1")
    return replace(where, timeout=timeout or cluster.DEFAULT_TIMEOUT_S) if where.multi else where


def check_plan(p: TrainPlan, where: nodes.Nodes) -> None:
    if where.multi and not p.gpus:
        raise nodes.NodesError(f"--nnodes {where.nnodes}: a multi-node run trains on GPUs (--gpus); to rehearse one on "
                               "a machine without, use fake GPUs (YOLOSAFE_FAKE_GPUS=2x24GB)")


def claim(project: Path, options: TrainOptions, named: bool, where: nodes.Nodes, p: TrainPlan,
          dry_run: bool) -> RunDir:
    """The run directory, the same on every node, as this node names its files: node 0 makes it, the others find it
    (a dry run only names it)."""
    try:
        run = RunDir(project / nodes.run_name(options.name, named, where), where.node_rank)
        if dry_run:
            return run
        if where.node_rank == 0:
            return cluster.create(run, where, p.summary())
        if run.story.exists():
            raise cluster.ClusterError(f"{run.path} already has node {where.node_rank}'s story: it is an earlier run; "
                                       f"give another --name, or --resume {run.path}")
        return cluster.join(run, where, p.summary(), 1, say)
    except (nodes.NodesError, cluster.ClusterError) as exc:
        raise validate.InputError(str(exc)) from None


def rejoin(run: RunDir, where: nodes.Nodes, p: TrainPlan, attempt: int, story: records.Story) -> None:
    """A resume over several nodes: node 0 announces the attempt the run goes on with, the others find it (their
    own story must be at the same attempt) and check their plan against it."""
    story.nodes = where.summary()
    try:
        if where.node_rank == 0:
            cluster.announce(run, where, p.summary(), attempt)
        else:
            cluster.join(run, where, p.summary(), attempt, say, lock=False)  # resume.prepare holds the lock
    except cluster.ClusterError as exc:
        raise validate.InputError(str(exc)) from None


def multinode(run: RunDir, where: nodes.Nodes | None, p: TrainPlan) -> MultiNode | None:
    """The supervisor's handle on the other nodes; None on one machine."""
    if where is None or not where.multi:
        return None
    from yolosafe.supervisor.multinode.agree import MultiNode
    session = (cluster.read(run.nodes_marker) or {}).get("session")
    return MultiNode(run, where, tuple(p.gpus), say, session)


def dry_run_lines(p: TrainPlan, where: nodes.Nodes) -> list[tuple[str, str]]:
    first = where.first_rank(p.local_world_size)
    ranks = f"global ranks {first}-{first + p.local_world_size - 1}"
    return [("nodes", f"{where.nnodes} nodes x {p.local_world_size} GPUs = {p.world_size} ranks; this is node "
                      f"{where.node_rank} ({ranks}); rendezvous {where.endpoint} (static, id {where.rdzv_id or '-'}, "
                      f"attempt N on port + N - 1)")]
