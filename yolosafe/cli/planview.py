"""``yolosafe plan``: what the memory plan says, as text for people or JSON for machines.

The command takes the same options as ``yolosafe train`` (resolved by the CLI the same way) and trains nothing:
per GPU, the free memory now, the predicted train and validation peaks, the headroom, where each figure comes from,
the batch (``--batch auto`` resolved) and the accumulation, host RAM, and warnings. ``--vram 8,12,24`` prints the
tier table instead: the largest safe per-GPU batch per model and GPU size, computed by the memory model.
"""

from __future__ import annotations

import json
from typing import Any

import click

from yolosafe.api.result import Plan
from yolosafe.planning import trainplan as plan
from yolosafe.planning.memory import planner


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
    click.echo(f"largest safe per-GPU batch at imgsz {table['imgsz']} ({'AMP' if table['amp'] else 'fp32'}, "
               f"optimizer {table['optimizer']}, {table['memory_fraction']:.0%} of an idle GPU; {table['source']})")
    click.echo(f"{'model':<10}" + "".join(f"{s + ' GiB':>10}" for s in sizes))
    for model, row in table["batches"].items():
        click.echo(f"{model:<10}" + "".join(f"{row[s]:>10}" for s in sizes))


def print_terms(prediction: dict[str, Any]) -> None:
    p = prediction
    click.echo(f"  {p['phase']:<5} peak {_gib(p['peak_mib'])} = (({p['fixed_mib']:.0f} MiB + "
               f"{p['per_image_mib']:.1f} MiB x {p['batch']} images) x {p['allocator_factor']} allocator "
               f"+ {p['context_mib']:.0f} MiB context + {p['outside_mib']:.0f} MiB NCCL) "
               f"x {p['calibration']} calibration")
    for term, source in p["sources"].items():
        if p["phase"] == "train" or term == "state":  # the other sources are the same for both phases
            click.echo(f"        {term}: {source}")


def print_plan(p: plan.TrainPlan, memory: dict[str, Any], auto: dict[str, Any] | None) -> None:
    click.echo(f"yolosafe plan: {memory['model']} at {p.imgsz} px, {'AMP' if memory['amp'] else 'fp32'}, "
               f"{len(p.gpus) or 'no'} GPU(s){f' per node x {p.nnodes} nodes' if p.nnodes > 1 else ''}; "
               f"figures from: {memory['terms_source']}")
    for reason in (auto or {}).get("reasons", []):
        click.echo(f"  auto: {reason}")
    if memory["gpus"]:
        click.echo(f"  {'GPU':>3}  {'name':<22} {'free now':>10} {'train peak':>11} {'val peak':>10} {'headroom':>10}"
                   "  calibration")
    for g in memory["gpus"]:
        runs = f"calibrated on {g['calibrated_runs']} run(s) here" if g["calibrated_runs"] else "not calibrated here"
        click.echo(f"  {g['index']:>3}  {(g['name'] or '?')[:22]:<22} {_gib(g['free_mib']):>10} "
                   f"{_gib(g['train_peak_mib']):>11} {_gib(g['val_peak_mib']):>10} {_gib(g['headroom_mib']):>10}  "
                   f"{runs}")
    if not memory["gpus"]:
        click.echo("  no GPU here: predicted per-GPU peaks for a GPU of any size")
    for prediction in memory["predicted"].values():
        print_terms(prediction)
    click.echo(f"  batch {p.batch} total = {p.per_gpu_batch} per GPU; val batch {p.val_batch} per GPU; nbs "
               f"{p.effective_batch} -> accumulate {p.accumulate} = {p.real_effective_batch} per optimizer step")
    host = memory["host_ram"]
    click.echo(f"  host RAM: about {_gib(host['needed_mib'])} needed, {_gib(host['available_mib'])} available")
    for note in planner.warnings(memory) + plan.plan_warnings(p):
        click.echo(f"  warning: {note}")


def print_tier_table(options: dict[str, Any], vram: str, as_json: bool) -> None:
    """``yolosafe plan --vram 8,12,24``: the largest safe per-GPU batch per model and GPU size."""
    table = planner.tier_table(parse_vram(vram), int(options["imgsz"]), options, planner.fraction_of(options))
    click.echo(json.dumps(table, indent=2)) if as_json else print_tiers(table)


def show(result: Plan, as_json: bool) -> None:
    """The whole ``yolosafe plan`` output for the plan the library made."""
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        print_plan(result.plan, dict(result.memory), dict(result.auto) if result.auto is not None else None)
