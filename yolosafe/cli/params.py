"""Click parameter types of yolosafe's options, and the options several commands share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from yolosafe.planning.memory.planner import AUTO


class BatchOrAuto(click.ParamType):
    """``--batch``: an integer or ``auto``; Ultralytics' ``-1`` and fractions (``0.7``) too
    (:func:`yolosafe.planning.options.yolo_batch` says what they mean)."""

    name = "integer|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | float | str:
        if isinstance(value, (int, float)) or str(value).strip().lower() == AUTO:
            return value if isinstance(value, (int, float)) else AUTO
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'auto'", param, ctx)


NODE_OPTIONS = (
    click.option("--nnodes", type=int, help="Machines in the run; run yolosafe train on each. Default 1 (SLURM: its)."),
    click.option("--node-rank", type=int, help="This machine: 0..nnodes-1; node 0 holds rank 0 and the rendezvous."),
    click.option("--rdzv-endpoint", help="HOST:PORT of node 0 (the same on every node); attempts use PORT, PORT+1..."),
    click.option("--rdzv-id", help="The job's id; names the run directory NAME-ID on every node. SLURM: the job id."),
    click.option("--rdzv-timeout", type=int, help="Seconds a node waits for the others to join. Default 300."),
)


def node_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The multi-node options of ``train`` (and so of ``plan``, which takes train's options)."""
    for option in reversed(NODE_OPTIONS):
        command = option(command)
    return command
