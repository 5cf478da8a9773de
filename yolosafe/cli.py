"""The ``yolosafe`` command: a thin layer over the library.

Bad input ends in one line on stderr and exit status 2, never a traceback. Nothing here imports torch or
ultralytics: ``--help``, ``--dry-run`` and ``yolosafe gpus`` start in a fraction of a second; the training itself
happens in the worker process.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from yolosafe import (
    __version__,
    allocator,
    datasets,
    gpus,
    history,
    launch,
    memmodel,
    multicli,
    nodes,
    oom,
    plan,
    planner,
    planview,
    report,
    resume,
    rundir,
    supervise,
    terminal,
    validate,
)

EXIT_USAGE = 2
DEFAULTS: dict[str, Any] = {
    "model": None,  # yolov8n.pt when present in the working directory, else yolov8n.yaml (built, never downloaded)
    "data": datasets.SHAPES,
    "gpus": None,
    "batch": 16,
    "effective_batch": None,
    "val_batch": None,
    "imgsz": 640,
    "epochs": 100,
    "alloc_conf": None,
    "project": "runs/detect",
    "name": "train",
    "max_retries": 3,
    "min_batch": 1,
    "watch_interval": 0.1,
    "warn_at": 0.9,
    "clear_before_val": True,
    "memory_fraction": 0.85,  # --batch auto: the share of the smallest free GPU memory the predicted peaks may fill
    "args": [],
}


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


def fail(message: str) -> None:
    raise UsageError(message)


def default_model() -> str:
    return "yolov8n.pt" if Path("yolov8n.pt").is_file() else "yolov8n.yaml"


def load_config(path: str | None) -> dict[str, Any]:
    """``--config FILE.yaml``: the same keys as the options (dashes or underscores), plus ``args:`` for Ultralytics."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        fail(f"--config {path}: {exc.strerror}")
    except yaml.YAMLError as exc:
        fail(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})")
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a mapping of option names to values")
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        fail(f"--config {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(DEFAULTS))}")
    if isinstance(config.get("gpus"), (list, tuple, int)):
        gpu_list = config["gpus"] if isinstance(config["gpus"], (list, tuple)) else [config["gpus"]]
        config["gpus"] = ",".join(map(str, gpu_list))
    if isinstance(config.get("args"), dict):
        config["args"] = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in config["args"].items()]
    return config


def resolve_options(ctx: click.Context, config: dict[str, Any], dataset_defaults: dict[str, Any]) -> dict[str, Any]:
    """Precedence, highest first: command-line flags, --config file, the dataset's registry entry, built-in defaults."""
    resolved = {}
    for key, default in DEFAULTS.items():
        given = key in ctx.params and ctx.get_parameter_source(key) is not click.core.ParameterSource.DEFAULT
        if given:
            resolved[key] = ctx.params[key]
        elif key in config:
            resolved[key] = config[key]
        elif key in dataset_defaults:
            resolved[key] = dataset_defaults[key]
        else:
            resolved[key] = default
    if ctx.params.get("args"):
        resolved["args"] = [*config.get("args", []), *ctx.params["args"]]
    return resolved


WATCH_KEYS = ("watch_interval", "warn_at", "clear_before_val")


def check_watch(options: dict[str, Any]) -> None:
    """--watch-interval 0 turns the watch off; faster than 100 Hz buys nothing and costs CPU."""
    try:
        interval, warn_at = float(options["watch_interval"]), float(options["warn_at"])
    except (TypeError, ValueError):
        fail(f"watch-interval {options['watch_interval']!r} / warn-at {options['warn_at']!r}: expected numbers")
    if interval != 0 and not 0.01 <= interval <= 60:
        fail(f"--watch-interval {interval:g}: give seconds between 0.01 and 60, or 0 to turn the memory watch off")
    if not 0 < warn_at <= 1:
        fail(f"--warn-at {warn_at:g}: give a share of GPU memory above 0 and at most 1 (e.g. 0.9)")


def check_inputs(options: dict[str, Any]) -> None:
    """Everything the worker or Ultralytics would otherwise find out only after a run directory exists."""
    validate.check_options(options)
    validate.check_model(options["model"] or default_model())
    validate.check_data(options["data_yaml"])


def build(options: dict[str, Any], inventory: gpus.Inventory) -> plan.TrainPlan:
    try:
        visible = gpus.visible_ids(inventory, os.environ.get("CUDA_VISIBLE_DEVICES"))
        selected = plan.parse_gpus(
            None if options["gpus"] is None else str(options["gpus"]), visible, inventory.problem
        )
        for bad in (g for g in inventory.gpus if g.index in selected and not g.valid):
            raise plan.PlanError(f"GPU {bad.index}: {bad.problem}; choose other GPUs with --gpus (see yolosafe gpus)")
        built = plan.build_plan(
            model=options["model"] or default_model(),
            data=options["data_yaml"],
            gpus=selected,
            batch=int(options["batch"]),
            effective_batch=options["effective_batch"],
            val_batch=options["val_batch"],
            imgsz=int(options["imgsz"]),
            epochs=int(options["epochs"]),
            extra=plan.parse_passthrough(options["args"]),
            train_images=datasets.count_images(Path(options["data_yaml"])),
            nnodes=int(options.get("nnodes") or 1),  # multi-node: --batch is the total over every node's GPUs
        )
    except plan.PlanError as exc:
        hidden = len(visible) < len(inventory.ids)
        fail(f"{exc} (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" if hidden else str(exc))
    validate.check_ultralytics_args(built.extra)  # after the unknown and yolosafe-owned keys were refused
    return built


def next_run_name(project: Path, name: str) -> Path:
    """Where ``new_run_dir`` would put the run, without creating it (for the dry run)."""
    n = 1
    while (project / (name if n == 1 else f"{name}{n}")).exists():
        n += 1
    return project / (name if n == 1 else f"{name}{n}")


def print_dry_run(p: plan.TrainPlan, env: dict[str, str], run_dir: Path, simulated: bool,
                  resume_from: Path | None = None, attempt: int = 1, where: nodes.Nodes | None = None) -> None:
    gpus_text = f"{p.device}  ({len(p.gpus)} GPU{'s' if len(p.gpus) != 1 else ''})" if p.gpus else "cpu"
    if simulated:
        gpus_text += "  [fake GPUs: each one a rank process on the CPU]" if len(p.gpus) > 1 else "  [fake GPU: on CPU]"
    spec_file = rundir.spec_path(run_dir, attempt)
    command = [sys.executable, "-m", "yolosafe.worker", str(spec_file)]
    if p.world_size > 1:  # the port is picked again at launch
        ranks = launch.Launch(p.world_size, launch.free_port(), rundir.ranks_log_dir(run_dir, attempt))
        command = launch.command(sys.executable, ranks, spec_file)
    if where is not None and where.multi:  # multi-node hook: this node's ranks and files
        command = multicli.dry_run_command(p, where, run_dir, attempt)
    device, visible = supervise.launch_device(p, simulated)
    child_env = {k: env[k] for k in allocator.ENV_VARS} | ({"CUDA_VISIBLE_DEVICES": visible} if visible else {})
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in child_env.items())
    lines = [
        ("model", p.model),
        ("data", p.data),
        ("device", gpus_text),
        *(multicli.dry_run_lines(p, where) if where is not None and where.multi else []),
        ("batch", f"{p.batch} total = {p.per_gpu_batch} per GPU"),
        ("effective batch", f"nbs {p.effective_batch} -> accumulate {p.accumulate} "
                            f"(Ultralytics: round(nbs / batch)) = {p.real_effective_batch} per optimizer step"),
        ("accumulation", plan.describe_accumulation(p)),
        ("val batch", f"{p.val_batch} per GPU"),
        ("imgsz / epochs", f"{p.imgsz} / {p.epochs}"),
        ("allocator", f"PYTORCH_CUDA_ALLOC_CONF={env['PYTORCH_CUDA_ALLOC_CONF']}"),
        ("run dir", f"{run_dir} (resumed from {resume_from}; nothing trained by a dry run)" if resume_from
         else f"{run_dir} (not created by a dry run)"),
        ("train kwargs", json.dumps(p.train_kwargs() | {"device": device}, sort_keys=True)),
        ("child command", f"{prefix} {shlex.join(command)}"),
    ]
    click.echo("yolosafe train --dry-run")
    for label, value in lines:
        click.echo(f"  {label:<16} {value}")
    for note in plan.plan_warnings(p):
        click.echo(f"  note: {note}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="yolosafe")
def cli() -> None:
    """Train Ultralytics YOLO on one or many GPUs without dying of CUDA out-of-memory."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--model", help="Model YAML or weights. Default: yolov8n.pt if present here, else yolov8n.yaml.")
@click.option("--data", help="Dataset name from datasets.yaml, a data YAML path, or 'shapes' (built in).")
@click.option("--datasets", "datasets_file", help="Dataset registry (default: $YOLOSAFE_DATASETS or ./datasets.yaml).")
@click.option("--gpus", help="GPU ids '0,1,2,3', 'all', 'auto[:N]' or 'cpu'. Default: GPU 0 if there is one, else cpu.")
@click.option("--batch", type=planner.BatchOrAuto(),
              help="Total batch over all GPUs (split evenly) or auto. Default 16.")
@click.option("--effective-batch", type=int, help="Images per optimizer step (Ultralytics nbs). Default: 64-ish.")
@click.option("--val-batch", type=int, help="Validation batch per GPU. Default: the per-GPU train batch.")
@click.option("--imgsz", type=int, help="Image size. Default 640 (shapes: 128).")
@click.option("--epochs", type=int, help="Epochs. Default 100 (shapes: 3).")
@click.option("--alloc-conf", help="PYTORCH_CUDA_ALLOC_CONF options merged over yours and the default.")
@click.option("--config", "config_file", help="YAML file with these options (flags override it).")
@click.option("--project", help="Parent folder of runs. Default runs/detect.")
@click.option("--name", help="Run name; an existing run is never overwritten (train, train2, ...).")
@click.option("--max-retries", type=int, help="Relaunches after an OOM. Default 3.")
@click.option("--min-batch", type=int, help="Never halve below this per-GPU batch. Default 1.")
@click.option("--watch-interval", type=float, help="Seconds between GPU memory samples; 0 = no watch. Default 0.1.")
@click.option("--warn-at", type=float, help="Warn when a GPU's used memory reaches this share of it. Default 0.9.")
@click.option("--clear-before-val/--no-clear-before-val", default=None,
              help="Empty the CUDA cache on every rank right before validation. Default on.")
@click.option("--memory-fraction", type=float, help="--batch auto: share of the free GPU memory to fill. Default 0.85.")
@click.option("--resume", "resume_dir", help="Continue the run in RUN_DIR from its weights/last.pt.")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan, environment and command; train nothing.")
@multicli.node_options
@click.argument("args", nargs=-1)
@click.pass_context
def train(ctx: click.Context, datasets_file: str | None, config_file: str | None, resume_dir: str | None,
          dry_run: bool, **_: Any) -> None:
    """Train with OOM protection. Extra ARGS are Ultralytics train arguments as key=value (e.g. lr0=0.01)."""
    validate.check_injection(os.environ)
    where = multicli.resolve(ctx.params)  # multi-node hook: --nnodes ... or SLURM, one line and exit 2 if wrong
    if resume_dir:
        given = {k: v for k, v in ctx.params.items()
                 if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
        sys.exit(resume_run(Path(resume_dir), given, dry_run, where))
    config = load_config(config_file)
    data_name = ctx.params["data"] or config.get("data") or DEFAULTS["data"]
    try:
        dataset = datasets.resolve(str(data_name), datasets.registry_path(datasets_file))
    except datasets.DatasetError as exc:
        fail(str(exc))
    options = resolve_options(ctx, config, dataset.defaults)
    options["data_yaml"] = str(dataset.yaml_path)
    options["nnodes"] = where.nnodes
    multicli.check_options(options, where)  # multi-node hook: what every node must decide alike
    check_watch(options)
    check_inputs(options)
    try:
        inventory = gpus.read_inventory()
        env = allocator.apply(os.environ, options["alloc_conf"])
        options, auto = planner.resolve_auto(options | {"model": options["model"] or default_model()}, inventory)
    except (gpus.FakeSpecError, allocator.AllocConfError, plan.PlanError, memmodel.UnknownModel) as exc:
        fail(str(exc))
    p = build(options, inventory)
    try:
        oom.check_injection(os.environ.get(oom.INJECT_ENV), p.world_size, p.nnodes)
        multicli.check_plan(p, where)  # multi-node hook: GPUs on every node
    except (ValueError, nodes.NodesError) as exc:
        fail(str(exc))
    for note in [*(auto or {}).get("reasons", []), *plan.plan_warnings(p)]:
        supervise.say(f"note: {note}")
    simulated = inventory.backend == "fake" and bool(p.gpus)
    project = Path(options["project"])
    named = ctx.get_parameter_source("name") is not click.core.ParameterSource.DEFAULT or "name" in config
    if where.multi:  # multi-node hook: the same run directory on every node, made by node 0 (a dry run names it)
        run_dir = multicli.claim(project, options, named, where, p, dry_run)
    elif dry_run:
        run_dir = next_run_name(project, options["name"])
    else:
        try:
            run_dir = rundir.claim_new_run_dir(project, options["name"], refuse_live=named)
        except rundir.RunLocked as exc:
            fail(f"--name {options['name']}: {exc}")
    if dry_run:
        print_dry_run(p, env, run_dir, simulated, where=where)
        return
    story = {
        "yolosafe": __version__,
        "command": sys.argv,
        "run_dir": str(run_dir),
        "dataset": {"name": dataset.name, "yaml": str(dataset.yaml_path)},
        "plan": p.summary(),
        "allocator": {k: env[k] for k in allocator.ENV_VARS},
        "versions": {**supervise.versions(), "driver": inventory.driver, "cuda_driver": inventory.cuda},
        "gpu_backend": inventory.backend,
        "gpus": [g.as_dict() for g in inventory.gpus if g.index in p.gpus],
        "simulated_on_cpu": simulated,
        "max_retries": options["max_retries"],
        "min_batch": options["min_batch"],
        **{key: options[key] for key in WATCH_KEYS},
        "batch_auto": auto,
        "memory_plan": planner.memory_plan(p, inventory, options, allow_fake_pass=False),
        **({"nodes": where.summary()} if where.multi else {}),
    }
    for note in planner.warnings(story["memory_plan"]):
        supervise.say(f"warning: {note}")
    supervise.say(f"run directory {run_dir}")
    code = run_supervised(run_dir, p, env, options, simulated, story, where=where)
    sys.exit(code)


def resume_run(run_dir: Path, given: dict[str, Any], dry_run: bool, where: nodes.Nodes) -> int:
    """``--resume RUN_DIR``: the run where it is now, the last attempt's plan with the GPUs and batches given."""
    r = resume.prepare(run_dir, given, DEFAULTS, dry_run, where.node_rank, where.nnodes)
    if dry_run:
        print_dry_run(r.plan, r.env, r.run_dir, r.simulated, r.last, len(r.story.get("attempts", [])) + 1, where)
        return 0
    if where.multi:  # multi-node hook: every node resumes the same attempt of the same run
        multicli.rejoin(r.run_dir, where, r.plan, len(r.story.get("attempts", [])) + 1, r.story)
    resume.record(r, given)
    supervise.say(f"resuming {r.run_dir} from {r.last}")
    return run_supervised(r.run_dir, r.plan, r.env, r.options, r.simulated, r.story, resume_from=r.last,
                          where=where)


def run_supervised(run_dir: Path, p: plan.TrainPlan, env: dict[str, str], options: dict[str, Any],
                   simulated: bool, story: dict[str, Any], resume_from: Path | None = None,
                   where: nodes.Nodes | None = None) -> int:
    node = where.node_rank if where else 0
    if simulated:  # the fake NVML backend follows the phases the trainer writes there (docs/fake-gpus.md)
        env = {gpus.PHASE_FILE_ENV: str(run_dir / rundir.node_file(rundir.FAKE_PHASE, node)), **env}
    run_options = supervise.RunOptions(env=env, max_retries=int(options["max_retries"]),
                                       min_batch=int(options["min_batch"]), simulate_on_cpu=simulated,
                                       watch_interval=float(options["watch_interval"]),
                                       warn_at=float(options["warn_at"]),
                                       clear_before_val=bool(options["clear_before_val"]),
                                       multinode=multicli.multinode(run_dir, where, p, options))
    for line in terminal.start_lines(p, env, simulated):
        supervise.say(line)
    supervisor = supervise.Supervisor(run_dir, run_options, story)
    code = supervisor.run(p, resume=resume_from)
    if supervisor.watch is not None:
        print_memory_table(run_dir, node)
        if node == 0:  # multi-node: node 0's machine only (each node's summary is its own file)
            history.record(run_dir, story)  # predicted vs measured peaks: the next plan learns from this machine
    weights = story.get("weights", {})
    supervise.say(f"run directory: {run_dir}")
    for name, path in weights.items():
        supervise.say(f"{name} weights: {path}")
    return code


def print_memory_table(run_dir: Path, node: int = 0) -> None:
    """The end of ``yolosafe train``: peaks per GPU, and where the report files are. Never changes the exit status."""
    try:
        summary = report.write(run_dir, node)
    except report.NoMemoryData as exc:
        supervise.say(f"memory: {exc}")
        return
    except Exception as exc:  # the run is over whatever happens here: a broken report must not hide its outcome
        supervise.say(f"memory report failed: {type(exc).__name__}: {exc}")
        return
    supervise.say(f"memory per GPU (NVML peaks; {rundir.node_file(rundir.MEMORY_SUMMARY, node)}, "
                  f"{rundir.node_file(rundir.MEMORY_PLOT, node)} in the run directory):")
    for line in report.table(summary):
        click.echo(f"  {line}", err=True)


@cli.command("plan")
@click.option("--vram", help="Print the tier table for these GPU sizes in GiB instead (e.g. 8,12,24,48,80).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def plan_command(ctx: click.Context, vram: str | None, as_json: bool, datasets_file: str | None,
                 config_file: str | None, **_: Any) -> None:
    """Predict each GPU's train and validation peaks for the same options as train; train nothing."""
    config = load_config(config_file)
    try:
        dataset = datasets.resolve(str(ctx.params["data"] or config.get("data") or DEFAULTS["data"]),
                                   datasets.registry_path(datasets_file))
        options = resolve_options(ctx, config, dataset.defaults) | {"data_yaml": str(dataset.yaml_path)}
        options["model"] = options["model"] or default_model()
        where = multicli.resolve(ctx.params)  # multi-node hook: --batch is the total over every node's GPUs
        multicli.check_options(options, where)
        options["nnodes"] = where.nnodes
        planview.run(options, gpus.read_inventory(), build, vram, as_json)
    except (datasets.DatasetError, gpus.FakeSpecError, plan.PlanError, memmodel.UnknownModel) as exc:
        fail(str(exc))


plan_command.params[:0] = [p for p in train.params if p.name not in ("resume_dir", "dry_run")]


@cli.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gpus_command(as_json: bool) -> None:
    """List the GPUs NVML sees (or the fake ones of YOLOSAFE_FAKE_GPUS), their memory and processes."""
    try:
        inventory = gpus.read_inventory()
    except gpus.FakeSpecError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps({
            "backend": inventory.backend, "driver": inventory.driver, "cuda": inventory.cuda,
            "problem": inventory.problem,
            "gpus": [g.as_dict() for g in inventory.gpus],
        }, indent=2))
        return
    if not inventory.gpus:
        click.echo(f"no GPU: {inventory.problem}; yolosafe train runs on CPU (--gpus cpu)", err=True)
        sys.exit(1)
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
        fail("no yolosafe run under ./runs; give the run directory: yolosafe report RUN_DIR")
    if not (path / rundir.STORY).is_file():
        fail(f"{path}: not a yolosafe run directory (no {rundir.STORY})")
    if rundir.mark_if_orphaned(path):
        click.echo(f"yolosafe: {path}: its supervisor died while training; marked '{rundir.ORPHANED}'", err=True)
    state = rundir.read_json(path / rundir.STORY).get("outcome") or "unknown"
    try:
        summary = report.write(path)
    except report.NoMemoryData as exc:
        click.echo(f"yolosafe: no memory data in {path} (run {state}): {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{path}: run {state}; GPU memory, NVML peaks (epochs 1-based); plot: {path / rundir.MEMORY_PLOT}")
    for line in report.table(summary):
        click.echo(line)


@cli.command("doctor")
@click.argument("run_dir", required=False)
@click.option("--project", help="Where to look for the newest run when RUN_DIR is not given. Default ./runs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(run_dir: str | None, project: str | None, as_json: bool) -> None:
    """Explain GPU memory: the machine, the environment, a run (default: the newest), and what to do. Read-only."""
    from yolosafe import doctor, doctor_text

    try:
        found = doctor.diagnose(run_dir, project)
    except doctor.DoctorError as exc:
        fail(str(exc))
    click.echo(json.dumps(found.as_dict(), indent=2, default=str) if as_json else "\n".join(doctor_text.render(found)))


@cli.command("fix")
@click.option("--config", "config_file", help="A yolosafe train --config YAML to adapt to the run's OOMs.")
@click.option("--run", "run_dir", help="The run the config change is derived from. Default: the newest under ./runs.")
@click.option("--yes", is_flag=True, help="Accept what is provably safe without asking (stale yolosafe processes, "
                                          "the rc line, the config change).")
def fix_command(config_file: str | None, run_dir: str | None, yes: bool) -> None:
    """Propose repairs one by one (y/N, default No; no terminal means No unless --yes); back up what it edits."""
    from yolosafe import fixes

    try:
        code = fixes.main(config_file, run_dir, yes)
    except fixes.FixUsageError as exc:
        fail(str(exc))
    sys.exit(code)


def _num(value: float | None, suffix: str = "") -> str:
    return "?" if value is None else f"{value:.0f}{suffix}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's own usage errors are reduced to one line, like ours; both exit with status 2."""
    try:
        cli.main(args=argv, prog_name="yolosafe", standalone_mode=False)
    except (UsageError, validate.InputError) as exc:
        click.echo(f"yolosafe: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        click.echo(f"yolosafe: error: {where}{exc.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        sys.exit(supervise.EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
