"""yolosafe on a real GPU, in one script of a few minutes: NVML, real CUDA OOMs in validation and in training, both
recoveries, the memory watch against torch, and the plan against what the GPU measured. Writes one JSON of figures.

Steps (each a real ``yolosafe`` command, as a user runs it, on GPU 0, on a synthetic data set made here):

1. ``gpus``:      ``yolosafe gpus --json`` on real NVML (driver, CUDA, each GPU's memory and processes).
2. ``plan``:      ``yolosafe plan --json`` for the training below: the predicted train and validation peaks.
3. ``baseline``:  one epoch, no cap: torch's peaks per phase (the ranks' events), the memory watch's NVML peaks
                  (``memory_summary.json``) against ``torch.cuda.max_memory_reserved``, and the plan against both.
4. ``val_in_place``: the same training with the process's CUDA memory capped between the train and validation peaks
                  (``torch.cuda.set_per_process_memory_fraction`` in the worker, through a ``sitecustomize`` on its
                  path): a real OOM in validation, recovered in place (expected: one attempt, recovered records).
5. ``val_relaunch``: the same cap with ``--val-oom relaunch``: the same OOM recovered by a relaunch.
6. ``train_oom``: the cap below the train peak: a real OOM in training, recovered by a relaunch with half the batch.

``--dry`` runs every step on a machine without a GPU (fake GPUs, CPU training, small images; the OOMs injected with
``YOLOSAFE_INJECT_OOM`` instead of a cap), so the script itself is checked wherever the tests run.

Usage: ``python benchmarks/gpu_check.py --out gpu_check.json [--dry] [--timeout 90]`` (four trainings of at most
``--timeout`` seconds each: under 8 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SITECUSTOMIZE = '''import os
if os.environ.get("YOLOSAFE_RUN_DIR") and os.environ.get("GPU_CHECK_FRACTION"):  # yolosafe's worker only
    import torch
    torch.cuda.set_per_process_memory_fraction(float(os.environ["GPU_CHECK_FRACTION"]), 0)
'''
FRACTION_ENV = "GPU_CHECK_FRACTION"


def sizes(dry: bool) -> dict[str, int]:
    """The training of every step: big validation batches (so validation peaks above training), small train batch."""
    if dry:
        return {"imgsz": 64, "batch": 4, "val_batch": 8, "train_images": 16, "val_images": 16}
    return {"imgsz": 640, "batch": 8, "val_batch": 256, "train_images": 64, "val_images": 256}


def train_args(data: Path, s: dict[str, int], name: str) -> list[str]:
    return ["train", "--gpus", "0", "--data", str(data), "--epochs", "1", "--imgsz", str(s["imgsz"]), "--batch",
            str(s["batch"]), "--val-batch", str(s["val_batch"]), "--name", name, "workers=0", "plots=False"]


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> dict[str, Any]:
    """One ``yolosafe`` command: exit status, seconds, the end of its output (a timeout is a figure, not a crash)."""
    started = time.time()
    try:
        done = subprocess.run([sys.executable, "-m", "yolosafe", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = "timeout", str(exc.stdout or ""), str(exc.stderr or "")
    return {"exit": code, "seconds": round(time.time() - started, 1), "stdout": out, "stderr_tail": err[-2000:]}


def torch_peaks(run: Path) -> dict[str, float]:
    """torch's peak reserved MiB per phase (train, val, final), from the ranks' end events, over every attempt."""
    found: dict[str, float] = {}
    events = run / "events.jsonl"
    for line in events.read_text().splitlines() if events.is_file() else []:
        e = json.loads(line)
        if e.get("event") in {"train_end", "val_end"} and e.get("max_reserved_mib") is not None:
            found[e["phase"]] = max(found.get(e["phase"], 0.0), float(e["max_reserved_mib"]))
    return found


def watch_vs_torch(run: Path, gpu: str = "0") -> dict[str, Any]:
    """Per phase: the memory watch's NVML peaks (all of the GPU, and this run's processes) against torch's peak
    reserved; the difference is the CUDA context and memory outside PyTorch's allocator."""
    path = run / "memory_summary.json"
    if not path.is_file():
        return {}
    phases = json.loads(path.read_text()).get("gpus", {}).get(gpu, {}).get("phases", {})
    found = {}
    for phase, p in phases.items():
        ours, reserved = p.get("peak_ours_mib"), p.get("torch_max_reserved_mib")
        found[phase] = {"nvml_peak_used_mib": p.get("peak_used_mib"), "nvml_peak_ours_mib": ours,
                        "torch_max_reserved_mib": reserved,
                        "nvml_minus_torch_mib": round(ours - reserved, 1) if ours and reserved else None}
    return found


def plan_vs_measured(plan: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The plan's predicted peak per phase against the NVML peak of the run's processes (what the plan predicts)."""
    predicted = (plan.get("memory") or {}).get("predicted") or {}
    found = {}
    for phase, names in (("train", ("train",)), ("val", ("val", "final"))):
        peak = max((measured[n]["nvml_peak_ours_mib"] or 0 for n in names if n in measured), default=0) or None
        guess = (predicted.get(phase) or {}).get("peak_mib")
        found[phase] = {"predicted_mib": guess, "measured_mib": peak,
                        "measured_over_predicted": round(peak / guess, 3) if peak and guess else None}
    return found


def cap_between(low_mib: float, high_mib: float, total_mib: float, at: float = 0.6) -> float | None:
    """The memory fraction whose cap lies ``at`` of the way from ``low`` to ``high``; None when they are too close
    to tell apart (less than 20 % apart) or the GPU's total is unknown."""
    if not total_mib or not low_mib or high_mib < 1.2 * low_mib:
        return None
    return round((low_mib + at * (high_mib - low_mib)) / total_mib, 5)


def run_summary(run: Path) -> dict[str, Any]:
    """The story's attempts, the OOM records (recovered in place or not) and whether the OOMs were real."""
    story = json.loads((run / "yolosafe.json").read_text()) if (run / "yolosafe.json").is_file() else {}
    records = [json.loads(p.read_text()) for p in sorted(run.glob("failure-*-rank*.json"))]
    return {
        "outcome": story.get("outcome"),
        "attempts": [{k: a.get(k) for k in ("attempt", "mode", "outcome", "phase", "per_gpu_batch", "val_batch",
                                             "duration_s")} for a in story.get("attempts", [])],
        "ooms": [{k: r.get(k) for k in ("phase", "epoch", "val_batch", "next_val_batch", "recovered", "batch")}
                 | {"real": "[injected by yolosafe]" not in (r.get("message") or "")} for r in records if r.get("oom")],
        "torch_peaks_mib": torch_peaks(run),
    }


def environment(dry: bool, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLOSAFE_", FRACTION_ENV))}
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(repo), env.get("PYTHONPATH", "")) if p)
    env.update(YOLOSAFE_CACHE=str(work / "cache"), YOLO_CONFIG_DIR=str(work / "ultralytics"), PYTHONUNBUFFERED="1")
    if dry:
        env["YOLOSAFE_FAKE_GPUS"] = "1x24GB"
    return env


def step(figures: dict[str, Any], name: str, env: dict[str, str], args: list[str], work: Path,
         timeout: float) -> dict[str, Any]:
    result = cli(args, env, work, timeout)
    run = work / "runs" / "detect" / args[args.index("--name") + 1] if "--name" in args else None
    figures[name] = {k: v for k, v in result.items() if k != "stdout"}
    if run is not None:
        figures[name].update(run_summary(run))
    return result


def capped(env: dict[str, str], fraction: float | None, dry: bool, injection: str) -> dict[str, str]:
    """The environment of a step that must run out of memory: the cap on a GPU, the injection in a dry run."""
    if dry:
        return {**env, "YOLOSAFE_INJECT_OOM": injection}
    return {**env, FRACTION_ENV: str(fraction)} if fraction else env


def check(work: Path, dry: bool, timeout: float) -> dict[str, Any]:
    from yolosafe.planning import datasets

    s = sizes(dry)
    env = environment(dry, work)
    data = datasets.ensure_shapes(work / "data", train=s["train_images"], val=s["val_images"], size=s["imgsz"])
    figures: dict[str, Any] = {"dry": dry, "sizes": s, "data": str(data)}
    gpus = cli(["gpus", "--json"], env, work, 60)
    figures["gpus"] = json.loads(gpus["stdout"]) if gpus["exit"] == 0 else gpus
    total = float(((figures["gpus"].get("gpus") or [{}])[0]).get("total_mib") or 0)
    plan = cli(["plan", *train_args(data, s, "plan")[1:-4], "--json"], env, work, 120)
    figures["plan"] = json.loads(plan["stdout"]) if plan["exit"] == 0 else plan
    step(figures, "baseline", env, train_args(data, s, "baseline"), work, timeout)
    measured = watch_vs_torch(work / "runs" / "detect" / "baseline")
    figures["watch_vs_torch"] = measured
    figures["plan_vs_measured"] = plan_vs_measured(figures["plan"], measured) if plan["exit"] == 0 else {}
    peaks = figures["baseline"].get("torch_peaks_mib", {})
    val_cap = cap_between(peaks.get("train", 0), max(peaks.get("val", 0), peaks.get("final", 0)), total)
    train_cap = round(0.75 * peaks["train"] / total, 5) if total and peaks.get("train") else None
    figures["caps"] = {"total_mib": total, "val_fraction": val_cap, "train_fraction": train_cap}
    for name, extra in (("val_in_place", []), ("val_relaunch", ["--val-oom", "relaunch"])):
        step(figures, name, capped(env, val_cap, dry, "phase=val,epoch=0"), [*train_args(data, s, name), *extra],
             work, timeout)
    step(figures, "train_oom", capped(env, train_cap, dry, "phase=train,epoch=0,iteration=1"),
         train_args(data, s, "train_oom"), work, timeout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dry", action="store_true", help="no GPU: fake GPUs, CPU training, injected OOMs")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds for each training step")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="yolosafe-gpu-check-") as tmp:
        figures = check(Path(tmp), args.dry, args.timeout)
    figures["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(figures, indent=2))
    for name in ("baseline", "val_in_place", "val_relaunch", "train_oom"):
        f = figures.get(name, {})
        print(f"{name:>13}: exit {f.get('exit')}, {f.get('seconds')} s, {f.get('outcome')}, "
              f"{len(f.get('attempts', []))} attempt(s), OOMs {f.get('ooms')}")
    print(f"figures: {args.out} ({figures['seconds']} s)")


if __name__ == "__main__":
    main()
