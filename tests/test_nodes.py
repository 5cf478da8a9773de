"""Multi-node options: SLURM variables and flags to torchrun's node and rendezvous flags (pure, no processes)."""

from __future__ import annotations

import pytest

from yolosafe.planning.nodes import Nodes, NodesError, first_host, from_slurm, resolve, torchrun_flags


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node01", "node01"),
        ("gpu[07-10,12]", "gpu07"),
        ("gpu[007-010],cpu3", "gpu007"),
        ("a1-[3-4]", "a1-3"),
        ("n[5]", "n5"),
        ("alpha,beta", "alpha"),
        ("r[1-2]n[01-04]", "r1n01"),  # two ranges: SLURM's order, the last one fastest
        ("node[001-004]-ib", "node001-ib"),  # a suffix after the range (the InfiniBand names)
        ("nid[00001-00004,00010]", "nid00001"),  # HPE/Cray
        ("x1000c[0-1]s0b0n[0-1]", "x1000c0s0b0n0"),  # HPE/Cray EX: cabinet, chassis, slot, board, node
        (" gpu[3-4] ", "gpu3"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_first_host_rejects_garbage() -> None:
    with pytest.raises(NodesError, match="SLURM_JOB_NODELIST"):
        first_host("[x-y]")
    with pytest.raises(NodesError, match="SLURM_JOB_NODELIST"):
        first_host("gpu[4-2]")


SLURM = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}


def test_slurm_variables_resolve_to_nodes() -> None:
    nodes = from_slurm(SLURM)
    assert nodes == Nodes(2, 1, "gpu07:32956", "123456", "slurm")  # 29500 + 123456 % 10000
    assert torchrun_flags(nodes, 0) == ["--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "static",
                                        "--rdzv-endpoint", "gpu07:32956", "--rdzv-id", "123456"]


def test_slurm_master_port_wins_and_one_node_jobs_are_single() -> None:
    assert from_slurm({**SLURM, "MASTER_PORT": "40000"}).endpoint == "gpu07:40000"
    assert from_slurm({**SLURM, "SLURM_NNODES": "1"}) is None
    assert from_slurm({}) is None
    with pytest.raises(NodesError, match="srun"):
        from_slurm({"SLURM_NNODES": "2"})


def test_flags_win_over_slurm() -> None:
    nodes = resolve(2, 0, "10.1.2.3:29400", "job7", SLURM)
    assert (nodes.nnodes, nodes.node_rank, nodes.endpoint, nodes.rdzv_id, nodes.source) == (
        2, 0, "10.1.2.3:29400", "job7", "flags")
    assert resolve(None, None, None, None, SLURM).source == "slurm"
    assert resolve(None, None, None, None, {}) == Nodes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2, 2, "h:1", None), "--node-rank 2: must be 0..1"),
        ((2, None, None, None), "needs --rdzv-endpoint"),
        ((0, None, None, None), "--nnodes 0"),
        ((2, 0, "host:notaport", None), "expected HOST:PORT"),
        ((2, 0, "host:70000", None), "expected HOST:PORT"),
    ],
)
def test_bad_node_options_are_one_line(args: tuple, message: str) -> None:
    with pytest.raises(NodesError, match=message):
        resolve(*args, {})


def test_endpoint_without_port_gets_torchruns_default() -> None:
    assert resolve(2, 1, "node0", None, {}).endpoint == "node0:29500"


def test_world_size_and_global_ranks_over_nodes() -> None:
    nodes = Nodes(3, 2, "h:1")
    assert nodes.world_size(4) == 12
    assert nodes.first_rank(4) == 8
    assert Nodes().world_size(0) == 1
    assert torchrun_flags(Nodes(), 29555) == ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", "29555"]
