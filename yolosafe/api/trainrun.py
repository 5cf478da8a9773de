"""``yolosafe train`` between the command line and the supervisor: a new run or a resume, from resolved options to
the plan, the dry run, the run directory and its story, the supervised attempts and the closing lines.

Everything here that can go wrong with the user's input raises a :class:`yolosafe.errors.UsageError` before a run
directory exists; the CLI turns it into one line and exit status 2. A run that started ends in :class:`Ended`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolosafe import __version__, gpus, hang, oom
from yolosafe.api import dryrun
from yolosafe.exits import Exit
from yolosafe.planning import allocator, datasets, gpuselect, inputs, nodes, options, resume, trainoptions, validate
from yolosafe.planning import trainplan as plan
from yolosafe.planning.memory import history, planner
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.planning.validate import InputError
from yolosafe.readers import report
from yolosafe.rundir import files as rundir
from yolosafe.rundir import records, steps
from yolosafe.rundir.layout import RunDir
from yolosafe.supervisor import child as supervise
from yolosafe.supervisor import children, terminal
from yolosafe.supervisor.multinode import setup as multicli


@dataclass(frozen=True)
class Ended:
    """How ``new_run`` or ``resume_run`` ended: the exit status, the run directory (only its name for a dry run), as
    this machine's node names its files."""

    code: Exit
    run: RunDir
    dry_run: bool = False

    @property
    def run_dir(self) -> Path:
        return self.run.path


def resolve(given: Mapping[str, Any], config_file: str | None, datasets_file: str | None) -> TrainOptions:
    """Options from the flags ``given``, the ``--config`` file, the dataset's defaults and yolosafe's; ``data_yaml``
    is the dataset's YAML."""
    config = options.load_config(config_file)
    inputs.check_registry(datasets.registry_path(datasets_file))
    data = given.get("data") or config.get("data") or options.DEFAULTS["data"]
    if isinstance(data, (list, tuple)):  # Ultralytics' MultiTrainer: one run per dataset, in turn
        raise InputError(f"data={list(data)!r}: several datasets in one call (Ultralytics trains one after the "
                         "other) is not something yolosafe does; train each with its own call")
    dataset = datasets.resolve(str(data),
                               datasets.registry_path(datasets_file))  # a DatasetError: a usage error of its own
    differences = list(given.get("differences", ()))  # options.yolo_style's
    user_code = given.get("user_code")  # the user's callbacks and trainer (planning.usercode)
    given = {k: v for k, v in given.items() if k not in ("differences", "user_code")}
    resolved = options.resolve(given, config, dataset.defaults)
    if not resolved["model"]:
        resolved["model"] = options.default_model_of(resolved.get("task"))
        differences.append(f"no model given: yolosafe trains {resolved['model']} from scratch (yolo loads its "
                           "pretrained default, which needs a download; give model=... to choose)")
    named = "name" in given or "name" in config  # a run the user named: a live one of that name is a mistake
    resolved.update(data_yaml=str(dataset.yaml_path), dataset_name=dataset.name, named=named, data_hint=dataset.hint,
                    differences=tuple(differences), user_code=user_code)
    return TrainOptions.of(resolved)


def ultralytics_accepts(opts: TrainOptions, dry_run: bool) -> TrainOptions:
    """Ultralytics' own verdict on the model, the arguments and the data (a child process: children.input_check);
    says its notes, returns the options with the task, the runs' folder Ultralytics gives that task and the training
    images."""
    if opts.download and not dry_run:
        terminal.say("Ultralytics downloads what is missing (the data, the weights) now, once, before training")
    checked = validate.ultralytics_check(opts, dry_run, children.input_check)
    asked = None if opts.project in (None, validate.ULTRALYTICS_PROJECT) else opts.project
    name = checked.name or opts.name  # Ultralytics' name for the run (name=model: the model's stem)
    inputs.check_run_place(checked.project, name, asked)  # where Ultralytics puts the runs
    opts = opts.replace(task=checked.task, project=checked.project, name=name, train_images=checked.train_images,
                        dataset_figures=checked.dataset or {})
    for note in checked.notes:
        terminal.say(f"note: {note}")
    return opts


def build(opts: TrainOptions, inventory: gpus.Inventory) -> plan.TrainPlan:
    """The plan of resolved options on this machine's GPUs (``--gpus`` within ``$CUDA_VISIBLE_DEVICES``)."""
    visible = gpus.visible_ids(inventory, os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        selected = gpuselect.parse_gpus(opts.gpus, visible, inventory.problem)
        for bad in (g for g in inventory.gpus if g.index in selected and not g.valid):
            raise plan.PlanError(f"GPU {bad.index}: {bad.problem}; choose other GPUs with --gpus (see yolosafe gpus)")
        check_visible(inventory, selected, (opts.gpus or "").strip().lower() == "cpu")
        built = plan.build_plan(
            model=opts.model,
            data=opts.data_yaml,
            gpus=selected,
            batch=opts.batch,
            effective_batch=opts.effective_batch,
            val_batch=opts.val_batch,
            imgsz=opts.imgsz,
            epochs=opts.epochs,
            extra=plan.parse_passthrough(opts.args),
            train_images=opts.train_images,  # Ultralytics' own count (ultralytics_accepts), once known
            nnodes=opts.nnodes,  # multi-node: --batch is the total over every node's GPUs
        )
    except plan.PlanError as exc:
        hidden = len(visible) < len(inventory.ids)
        raise InputError(f"{exc} (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" if hidden
                         else str(exc)) from None
    return built


def check_visible(inventory: gpus.Inventory, selected: tuple[int, ...], cpu_asked: bool) -> None:
    """GPUs asked for (``CUDA_VISIBLE_DEVICES``, ``--gpus``) that CUDA would not give: none of this machine's, or
    none that NVML can read (never a silent fall back to the CPU), more MIG devices than the one CUDA shows a
    process, or a driver too old for the CUDA build of the installed torch."""
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    problem = None if cpu_asked else gpus.visible_problem(inventory, cuda_visible) or gpus.nvml_problem(inventory,
                                                                                                     os.environ)
    problem = problem or gpus.mig_problem(inventory, selected, cuda_visible)
    if selected and inventory.backend == "nvml":  # fake GPUs train on the CPU: their driver runs no torch
        problem = problem or gpus.cuda_problem(inventory.cuda, *gpus.torch_build())
    if problem:
        raise InputError(problem)


def new_run(opts: TrainOptions, dry_run: bool, where: nodes.Nodes) -> Ended:
    """A new run: everything checked, then the run directory claimed and the attempts supervised."""
    opts = opts.replace(nnodes=where.nnodes)  # --batch auto over several nodes: refused there
    inputs.check_asked_project(opts.project)
    early = opts.batch == planner.AUTO  # --batch auto plans on the dataset's figures: Ultralytics lists it first
    opts = ultralytics_accepts(opts, dry_run) if early else opts
    inventory = gpus.planning_inventory(gpus.read_inventory(), os.environ.get("CUDA_VISIBLE_DEVICES"))  # MIG
    env = allocator.apply(os.environ, opts.alloc_conf)
    opts, auto = planner.resolve_auto(opts, inventory, fake_pass=children.fake_pass)  # refusals: UsageErrors
    p = build(opts, inventory)
    trainoptions.check_min_batch(opts, p.per_gpu_batch)
    inputs.check_injection_reachable(os.environ.get(oom.INJECT_ENV), p.epochs)
    oom.check_injection(os.environ.get(oom.INJECT_ENV), p.world_size, p.nnodes)
    hang.check_injections(os.environ.get(hang.INJECT_ENV), p.world_size, p.epochs, p.nnodes)
    multicli.check_plan(p, where)  # GPUs on every node
    if not early:
        opts = ultralytics_accepts(opts, dry_run)  # the last check: the slowest (it imports Ultralytics)
    p = p if opts.train_images is None else dataclasses.replace(p, train_images=opts.train_images)
    simulated = inventory.backend == "fake" and bool(p.gpus)
    run = claim_run_dir(opts, where, p, dry_run)  # the last refusal: notes only after it (one-line refusals)
    for note in [*opts.differences, *(auto or {}).get("reasons", []), *plan.plan_warnings(p)]:
        terminal.say(f"note: {note}")
    if dry_run:
        dryrun.print_dry_run(p, env, run, simulated, where=where)
        return Ended(Exit.OK, run, dry_run=True)
    with released_on_error(run):
        story = new_story(run, p, env, opts, inventory, simulated, auto)
        story.nodes = where.summary() if where.multi else None
        for note in planner.warnings(story.memory_plan):
            terminal.say(f"warning: {note}")
        terminal.say(f"run directory {run.path}")
        code = run_supervised(run, p, env, opts, simulated, story, where=where)
        return Ended(code, run)


@contextlib.contextmanager
def released_on_error(run: RunDir) -> Iterator[None]:
    """This process's lock of the run directory (of its node) given back when what it holds it for fails: a caller
    that goes on (a notebook's kernel) can resume the run."""
    try:
        yield
    except BaseException:
        run.unlock()
        raise


def claim_run_dir(opts: TrainOptions, where: nodes.Nodes, p: plan.TrainPlan, dry_run: bool) -> RunDir:
    """The run's directory, made once here and passed down: on several nodes the same one everywhere, made by node 0;
    a new one, locked for this process, on one machine; only its name for a dry run."""
    project = Path(opts.project)
    if where.multi:
        return multicli.claim(project, opts, opts.named, where, p, dry_run)
    if dry_run:
        return RunDir(rundir.next_run_dir(project, opts.name))
    try:
        return RunDir(rundir.claim_new_run_dir(project, opts.name, refuse_live=opts.named))
    except rundir.RunLocked as exc:
        raise InputError(f"--name {opts.name}: {exc}") from None
    except OSError as exc:  # /proc, a file system that refuses folders: nothing was created
        raise InputError(f"--project {project}: cannot create the run directory there "
                         f"({exc.strerror or exc})") from None


def new_story(run: RunDir, p: plan.TrainPlan, env: Mapping[str, str], opts: TrainOptions,
              inventory: gpus.Inventory, simulated: bool, auto: dict[str, Any] | None) -> records.Story:
    """``yolosafe.json`` as a run starts: the plan, its GPUs, the versions, the options that shape its attempts."""
    return records.Story.new(
        yolosafe=__version__,
        run_dir=str(run.path),
        plan=p.summary(),
        allocator={k: env[k] for k in allocator.ENV_VARS},
        versions={**supervise.versions(), "driver": inventory.driver, "cuda_driver": inventory.cuda},
        gpu_backend=inventory.backend,
        gpus=[g.as_dict() for g in inventory.gpus if g.index in p.gpus],
        simulated_on_cpu=simulated,
        **opts.to_story(),  # command, dataset, max_retries, min_batch and the memory watch's options
        batch_auto=auto,
        memory_plan=planner.memory_plan(p, inventory, opts, auto=auto),  # no fake pass here: a model measured before
    )


RESUME_AUTO = "auto"  # --resume auto: the run the same command made, if there is one; else a new run


def resume_auto(given: dict[str, Any], dry_run: bool, where: nodes.Nodes) -> Ended:
    """``--resume auto`` (a requeued job running its command again): the run this command names (``--name``, in the
    project Ultralytics gives the task) continues where it stopped, a completed one is left as it is, and without
    one the command starts it. The options of a new run (model, data, epochs...) are the run's own, not applied."""
    opts = resolve(given, given.get("config_file"), given.get("datasets_file"))
    if not opts.named:
        raise InputError("--resume auto: give the run's --name (the same in every requeue of the job)")
    opts = ultralytics_accepts(opts, dry_run)  # the project Ultralytics gives the task (a checked verdict is kept)
    run = RunDir(Path(opts.project) / opts.name, where.node_rank)
    if not RunDir(run.path).is_run():
        terminal.say(f"--resume auto: no run at {run.path} yet: a new run")
        return new_run(opts, dry_run, where)
    if records.load_story(RunDir(run.path)).outcome == records.Outcome.COMPLETED:
        terminal.say(f"--resume auto: {run.path} completed already; nothing to train")
        return Ended(Exit.OK, run, dry_run=dry_run)
    return resume_run(run.path, {k: v for k, v in given.items() if k not in resume.REFUSED}, dry_run, where)


def resume_run(path: Path, given: dict[str, Any], dry_run: bool, where: nodes.Nodes) -> Ended:
    """``--resume RUN_DIR`` (``path``, as given): the run where it is now, opened once for this node; the last
    attempt's plan with the GPUs and batches given."""
    r = resume.prepare(RunDir(path, where.node_rank), given, dry_run, where.nnodes)
    attempt = len(r.story.attempts) + 1
    for note in r.notes:  # after every check: the run is there, and resumes
        terminal.say(f"note: {note}")
    if dry_run:
        dryrun.print_dry_run(r.plan, r.env, r.run, r.simulated, r.last, attempt, where)
        return Ended(Exit.OK, r.run, dry_run=True)
    with released_on_error(r.run):
        if where.multi:  # every node resumes the same attempt of the same run
            multicli.rejoin(r.run, where, r.plan, attempt, r.story)
        resume.record(r)
        at = steps.words(steps.resume_point(r.run, r.last, r.plan.world_size, r.plan.per_gpu_batch), r.plan.world_size)
        terminal.say(f"resuming {r.run_dir} from {r.last or 'the start'}{' ' + at if at else ''}")
        code = run_supervised(r.run, r.plan, r.env, r.options, r.simulated, r.story,
                              resume_from=None if r.final_val_only else r.last, where=where,  # None: from the start
                              final_val_only=r.final_val_only)
        return Ended(code, r.run)


def run_supervised(run: RunDir, p: plan.TrainPlan, env: dict[str, str], opts: TrainOptions,
                   simulated: bool, story: records.Story, resume_from: Path | None = None,
                   where: nodes.Nodes | None = None, final_val_only: bool = False) -> Exit:
    """The attempts, then the memory table, the history line and where the weights are."""
    if simulated:  # the watch's fake NVML backend follows the phases the ranks write there (docs/fake-gpus.md)
        env = {**env, gpus.PHASE_FILE_ENV: str(run.fake_phase)}
    for line in terminal.start_lines(p, env, simulated):
        terminal.say(line)
    run_options = supervise.RunOptions.of(env, opts, simulated, multicli.multinode(run, where, p))
    supervisor = supervise.Supervisor(run, run_options, story)
    code = supervisor.run(p, resume=resume_from, final_val_only=final_val_only)
    if supervisor.watch is not None:
        print_memory_table(run)
        if run.node == 0:  # predicted vs measured peaks: the next plan learns from this machine (node 0's, over nodes)
            history.record(run, story.to_dict())
    terminal.say(f"run directory: {run.path}")
    for name, path in (story.weights or {}).items():
        terminal.say(f"{name} weights: {path}")
    return code


def print_memory_table(run: RunDir) -> None:
    """The end of ``yolosafe train``: peaks per GPU (of ``run``'s node), and where the report files are. Never changes
    the exit status."""
    try:
        summary = report.write(run)
    except report.NoMemoryData as exc:
        terminal.say(f"memory: {exc}")
        return
    except Exception as exc:  # the run is over whatever happens here: a broken report must not hide its outcome
        terminal.say(f"memory report failed: {type(exc).__name__}: {exc}")
        return
    terminal.say(f"memory per GPU (NVML peaks; {run.memory_summary.name}, "
                 f"{run.memory_plot.name} in the run directory):")
    for line in report.table(summary):
        print(f"  {line}", file=sys.stderr, flush=True)
