"""How yolosafe starts DDP ranks: torch.distributed.run, launched by yolosafe itself, one rank per GPU of the plan.

Each rank runs ``python -m yolosafe.training.worker SPEC``, builds yolosafe's trainer and trains as a rank of the group
(instead of Ultralytics' own launch, which writes a temp file with a cloudpickled trainer class and deletes the run
directory before it starts). torch.distributed.run brings what a supervisor needs: per-rank logs and error files in
``RUN_DIR/ranks/attempt-N`` (``--log-dir``, ``--tee``; each rank's traceback through ``@record``), the teardown of
every rank when one fails, and the flags of a multi-node launch (``--nnodes``, ``--node-rank``, rendezvous).

The launcher process is ``python -m yolosafe.training.launcher <torchrun arguments>``: torch.distributed.run's own
argument
parser and ``run()``, plus one thing the command line tool cannot do: when ranks fail, it turns torch's structured
failure list (``ChildFailedError.failures``: rank, exit code, signal, error file) into failure records for the ranks
that could not write their own (a rank killed by a signal), so the supervisor can say "rank 1 was killed by SIGKILL".
It writes them into the run directory of the run spec whose path follows ``-m yolosafe.training.worker`` in its own
arguments.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yolosafe.planning.nodes import Nodes, for_attempt, torchrun_flags

WORKER = "yolosafe.training.worker"  # the module every rank runs, with the run spec's path as its one argument
# torchrun's SIGTERM-to-SIGKILL wait for its ranks when the launcher itself is stopped (SIGTERM, SIGINT) and at its
# exit (default 30). Not after a rank fails: the agent then stops the surviving ranks with its own default, 30 s
# (LocalElasticAgent._stop_workers calls _shutdown() without this timeout; tests/test_gpu_truths.py reads it).
SHUTDOWN_TIMEOUT_S = 5


@dataclass(frozen=True)
class Launch:
    """Where and how many ranks: ``nproc_per_node`` on this machine. One node: static rendezvous on
    ``127.0.0.1:master_port``. Several (``nodes.multi``): torchrun's static rendezvous at node 0's endpoint, with
    this node's rank, so node R's ranks get the global ranks ``R * nproc ..`` (:mod:`yolosafe.planning.nodes`)."""

    nproc_per_node: int
    master_port: int
    log_dir: Path
    nodes: Nodes = field(default_factory=Nodes)


def torchrun_args(launch: Launch, module: str, args: Sequence[str]) -> list[str]:
    """torch.distributed.run's arguments that run ``python -m module *args`` on every rank."""
    if launch.nodes.multi:
        argv = ["--nproc-per-node", str(launch.nproc_per_node),
                *torchrun_flags(launch.nodes, launch.master_port)]
    else:
        argv = ["--nnodes", "1", "--nproc-per-node", str(launch.nproc_per_node), "--node-rank", "0",
                "--master-addr", "127.0.0.1", "--master-port", str(launch.master_port)]
    argv += ["--max-restarts", "0",  # a failed rank ends the attempt: yolosafe decides what the next one runs
             "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S),
             "--log-dir", str(launch.log_dir), "--tee", "3", "--log-line-prefix-template", "[rank${rank}]: "]
    return [*argv, "-m", module, *args]


def command(python: str, launch: Launch, spec: Path) -> list[str]:
    """The launcher's command line, as the supervisor runs it and ``yolosafe.json`` records it."""
    return [python, "-m", "yolosafe.training.launcher", *torchrun_args(launch, WORKER, [str(spec)])]


def child_command(spec: Path, world_size: int, nproc_per_node: int, log_dir: Path, nodes: Nodes,
                  attempt: int) -> list[str]:
    """An attempt's child, as the supervisor runs it and the dry run shows it: the worker itself for a single process;
    for several ranks, yolosafe's launcher with this machine's ``nproc_per_node`` ranks (one node: a local store on a
    free port; several: the attempt's rendezvous at node 0, :func:`yolosafe.planning.nodes.for_attempt`)."""
    if world_size <= 1:
        return [sys.executable, "-m", WORKER, str(spec)]
    port = 0 if nodes.multi else free_port()
    return command(sys.executable, Launch(nproc_per_node, port, log_dir, for_attempt(nodes, attempt)), spec)


def free_port() -> int:
    """A free TCP port on this machine, found as Ultralytics finds one (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
