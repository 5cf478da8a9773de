"""Which machines a run spans: ``--nnodes/--node-rank/--rdzv-endpoint/--rdzv-id``, or SLURM's variables.

Pure: no torch, no network. ``yolosafe train`` runs on every node with the same options; each node's supervisor
launches its local ranks through ``torch.distributed.run`` with the flags :func:`torchrun_flags` returns.

Rendezvous is torchrun's ``static`` backend: node ``R`` of ``N`` gets global ranks ``R * nproc .. R * nproc + nproc -
1``, so node 0 holds rank 0, the rank that writes checkpoints and results, and hosts the TCP store at the endpoint.
(torchrun's ``c10d`` backend hands out node ranks in the order nodes join, which would make "node 0" a matter of
luck.) The rendezvous id is not used by the static backend; yolosafe records it so every node can tell it joined
the same job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from yolosafe.errors import UsageError

DEFAULT_PORT = 29500  # torchrun's own default master port
ATTEMPT_PORTS = 16  # attempt N uses the endpoint's port + (N - 1) % 16: node 0 needs these ports free
SLURM_PORT_SPAN = 10_000  # SLURM jobs sharing a first node get different ports: 29500 + job id % span


class NodesError(UsageError):
    """A usage error in the multi-node options; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Nodes:
    """This node's place in the job. ``nnodes == 1`` is an ordinary single-machine run."""

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None  # HOST:PORT of node 0's rendezvous store
    rdzv_id: str | None = None
    source: str = "single"  # single | flags | slurm
    timeout: int | None = None  # seconds a node waits for the others (--rdzv-timeout); None: yolosafe's default

    @property
    def multi(self) -> bool:
        return self.nnodes > 1

    def world_size(self, gpus_per_node: int) -> int:
        return self.nnodes * max(gpus_per_node, 1)

    def first_rank(self, gpus_per_node: int) -> int:
        """The global rank of this node's local rank 0."""
        return self.node_rank * max(gpus_per_node, 1)

    def summary(self) -> dict[str, object]:
        return {"nnodes": self.nnodes, "node_rank": self.node_rank, "endpoint": self.endpoint,
                "rdzv_id": self.rdzv_id, "source": self.source, "timeout": self.timeout}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as SLURM expands it (python-hostlist, the hostlist library of SLURM's
    own syntax): ``gpu[07-10,12],cpu3`` -> ``gpu07``, ``r[1-2]n[01-04]`` -> ``r1n01``, ``node[001-004]-ib`` ->
    ``node001-ib``, HPE/Cray's ``x1000c[0-1]s0b0n0`` -> ``x1000c0s0b0n0``."""
    import hostlist

    try:
        hosts = hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist as exc:
        raise NodesError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot read the first host ({exc})") from None
    if not hosts or not hosts[0]:
        raise NodesError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot read the first host")
    return str(hosts[0])


def _endpoint(text: str, option: str = "--rdzv-endpoint") -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not (port.isascii() and port.isdecimal()) or not 0 < int(port) < 65536:
        raise NodesError(f"{option} {text!r}: expected HOST:PORT, e.g. node0:29500")
    return f"{host}:{int(port)}"


def from_slurm(env: Mapping[str, str]) -> Nodes | None:
    """The job's nodes from ``srun``'s variables; None outside SLURM or for a one-node job."""
    name = "SLURM_NNODES" if env.get("SLURM_NNODES") else "SLURM_JOB_NUM_NODES"
    nnodes = _slurm_count(name, env.get(name) or "1")
    if nnodes < 1:
        raise NodesError(f"{name} {env.get(name)!r}: must be at least 1")
    if nnodes == 1:
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist or "SLURM_NODEID" not in env:
        raise NodesError("SLURM_NNODES > 1 but SLURM_JOB_NODELIST/SLURM_NODEID are missing: run under srun, "
                         "or give --nnodes/--node-rank/--rdzv-endpoint")
    job = env.get("SLURM_JOB_ID", "")
    offset = int(job) % SLURM_PORT_SPAN if job.isascii() and job.isdecimal() else 0
    port = env.get("MASTER_PORT") or str(DEFAULT_PORT + offset)
    node_id = _slurm_count("SLURM_NODEID", env["SLURM_NODEID"])
    if not 0 <= node_id < nnodes:
        raise NodesError(f"SLURM_NODEID {node_id}: must be 0..{nnodes - 1} for SLURM_NNODES {nnodes}")
    return check(Nodes(nnodes, node_id, _endpoint(f"{first_host(nodelist)}:{port}", "SLURM"),
                       job or None, "slurm"))


def _slurm_count(name: str, value: str) -> int:
    """A whole number SLURM set (``SLURM_NNODES``, ``SLURM_NODEID``); one line when it is not one."""
    text = value.strip()
    if not (text.lstrip("-").isascii() and text.lstrip("-").isdecimal()) or len(text) > 9:
        raise NodesError(f"{name} {value!r}: not a whole number (SLURM sets it; is the job's environment damaged?)")
    return int(text)


def check(nodes: Nodes) -> Nodes:
    if nodes.nnodes < 1:
        raise NodesError(f"--nnodes {nodes.nnodes}: must be at least 1")
    if not 0 <= nodes.node_rank < nodes.nnodes:
        raise NodesError(f"--node-rank {nodes.node_rank}: must be 0..{nodes.nnodes - 1} for --nnodes {nodes.nnodes}")
    if nodes.multi and not nodes.endpoint:
        raise NodesError(f"--nnodes {nodes.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address, the same on "
                         "every node)")
    if nodes.multi and nodes.endpoint and int(nodes.endpoint.rpartition(":")[2]) + ATTEMPT_PORTS > 65536:
        raise NodesError(f"--rdzv-endpoint {nodes.endpoint}: the port and the {ATTEMPT_PORTS - 1} after it are used "
                         "(one per attempt); give a port below 65520")
    return nodes


def resolve(nnodes: int | None, node_rank: int | None, endpoint: str | None, rdzv_id: str | None,
            env: Mapping[str, str]) -> Nodes:
    """Flags win over SLURM; neither means one machine. Raises :class:`NodesError` with one line."""
    if nnodes is None and node_rank is None and endpoint is None:
        return from_slurm(env) or Nodes(rdzv_id=rdzv_id)
    nodes = Nodes(nnodes if nnodes is not None else 1, node_rank or 0,
                  _endpoint(endpoint) if endpoint else None, rdzv_id, "flags")
    return check(nodes)


def torchrun_flags(nodes: Nodes, master_port: int) -> list[str]:
    """torch.distributed.run's node and rendezvous flags. One node: a local store on ``master_port``. Several: the
    node's ``timeout`` bounds how long it waits in the rendezvous for the others (torchrun's default is 900 s)."""
    if not nodes.multi:
        return ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    assert nodes.endpoint is not None
    flags = ["--nnodes", str(nodes.nnodes), "--node-rank", str(nodes.node_rank), "--rdzv-backend", "static",
             "--rdzv-endpoint", nodes.endpoint]
    if nodes.rdzv_id:
        flags += ["--rdzv-id", nodes.rdzv_id]
    return flags + (["--rdzv-conf", f"timeout={nodes.timeout}"] if nodes.timeout else [])


def for_attempt(nodes: Nodes, attempt: int) -> Nodes:
    """The nodes of attempt ``attempt``: the endpoint's port plus ``(attempt - 1) % ATTEMPT_PORTS``, so a new attempt
    never meets the previous attempt's store or its socket in TIME_WAIT. Every node computes the same port."""
    if not nodes.multi or nodes.endpoint is None:
        return nodes
    host, _, port = nodes.endpoint.rpartition(":")
    return replace(nodes, endpoint=f"{host}:{int(port) + (attempt - 1) % ATTEMPT_PORTS}")


def run_name(name: str, named: bool, nodes: Nodes) -> str:
    """The run directory's name, the same on every node: ``--name`` as given, else ``NAME-RDZV_ID``; raises
    :class:`NodesError` when neither says which run this is (node 0 cannot number runs as ``train2`` the others
    would have to guess)."""
    if named:
        return name
    if nodes.rdzv_id:
        return f"{name}-{re.sub(r'[^A-Za-z0-9_.-]', '_', nodes.rdzv_id)}"
    raise NodesError(f"--nnodes {nodes.nnodes}: give --name or --rdzv-id (the run directory must have the same name "
                     "on every node)")
