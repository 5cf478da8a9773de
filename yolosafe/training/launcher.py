"""The rank launcher process: ``python -m yolosafe.training.launcher <torchrun arguments>``.

torch.distributed.run's own argument parser and ``run()``, plus one thing the command line tool cannot do: when ranks
fail, it turns torch's structured failure list (``ChildFailedError.failures``: rank, exit code, signal, error file)
into failure records for the ranks that could not write their own (a rank killed by a signal), so the supervisor can
say "rank 1 was killed by SIGKILL". It writes them into the run directory of the run spec whose path follows
``-m yolosafe.training.worker`` in its own arguments. The command line itself is built by the supervisor
(:mod:`yolosafe.supervisor.launchcmd`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from yolosafe.exits import Exit
from yolosafe.rundir.layout import RunDir
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

    run_dir = Path(spec.run_dir)
    for rank, failure in failures.items():
        if RunDir(run_dir).failure(spec.attempt, rank).exists():
            continue
        signal_name = failure.signal_name() if failure.exitcode < 0 else None
        message = _error_message(failure)
        if signal_name:
            message = f"rank {rank} was killed by {signal_name}"
        save_failure(run_dir, Failure.new(
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


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from yolosafe import proc

    proc.reset_inherited_signals()
    proc.exit_with_parent()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        spec = worker_spec(args)
        if spec is not None:
            record_failures(exc.failures, spec)
        print(exc.format_msg(), file=sys.stderr, flush=True)
        raise SystemExit(Exit.FAILED) from None
    except SignalException as exc:  # Ctrl-C/SIGTERM: torch.distributed.run has stopped the ranks; no traceback
        print(f"yolosafe: rank launcher stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(exc.sigval)) from None


if __name__ == "__main__":
    main()
