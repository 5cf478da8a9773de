"""The rank launcher process: ``python -m yolosafe.training.launcher <torchrun arguments>``.

torch.distributed.run's own argument parser and ``run()``, plus one thing the command line tool cannot do: when ranks
fail, it turns torch's structured failure list (``ChildFailedError.failures``: rank, exit code, signal, error file)
into failure records for the ranks that could not write their own (a rank killed by a signal), so the supervisor can
say "rank 1 was killed by SIGKILL". It writes them into the run directory of the run spec whose path follows
``-m yolosafe.training.worker`` in its own arguments. The command line itself is built by the supervisor
(:mod:`yolosafe.supervisor.launchcmd`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from yolosafe.exits import Exit
from yolosafe.rundir.runspec import RunSpec

WORKER = "yolosafe.training.worker"  # the module every rank runs, with the run spec's path as its one argument


def worker_spec(args: Any) -> RunSpec | None:
    """The run spec of the ranks, from torch.distributed.run's parsed arguments: its path follows
    ``-m yolosafe.training.worker``. None when the ranks run something else."""
    if not (args.module and args.training_script == WORKER and args.training_script_args):
        return None
    return RunSpec.load(Path(args.training_script_args[0]))


def record_failures(failures: dict[int, Any], spec: RunSpec) -> None:
    """Failure records for ranks that died without writing their own (killed by a signal, or before the trainer),
    in the run directory of ``spec``'s attempt."""
    from yolosafe import oom
    from yolosafe.rundir.records import Failure, save_failure

    run = spec.run
    for rank, failure in failures.items():
        if run.failure(spec.attempt, rank).exists():
            continue
        signal_name = failure.signal_name() if failure.exitcode < 0 else None
        message = _error_message(failure)
        if signal_name:
            message = f"rank {rank} was killed by {signal_name}"
        save_failure(run, Failure.new(
            t=failure.timestamp, oom=oom.is_oom_text(message), error=signal_name or "exit", message=message,
            signal=signal_name, exit_code=failure.exitcode, rank=rank, gpu=failure.local_rank, pid=failure.pid,
            attempt=spec.attempt, error_file=failure.error_file, by="launcher",
        ))


def _error_message(failure: Any) -> str:
    """The first line of the rank's error file (its exception), else its exit code."""
    data = failure.error_file_data or {}
    text = str((data.get("message") or {}).get("message", "") if isinstance(data.get("message"), dict)
               else data.get("message", ""))
    return text.strip().splitlines()[0][:2000] if text.strip() else f"exited with status {failure.exitcode}"


class LineTee:
    """torch.distributed.run's tee of each rank's log file to the console, with every line end kept as written: a
    progress bar's ``\r`` redraw stays a redraw (torch's own reads the files with universal newlines, which turns
    each one into a new line). The rank's prefix begins each line, and a piece of a line when another file's lines
    came in between, so every piece of the console's output says whose it is."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: str | None = None  # the prefix of the last piece written

    def tail(self, header: str, file: str, dst: Any, finished: Any, interval_sec: float,
             log_line_filter: Any = None) -> None:
        """:func:`torch.distributed.elastic.multiprocessing.tail_log.tail_logfile`'s signature and job."""
        while not os.path.exists(file):
            if finished.is_set():
                return
            time.sleep(interval_sec)
        at_start = True
        with open(file, errors="replace", newline="") as fp:
            while True:
                piece = fp.readline()
                if not piece:
                    if finished.is_set():
                        return
                    time.sleep(interval_sec)
                    continue
                if log_line_filter is None or log_line_filter(piece):
                    with self.lock:
                        dst.write(f"{header}{piece}" if at_start or self.last != header else piece)
                        dst.flush()
                        self.last = header
                at_start = piece.endswith(("\n", "\r"))


def keep_line_ends() -> None:
    """Make torch.distributed.run's console tee a :class:`LineTee` (where its tail function is the one this was
    written against; else its own stays)."""
    from torch.distributed.elastic.multiprocessing import tail_log

    if callable(getattr(tail_log, "tail_logfile", None)):
        tail_log.tail_logfile = LineTee().tail


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from yolosafe import proc

    proc.reset_inherited_signals()
    proc.exit_with_parent()
    keep_line_ends()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        spec = worker_spec(args)
        if spec is not None:
            record_failures(exc.failures, spec)
        print(exc.format_msg(), file=sys.stderr, flush=True)  # the log's: the supervisor's terminal drops it
        raise SystemExit(Exit.FAILED) from None
    except SignalException as exc:  # Ctrl-C/SIGTERM: torch.distributed.run has stopped the ranks; no traceback
        print(f"yolosafe: rank launcher stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(exc.sigval)) from None


if __name__ == "__main__":
    main()
