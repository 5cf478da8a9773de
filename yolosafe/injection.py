"""What the fault injections (``oom``, ``hang``) share: whether the rank and the node an injection names exist."""

from __future__ import annotations

from yolosafe.errors import UsageError


def check_place(env: str, rank: int, node: int | None, world_size: int, nnodes: int, error: type[UsageError]) -> None:
    """``error`` (one line) when ``node`` is not one of the run's nodes, or ``rank`` not one of its ranks: of every node
    when ``node`` is None, else of each node (``world_size`` counts the ranks of every node)."""
    if node is not None and node >= nnodes:
        nodes = "node 0" if nnodes == 1 else f"nodes 0-{nnodes - 1}"
        raise error(f"{env}: node={node} does not exist: this run has {nodes}")
    ranks_here = world_size // max(nnodes, 1) if node is not None else world_size
    if rank >= ranks_here:
        ranks = "rank 0" if ranks_here == 1 else f"ranks 0-{ranks_here - 1}"
        per_node = " on each node" if node is not None else ""
        raise error(f"{env}: rank={rank} does not exist: this run has {ranks}{per_node}")
