"""Exit statuses: one table for ``yolosafe train`` and the processes it starts (worker, launcher, ranks).

The CLI and the worker share it so that a number means one thing wherever it appears; README's table is this one.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """What a yolosafe process's exit status says."""

    OK = 0  # training (or the final validation) completed
    FAILED = 1  # training failed for another reason than an OOM, or a rank was killed; see train.log
    USAGE = 2  # bad input: one line on stderr, nothing started, no run directory made
    OOM_EXHAUSTED = 3  # still out of memory after --max-retries relaunches, or at --min-batch
    SETUP = 4  # worker only: the model or the dataset could not be loaded (yolosafe train then exits FAILED)
    INTERRUPTED = 130  # stopped by Ctrl-C or SIGTERM (128 + SIGINT); resumable with --resume
