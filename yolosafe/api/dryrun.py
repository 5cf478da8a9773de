"""What ``yolosafe train --dry-run`` shows instead of training: the resolved plan, the child's environment and the
exact command each node would launch."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from yolosafe.planning import allocator, nodes
from yolosafe.planning import trainplan as plan
from yolosafe.rundir.layout import RunDir
from yolosafe.supervisor import child as supervise
from yolosafe.supervisor import launchcmd as launch
from yolosafe.supervisor.multinode import setup as multicli


def print_dry_run(p: plan.TrainPlan, env: dict[str, str], run_dir: Path, simulated: bool,
                  resume_from: Path | None = None, attempt: int = 1, where: nodes.Nodes | None = None) -> None:
    """The resolved plan, the child's environment and command: what ``--dry-run`` shows instead of training."""
    gpus_text = f"{p.device}  ({len(p.gpus)} GPU{'s' if len(p.gpus) != 1 else ''})" if p.gpus else "cpu"
    if simulated:
        gpus_text += "  [fake GPUs: each one a rank process on the CPU]" if len(p.gpus) > 1 else "  [fake GPU: on CPU]"
    where = where or nodes.Nodes()
    run, multi = RunDir(run_dir, where.node_rank), where.multi
    command = launch.child_command(run.spec(attempt), p.world_size, p.local_world_size,
                                   run.ranks_log_dir(attempt), where, attempt)  # port: at launch
    device, visible = supervise.launch_device(p, simulated)
    child_env = {k: env[k] for k in allocator.ENV_VARS} | ({"CUDA_VISIBLE_DEVICES": visible} if visible else {})
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in child_env.items())
    lines = [
        ("model", p.model),
        ("data", p.data),
        ("device", gpus_text),
        *(multicli.dry_run_lines(p, where) if multi else []),
        ("batch", f"{p.batch} total = {p.per_gpu_batch} per GPU"),
        ("effective batch", f"nbs {p.ultralytics_args()['nbs']} -> accumulate {p.accumulate} "
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
