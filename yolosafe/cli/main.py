"""The ``yolosafe`` command: a thin layer over the library.

Bad input ends in one line on stderr and exit status 2, never a traceback. Nothing here imports torch or
ultralytics: ``--help``, ``--dry-run`` and ``yolosafe gpus`` start in a fraction of a second; the training itself
happens in the worker process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from yolosafe import __version__, gpus, proc
from yolosafe.api import calls, trainrun
from yolosafe.cli import planview
from yolosafe.cli.params import BatchOrAuto, node_options
from yolosafe.errors import TrainingError, UsageError, YolosafeError
from yolosafe.exits import Exit
from yolosafe.planning import datasets, inputs, options, yolowords
from yolosafe.planning.validate import InputError
from yolosafe.readers import report
from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir
from yolosafe.supervisor.multinode import setup as multicli

D, SHAPES = options.DEFAULTS, datasets.SHAPES_DEFAULTS  # the help texts say the defaults these hold


def given_options(ctx: click.Context) -> dict[str, Any]:
    """The options typed on the command line (click's defaults are None: the real ones live in
    yolosafe.planning.options)."""
    return {k: v for k, v in ctx.params.items()
            if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="yolosafe")
def cli() -> None:
    """Train Ultralytics YOLO on one or many GPUs without dying of CUDA out-of-memory."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--model",
              help="Model YAML or weights. Default: {} if present here, else {}.".format(*options.DEFAULT_MODELS))
@click.option("--data", help="Dataset name from datasets.yaml, a data YAML path, or 'shapes' (built in).")
@click.option("--datasets", "datasets_file", help="Dataset registry (default: $YOLOSAFE_DATASETS or ./datasets.yaml).")
@click.option("--gpus", help="GPU ids '0,1,2,3', 'all', 'auto[:N]' or 'cpu'. Default: GPU 0 if there is one, else cpu.")
@click.option("--batch", type=BatchOrAuto(),
              help="Total batch over all GPUs (split evenly) or auto (also Ultralytics' -1; a fraction such as 0.7: "
                   f"auto filling that share of GPU memory). Default {D['batch']}.")
@click.option("--effective-batch", type=int, help="Images per optimizer step (Ultralytics nbs). Default: 64-ish.")
@click.option("--val-batch", type=int, help="Validation batch per GPU. Default: the per-GPU train batch.")
@click.option("--imgsz", type=int, help=f"Image size. Default {D['imgsz']} (shapes: {SHAPES['imgsz']}).")
@click.option("--epochs", type=int, help=f"Epochs. Default {D['epochs']} (shapes: {SHAPES['epochs']}).")
@click.option("--alloc-conf", help="PYTORCH_CUDA_ALLOC_CONF options merged over yours and the default.")
@click.option("--config", "config_file", help="YAML file with these options (flags override it).")
@click.option("--project", help=f"Parent folder of runs (as yolo train: relative to Ultralytics' runs/<task>). "
                                f"Default {D['project']}.")
@click.option("--name", help="Run name; an existing run is never overwritten (train, train2, ...).")
@click.option("--max-retries", type=int, help=f"Relaunches after an OOM. Default {D['max_retries']}.")
@click.option("--min-batch", type=int, help=f"Never halve below this per-GPU batch. Default {D['min_batch']}.")
@click.option("--watch-interval", type=float,
              help=f"Seconds between GPU memory samples; 0 = no watch. Default {D['watch_interval']}.")
@click.option("--warn-at", type=float,
              help=f"Warn when a GPU's used memory reaches this share of it. Default {D['warn_at']}.")
@click.option("--clear-before-val/--no-clear-before-val", default=None,
              help="Empty the CUDA cache on every rank right before validation. Default "
                   f"{'on' if D['clear_before_val'] else 'off'}.")
@click.option("--val-oom", type=click.Choice(["in-place", "relaunch"]),
              help="A validation OOM: the rank halves its own validation batch and validates again in place, or "
                   f"every rank is relaunched with half the validation batch. Default {D['val_oom']}.")
@click.option("--hang-timeout", type=float,
              help="Seconds without progress after which a rank is hung: its stacks kept, every rank stopped and "
                   "relaunched from the last checkpoint; 0 = no hang watch. Default: learnt from the run "
                   "(docs/hangs.md).")
@click.option("--max-hang-restarts", type=int,
              help=f"Relaunches after a hang. Default {D['max_hang_restarts']}.")
@click.option("--save-every",
              help="A step checkpoint inside the epoch every duration (10m) or iterations (500it), that any resume "
                   f"continues from; 0 = only the per-epoch saves. Default {D['save_every']} (under 1 % of the time).")
@click.option("--memory-fraction", type=float,
              help=f"--batch auto: share of the free GPU memory to fill. Default {D['memory_fraction']}.")
@click.option("--resume", "resume_dir",
              help="Continue the run in RUN_DIR from its newest checkpoint; 'auto': the run --name names if there "
                   "is one (a requeued job's same command), else a new run.")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan, environment and command; train nothing.")
@click.option("--download", is_flag=True, default=None,
              help="Let Ultralytics download a missing dataset or weights (once, before training). Default off.")
@node_options
@click.argument("args", nargs=-1)
@click.pass_context
def train(ctx: click.Context, resume_dir: str | None, dry_run: bool, **_: Any) -> None:
    """Train with OOM protection. Extra ARGS are Ultralytics train arguments as key=value (e.g. lr0=0.01)."""
    ended = calls.run_training(given_options(ctx), resume_dir, ctx.params, dry_run)
    if not ended.dry_run:
        try:
            calls.finish(ended)
        except TrainingError as exc:  # the supervisor has said how it ended
            sys.exit(exc.exit_code)


@cli.command("plan")
@click.option("--vram", help="Print the tier table for these GPU sizes in GiB instead (e.g. 8,12,24,48,80).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def plan_command(ctx: click.Context, vram: str | None, as_json: bool, datasets_file: str | None,
                 config_file: str | None, **_: Any) -> None:
    """Predict each GPU's train and validation memory for the same options as train; train nothing."""
    given = options.yolo_style(given_options(ctx))  # yolo train's own key=value names too
    opts = trainrun.resolve(given, config_file, datasets_file)
    where = multicli.resolve(ctx.params)  # --batch is the total over every node's GPUs
    opts = opts.replace(nnodes=where.nnodes)  # --batch auto over several nodes: refused there
    if vram:
        planview.print_tier_table(opts, vram, as_json, given.get("model"))
    else:  # a GPU in MIG mode is planned as the MIG device it stands for
        inventory = gpus.planning_inventory(gpus.read_inventory(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        planview.show(calls.plan_of(opts, inventory), as_json)


plan_command.params[:0] = [p for p in train.params if p.name not in ("resume_dir", "dry_run")]


@cli.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus_command(as_json: bool) -> None:
    """List the GPUs NVML sees (or the fake ones of YOLOSAFE_FAKE_GPUS), their memory and processes."""
    inventory = gpus.read_inventory()  # a bad YOLOSAFE_FAKE_GPUS is a UsageError
    if as_json:
        click.echo(json.dumps({
            "backend": inventory.backend, "driver": inventory.driver, "cuda": inventory.cuda,
            "problem": inventory.problem,
            "gpus": [g.as_dict() for g in inventory.gpus],
        }, indent=2))
        return
    if not inventory.gpus:
        click.echo(f"no GPU: {inventory.problem}; yolosafe train runs on CPU (--gpus cpu)", err=True)
        sys.exit(Exit.FAILED)
    click.echo(f"driver {inventory.driver}, CUDA {inventory.cuda} ({inventory.backend})")
    click.echo(f"{'GPU':>3}  {'name':<24} {'used MiB':>9} {'free MiB':>9} {'total MiB':>9} {'util':>5}  processes")
    for g in inventory.gpus:
        procs = ", ".join(f"{pr.pid}:{pr.used_mib:.0f}MiB" if pr.used_mib is not None else str(pr.pid)
                          for pr in g.processes) or "-"
        procs = f"invalid: {g.problem}" if g.problem else f"MIG on; {procs}" if g.mig else procs
        click.echo(f"{g.index:>3}  {(g.name or '?')[:24]:<24} {_num(g.used_mib):>9} {_num(g.free_mib):>9} "
                   f"{_num(g.total_mib):>9} {_num(g.utilization, '%'):>5}  {procs}")


@cli.command("report")
@click.argument("run_dir", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print memory_summary.json instead of the table.")
def report_command(run_dir: str | None, as_json: bool) -> None:
    """Memory peaks per GPU and phase of RUN_DIR (default: the latest run under ./runs); rewrites the summary and
    memory.png."""
    path = Path(run_dir) if run_dir else rundir.latest_run(Path("runs"))
    if path is None:
        raise InputError("no yolosafe run under ./runs; give the run directory: yolosafe report RUN_DIR")
    run = RunDir(path)
    if not run.is_run():
        raise InputError(f"{path}: not a yolosafe run directory (no {rundir.STORY})")
    if run.mark_if_orphaned():
        click.echo(f"yolosafe: {path}: its supervisor died while training; marked '{rundir.ORPHANED}'", err=True)
    state = report.outcome(run)
    hangs = report.hangs(run)
    for found in [] if as_json else hangs:  # said first: a hang has no memory figures of its own
        click.echo(f"{path}: {report.hang_line(found, report.epochs(run))}")
    for line in [] if as_json else [*report.stragglers(run), *report.redone(run)]:
        click.echo(f"{path}: {line}")
    try:
        summary = report.write(path)
    except report.NoMemoryData as exc:
        click.echo(f"yolosafe: no memory data in {path} (run {state}): {exc}", err=True)
        sys.exit(Exit.FAILED)
    if as_json:
        click.echo(json.dumps({**summary, "hangs": [h.to_dict() for h in hangs]}, indent=2))
        return
    click.echo(f"{path}: run {state}; GPU memory, NVML peaks (epochs 1-based); plot: {run.memory_plot}")
    for line in report.table(summary):
        click.echo(line)


@cli.command("doctor")
@click.argument("run_dir", required=False)
@click.option("--project", help="Where to look for the newest run when RUN_DIR is not given. Default ./runs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(run_dir: str | None, project: str | None, as_json: bool) -> None:
    """Explain GPU memory: the machine, the environment, a run (default: the newest), and what to do. Read-only."""
    from yolosafe.readers.doctor import diagnose
    from yolosafe.readers.doctor import text as doctor_text

    found = diagnose(run_dir, project)  # DoctorError is a UsageError
    click.echo(json.dumps(found.as_dict(), indent=2, default=str) if as_json else "\n".join(doctor_text.render(found)))


@cli.command("fix")
@click.option("--config", "config_file", help="A yolosafe train --config YAML to adapt to the run's OOMs.")
@click.option("--run", "run_dir", help="The run the config change is derived from. Default: the newest under ./runs.")
@click.option("--yes", is_flag=True, help="Accept what is provably safe without asking (stale yolosafe processes, "
                                          "the rc line, the config change).")
def fix_command(config_file: str | None, run_dir: str | None, yes: bool) -> None:
    """Propose repairs one by one (y/N, default No; no terminal means No unless --yes); back up what it edits."""
    from yolosafe.repair import proposals as fixes

    sys.exit(fixes.main(config_file, run_dir, yes))  # FixUsageError is a UsageError


def _num(value: float | None, suffix: str = "") -> str:
    return "?" if value is None else f"{value:.0f}{suffix}"


ULTRALYTICS_ENTRY = "import sys; from ultralytics.cfg import entrypoint; sys.exit(entrypoint())"


def route(argv: list[str]) -> list[str] | None:
    """The command line as yolosafe runs it, or None when it is another ``yolo`` command (``val``, ``predict``,
    ``export``, ``checks``, ``detect val``...), run by Ultralytics' own entry point. ``yolosafe TASK train ...`` and
    ``yolosafe train TASK ...`` are trainings (the task word is read with the others)."""
    if not argv:
        return ["--help"]
    first = argv[0]
    if first in ("train", "plan"):
        return [first, *_merged(argv[1:])]
    if first in cli.commands or first.startswith("-"):
        return argv
    if first in yolowords.TASKS:
        rest = argv[1:]
        mode = next((w for w in rest if w in yolowords.MODES), None)
        if mode == "train" or (mode is None and "mode=train" in rest):
            return ["train", first, *_merged([w for w in rest if w != "train"])]
        return None
    if "=" in first and ("train" in argv or "mode=train" in argv):  # yolo model=... mode=train
        return ["train", *_merged([w for w in argv if w != "train"])]
    ultralytics = {*yolowords.MODES, *yolowords.SPECIAL, *(w.removesuffix("s") for w in yolowords.SPECIAL)}
    return None if first.lower() in ultralytics or "=" in first else argv


def _merged(words: list[str]) -> list[str]:
    """``--imgsz= 160`` (Ultralytics' spacing, on a word that is also a yolosafe flag) as ``--imgsz=160`` for click;
    the other words' spacing is read with them (:func:`yolowords.merge_equals_args`)."""
    out: list[str] = []
    for word in words:
        if out and out[-1].startswith("--") and out[-1].endswith("=") and not word.startswith("-") and "=" not in word:
            out[-1] += word
        else:
            out.append(word)
    return out


def run_ultralytics(argv: list[str]) -> None:
    """Ultralytics' own ``yolo`` in this process's place: the same output and exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", ULTRALYTICS_ENTRY, *argv])


def main(argv: list[str] | None = None) -> None:
    """Entry point: the library's exceptions as one line and an exit status; click's own usage errors are reduced to
    one line, like ours; both exit with status 2. A stop (Ctrl-C, SIGTERM, a closed terminal's SIGHUP) before the
    run's supervisor handles it ends the input check's child and exits 130 with one line. Other ``yolo`` commands are
    Ultralytics' (:func:`route`)."""
    proc.handle_stops()  # first: from here on, no stop is ignored or silent
    try:
        _main(argv)
    except KeyboardInterrupt as exc:  # a stop before the run's supervisor had its own handlers
        _stopped(exc)
    except click.exceptions.Abort as exc:  # click's name for a KeyboardInterrupt it saw
        _stopped(exc.__cause__ or exc)
    except OSError as exc:  # a deleted working directory, stdout on a full device, a closed terminal
        _say(f"yolosafe: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        proc.silence(sys.stdout)
        sys.exit(Exit.FAILED)
    except SystemExit:
        _flush_or_fail()
        raise
    _flush_or_fail()


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = route(argv)
    if words is None:
        run_ultralytics(argv)
    argv = words
    try:
        _check_cwd(argv)
        with cli.make_context("yolosafe", list(argv)) as ctx:  # not cli.main: a stop is ours to say, in one line
            cli.invoke(ctx)
    except UsageError as exc:
        _say(f"yolosafe: error: {_unprefixed(str(exc))}")
        sys.exit(Exit.USAGE)
    except YolosafeError as exc:
        _say(f"yolosafe: {_unprefixed(str(exc))}")
        sys.exit(Exit.FAILED)
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        _say(f"yolosafe: error: {where}{exc.format_message()}")
        sys.exit(Exit.USAGE)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def _unprefixed(text: str) -> str:
    """One ``yolosafe:`` prefix: a message that carries its own loses it."""
    while text.startswith(("yolosafe: error: ", "yolosafe: ")):
        text = text.removeprefix("yolosafe: ").removeprefix("error: ")
    return text


def _say(line: str) -> None:
    """One line on stderr, cut to a readable length (a 20 MB value stays in no message)."""
    try:
        click.echo(line if "\n" in line else inputs.shorten(line), err=True)
    except OSError:
        proc.silence(sys.stderr)


def _stopped(exc: BaseException) -> None:
    _say(f"yolosafe: stopped by {proc.stop_name(exc)} before the run started; nothing was trained")
    sys.exit(Exit.INTERRUPTED)


def _check_cwd(argv: list[str]) -> None:
    """A working directory deleted under the shell: every relative path would fail later, each in its own way."""
    if argv[:1] and argv[0] in ("train", "plan", "report", "doctor", "fix"):
        try:
            os.getcwd()
        except OSError as exc:
            raise UsageError(f"the working directory is gone ({exc.strerror}); cd to an existing folder") from None


def _flush_or_fail() -> None:
    """What the command printed reaches its stdout, or one line says why not (``> /dev/full``), exit 1."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        proc.silence(sys.stdout)
        _say(f"yolosafe: cannot write the output: {exc.strerror or exc}")
        sys.exit(Exit.FAILED)


if __name__ == "__main__":
    main()
