"""The machines of a run, behind one interface: :class:`OneMachine` here, :class:`~yolosafe.supervisor.multinode.
agree.MultiNode` over several. The supervisor asks the same questions of either (join, the launch's shape, the watch
during an attempt, how an attempt ended, the resume command), so it has no branch of its own per case."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from yolosafe.planning.nodes import Nodes
from yolosafe.proc import AttemptResult, ProcessTree
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import load_failures
from yolosafe.rundir.runspec import RunSpec
from yolosafe.supervisor.hangwatch import found_in, hung_end
from yolosafe.supervisor.policy import AttemptEnd, classify

OnStart = Callable[[ProcessTree], None]


class Machines(Protocol):
    """What the supervisor asks of the machines of its run."""

    @property
    def node(self) -> int: ...

    def start(self) -> str | None: ...

    def stop(self, outcome: str | None) -> None: ...

    def runs_here(self, spec: RunSpec) -> bool: ...

    def resume_flags(self) -> str: ...

    def launch_shape(self, spec: RunSpec) -> tuple[Nodes, int]: ...

    def watch(self, attempt: int, then: OnStart | None) -> OnStart | None: ...

    def agree(self, attempt: int, result: AttemptResult, log_tail: str) -> AttemptEnd: ...


@dataclass(frozen=True)
class OneMachine:
    """A run on this machine alone: nothing to join, nobody to wait for, the attempt's end read from its own ranks'
    failure records."""

    run: RunDir  # the run directory (node 0's view: one machine)

    @property
    def node(self) -> int:
        return self.run.node

    def start(self) -> str | None:
        return None

    def stop(self, outcome: str | None) -> None:
        return None

    def runs_here(self, spec: RunSpec) -> bool:
        return True

    def resume_flags(self) -> str:
        return ""

    def launch_shape(self, spec: RunSpec) -> tuple[Nodes, int]:
        """(the nodes, ranks on this node): one node, every rank of the attempt."""
        return Nodes(), spec.world_size

    def watch(self, attempt: int, then: OnStart | None) -> OnStart | None:
        return then

    def agree(self, attempt: int, result: AttemptResult, log_tail: str) -> AttemptEnd:
        """A hang the watch recorded (it stopped the ranks: their errors follow from it), else the classifier's."""
        hang = found_in(self.run, attempt) if result.exit_code != 0 and not result.interrupted else None
        return hung_end(hang) if hang else classify(result, load_failures(self.run, attempt), log_tail)
