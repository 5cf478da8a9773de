"""The states of an attempt and of a run: one enum, its transitions, and the exit status each end gives.

An attempt is ``running`` from the moment its record is appended to ``yolosafe.json`` until its child ends; it then
takes one end state. The run's ``outcome`` is its last attempt's state, until the attempt loop decides: an ``oom`` or
a ``hung`` attempt is followed by another (``running`` again) or ends the run as ``oom_exhausted`` / ``hung``; every
other end of an attempt is the run's end. ``abandoned`` is given by the next reader to a run (and its attempt) left
``running`` by a supervisor that died. The values are those of the story's file: a story written by an older yolosafe
reads the same.

::

    running ──▶ completed | failed | killed | interrupted            the run's end
    running ──▶ oom  ──▶ running (a smaller plan) | oom_exhausted    (the retries or the minimum batch ran out)
    running ──▶ hung ──▶ running (the same plan)  | hung             (no relaunch left)
    running ──▶ abandoned                                            (the supervisor died; marked by a reader)
    interrupted | abandoned | failed | killed | hung ──▶ running     (``train --resume``)
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from yolosafe.exits import Exit
from yolosafe.rundir.files import ORPHANED


class Outcome(str, Enum):
    """How an attempt, or the whole run, is or ended (``outcome`` in ``yolosafe.json``); the values are the file's."""

    RUNNING = "running"  # the attempt's child runs; the run's outcome while its supervisor lives
    COMPLETED = "completed"
    OOM = "oom"  # an attempt that ran out of GPU memory (the run goes on with a smaller batch)
    FAILED = "failed"  # not an OOM: not retried
    KILLED = "killed"  # a rank or the worker was killed by a signal (kill -9, the kernel's OOM killer)
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM to yolosafe
    HUNG = "hung"  # a rank made no progress within its timeout: stacks kept, every rank stopped (relaunched)
    OOM_EXHAUSTED = "oom_exhausted"  # the run's outcome when the retries or the minimum batch ran out
    ABANDONED = ORPHANED  # the run's supervisor died while it said "running" (marked by the next reader)

    def __str__(self) -> str:
        return self.value

    @property
    def exit_status(self) -> Exit:
        """What ``yolosafe train`` exits with when the run ends in this state."""
        return EXIT_STATUS.get(self, Exit.FAILED)

    @property
    def retried(self) -> bool:
        """An attempt's end after which the attempt loop may start another attempt by itself."""
        return self in (Outcome.OOM, Outcome.HUNG)

    def may_become(self, then: Outcome) -> bool:
        """Whether a record in this state may next say ``then`` (:data:`TRANSITIONS`)."""
        return then in TRANSITIONS[self]


EXIT_STATUS: Mapping[Outcome, Exit] = MappingProxyType({
    Outcome.COMPLETED: Exit.OK, Outcome.OOM_EXHAUSTED: Exit.OOM_EXHAUSTED, Outcome.INTERRUPTED: Exit.INTERRUPTED,
})  # any other end of a run: Exit.FAILED

_RESUMABLE = frozenset({Outcome.RUNNING})  # what a stopped or broken run becomes again under ``train --resume``
TRANSITIONS: Mapping[Outcome, frozenset[Outcome]] = MappingProxyType({
    Outcome.RUNNING: frozenset({Outcome.COMPLETED, Outcome.OOM, Outcome.FAILED, Outcome.KILLED, Outcome.INTERRUPTED,
                                Outcome.HUNG, Outcome.ABANDONED}),
    Outcome.OOM: frozenset({Outcome.RUNNING, Outcome.OOM_EXHAUSTED, Outcome.INTERRUPTED}),
    Outcome.HUNG: frozenset({Outcome.RUNNING, Outcome.INTERRUPTED}),  # a run that ends hung stays so
    Outcome.COMPLETED: frozenset(),
    Outcome.OOM_EXHAUSTED: _RESUMABLE,
    Outcome.FAILED: _RESUMABLE,
    Outcome.KILLED: _RESUMABLE,
    Outcome.INTERRUPTED: _RESUMABLE,
    Outcome.ABANDONED: _RESUMABLE,
})
