"""``yolosafe plan``: what the memory plan says, as text for people or JSON for machines.

The command takes the same options as ``yolosafe train`` (resolved by the CLI the same way) and trains nothing:
per GPU, the free memory now, two figures per phase (train, validation) — ``gpu_mem_gib``, what Ultralytics' GPU_mem
column will show, and ``required_mib``, what must be free — the headroom, where each figure comes from, the batch
(``--batch auto`` resolved) and the accumulation, host RAM, and warnings. ``--vram 8,12,24`` prints the tier table
instead: the largest per-GPU batch whose required memory fits, per model (``--model``, comma-separated, or the
table's) and GPU size, computed by the memory model.
"""

from __future__ import annotations

import json
from typing import Any

import click

from yolosafe.api.result import Plan
from yolosafe.planning import trainplan as plan
from yolosafe.planning.memory import planner
from yolosafe.planning.trainoptions import TrainOptions
from yolosafe.supervisor import children


def parse_vram(text: str) -> list[float]:
    try:
        sizes = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise plan.PlanError(f"--vram {text}: expected GPU sizes in GiB, e.g. --vram 8,12,24,48,80") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise plan.PlanError(f"--vram {text}: expected positive GPU sizes in GiB, e.g. --vram 8,12,24,48,80")
    return sizes


def _gib(mib: float | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f} GiB"


def print_tiers(table: dict[str, Any]) -> None:
    sizes = [f"{v:g}" for v in table["vram_gib"]]
    click.echo(f"largest safe per-GPU batch (its required memory fits) at imgsz {table['imgsz']} "
               f"({'AMP' if table['amp'] else 'fp32'}, optimizer {table['optimizer']}, {table['memory_fraction']:.0%} "
               f"of an idle GPU, {table['objects_per_image']:g} objects per image; {table['source']})")
    width = max([10, *(len(m) + 2 for m in table["batches"])])
    click.echo(f"{'model':<{width}}" + "".join(f"{s + ' GiB':>10}" for s in sizes))
    for model, row in table["batches"].items():
        click.echo(f"{model:<{width}}" + "".join(f"{row[s]:>10}" for s in sizes))
    for model, source in table["sources"].items():
        click.echo(f"  {model}: {source}")


def print_terms(prediction: dict[str, Any], seen: set[tuple[str, str]]) -> None:
    """One phase's two figures and their sources; a source already printed (the other figure's, the other phase's)
    is not repeated."""
    p = prediction
    click.echo(f"  {p['phase']:<5} at {p['batch']} images: allocated {p['fixed_mib']:.0f} MiB + "
               f"{p['per_image_mib']:.1f} MiB x {p['batch']} = {p['allocated_mib']:.0f} MiB")
    shown = ("Ultralytics' GPU_mem column in steady epochs" if p["phase"] == "train" else
             "memory_reserved while validating: GPU_mem of the next epoch while under half the GPU")
    click.echo(f"        gpu_mem_gib  {p['gpu_mem_gib']:.2f} = allocated x {p['reserved_ratio']} ({shown})")
    click.echo(f"        required_mib {p['required_mib']:.0f} = (allocated x {1 + p['fragmentation']:g} + "
               f"{p['context_mib']:.0f} context + {p['outside_mib']:.0f} NCCL) x {p['calibration']} calibration "
               "(must be free)")
    shared = set(p["sources"].get("gpu_mem_gib", {})) & set(p["sources"].get("required_mib", {}))
    for figure, sources in p["sources"].items():
        for term, source in sources.items():
            if (term, source) not in seen:
                seen.add((term, source))
                click.echo(f"        {term if term in shared else f'{figure} {term}'}: {source}")


def print_plan(p: plan.TrainPlan, memory: dict[str, Any], auto: dict[str, Any] | None) -> None:
    click.echo(f"yolosafe plan: {memory['model']} ({memory['task']}) at {p.imgsz} px, "
               f"{'AMP' if memory['amp'] else 'fp32'}, {len(p.gpus) or 'no'} GPU(s)"
               f"{f' per node x {p.nnodes} nodes' if p.nnodes > 1 else ''}; figures from: {memory['terms_source']}")
    for reason in (auto or {}).get("reasons", []):
        click.echo(f"  auto: {reason}")
    if memory["gpus"]:
        click.echo(f"  {'GPU':>3}  {'name':<22} {'free now':>10} {'train GPU_mem':>13} {'train req.':>10} "
                   f"{'val GPU_mem':>11} {'val req.':>10} {'headroom':>10}  calibration")
    for g in memory["gpus"]:
        runs = f"calibrated on {g['calibrated_runs']} run(s) here" if g["calibrated_runs"] else "not calibrated here"
        click.echo(f"  {g['index']:>3}  {(g['name'] or '?')[:22]:<22} {_gib(g['free_mib']):>10} "
                   f"{g['train_gpu_mem_gib']:>9.2f} GiB {_gib(g['train_required_mib']):>10} "
                   f"{g['val_gpu_mem_gib']:>7.2f} GiB {_gib(g['val_required_mib']):>10} {_gib(g['headroom_mib']):>10}  "
                   f"{runs}")
    if memory["gpus"]:
        g = memory["gpus"][0]  # rank 0 prints the column
        click.echo(f"  Ultralytics' GPU_mem column (GPU {g['index']}) should read about {g['gpu_mem_column_gib']:.2f}G "
                   "in steady epochs (validation's blocks stay cached below half the GPU)")
    if not memory["gpus"]:
        click.echo("  no GPU here: both figures per GPU, for a GPU of any size")
    seen: set[tuple[str, str]] = set()
    for prediction in memory["predicted"].values():
        print_terms(prediction, seen)
    click.echo(f"  batch {p.batch} total = {p.per_gpu_batch} per GPU; val batch {p.val_batch} per GPU; nbs "
               f"{p.ultralytics_args()['nbs']} -> accumulate {p.accumulate} = {p.real_effective_batch} per optimizer "
               "step")
    host = memory["host_ram"]
    click.echo(f"  host RAM: about {_gib(host['needed_mib'])} needed, {_gib(host['available_mib'])} available")
    for note in planner.warnings(memory) + plan.plan_warnings(p):
        click.echo(f"  warning: {note}")


def print_tier_table(options: TrainOptions, vram: str, as_json: bool, vram_models: str | None = None) -> None:
    """``yolosafe plan --vram 8,12,24``: the largest safe per-GPU batch per model and GPU size (the models asked for,
    else the shipped table's)."""
    models = [m for m in str(vram_models or "").split(",") if m.strip()] or None
    table = planner.tier_table(parse_vram(vram), options.imgsz, options, options.memory_fraction, models,
                               fake_pass=children.fake_pass)
    click.echo(json.dumps(table, indent=2)) if as_json else print_tiers(table)


def show(result: Plan, as_json: bool) -> None:
    """The whole ``yolosafe plan`` output for the plan the library made."""
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        print_plan(result.plan, dict(result.memory), dict(result.auto) if result.auto is not None else None)
