"""yolosafe's exceptions: one hierarchy for the library, mapped onto exit statuses by the command line.

::

    YolosafeError
    ├── UsageError                      bad input, refused before a run directory exists or a worker starts
    │                                   (str() is the command line's one line)
    └── TrainingError                   a run that started and did not complete; ``.run`` is its yolosafe.Run
        ├── OutOfMemoryRetriesExhausted still out of memory after the retries, or at the minimum batch
        ├── TrainingFailed              failed for another reason than an OOM, or a rank was killed
        └── TrainingInterrupted         stopped by Ctrl-C, SIGTERM, SIGUSR1 or a notebook's interrupt; also a
                                        KeyboardInterrupt, so ``except KeyboardInterrupt`` catches it

The input errors of the subpackages (``InputError``, ``PlanError``, ``DatasetError``, ``InjectionError``, the input
check's ``Refused``...) are ``UsageError`` subclasses. ``UsageError`` is also a ``ValueError``, as they were before.
Every other exception class yolosafe defines derives from ``YolosafeError`` too, keeping the built-in base it had
(``RecordError`` and the ``fix`` errors are ``ValueError`` subclasses, ``GPUReadError`` a ``RuntimeError``,
``CompatError`` an ``AssertionError``); a stop is no error: ``proc.Stopped`` (SIGTERM, SIGHUP) is a
``KeyboardInterrupt``, as Ctrl-C is. ``tests/test_imports.py`` checks it for every class in the package.
"""

from __future__ import annotations

from typing import Any

from yolosafe.exits import Exit


class YolosafeError(Exception):
    """Anything yolosafe raises on purpose."""


class UsageError(YolosafeError, ValueError):
    """Bad input; ``str()`` is the one line the user sees."""


class TrainingError(YolosafeError):
    """A run that started and did not complete. ``run`` is its :class:`yolosafe.Run` (the run directory, the
    attempts, how it ended); ``exit_code`` the command line's exit status for it."""

    exit_code = Exit.FAILED

    def __init__(self, message: str, run: Any) -> None:
        super().__init__(message)
        self.run = run


class OutOfMemoryRetriesExhausted(TrainingError):
    """Still out of GPU memory after the allowed relaunches, or at the minimum batch."""

    exit_code = Exit.OOM_EXHAUSTED


class TrainingFailed(TrainingError):
    """The training failed for another reason than an OOM (not retried), or a rank was killed."""

    exit_code = Exit.FAILED


class TrainingInterrupted(TrainingError, KeyboardInterrupt):
    """Stopped by Ctrl-C, SIGTERM or a notebook kernel's interrupt; every rank was stopped first. Resumable:
    ``yolosafe.train(resume=run.run_dir)``."""

    exit_code = Exit.INTERRUPTED
