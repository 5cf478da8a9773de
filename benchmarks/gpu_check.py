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

7. ``oom_forms``: the out-of-memory errors the libraries really raise, each in a process of its own beside a filler
                  process that holds all but a little of GPU 0: (a) CUDA context creation, (b) the first cuBLAS
                  matmul of a process (handle and workspace), (c) the first cuDNN convolution, (d) the caching
                  allocator; each text must be ``oom.is_oom_text`` (and the allocator's sizes read by
                  ``oom.parse_message``); after the OOMs the probe frees its tensors: torch's allocated memory must be
                  back where it was and the free memory must come back.
8. ``nvml_release``: a process holding 1 GiB is SIGKILLed; the seconds until NVML no longer lists its pid and its
                  memory is free, against the wait before a relaunch (``watch.RELEASE_WAIT_S``).

Each step ends in a verdict (``pass``/``fail`` and why: the ``verdicts`` of the JSON, one line each at the end; the
exit status is 1 when one fails). ``--dry`` runs every step on a machine without a GPU (fake GPUs, CPU training,
small images; the OOMs injected with ``YOLOSAFE_INJECT_OOM`` instead of a cap, the libraries' texts those of the
injection), so the script itself is checked wherever the tests run; ``--parts probes`` runs steps 1, 7 and 8 alone.

Usage: ``python benchmarks/gpu_check.py --out gpu_check.json [--dry] [--timeout 90] [--parts probes,trainings]``
(four trainings of at most ``--timeout`` seconds each and the probes, about a minute: under 9 minutes in all).
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


# --- the probes: real OOM texts, memory after an OOM, NVML's release after SIGKILL ---------------------------------

FORMS = ("context", "cublas", "cudnn", "allocator")
DRY_TEXT = {"context": "accelerator", "cublas": "cublas-init", "cudnn": "cudnn", "allocator": "oom"}  # the injection's
LEAVE_MIB = {"context": 64, "cublas": 8, "cudnn": 8, "allocator": 512}  # what the filler leaves free on GPU 0


def probe(kind: str, dry: bool) -> dict[str, Any]:
    """In this process (``--probe KIND``): ``hold:MIB`` holds that much of GPU 0 until killed; a form of
    :data:`FORMS` runs into it on what the filler left free and reports the error's text and the memory after."""
    from yolosafe import oom

    if dry:
        return {"form": kind, "error": "RuntimeError", "text": oom.injected_text(DRY_TEXT[kind], 0), "freed": True}
    import torch

    if kind.startswith("hold:"):  # the filler: its context, then all the free memory but what it was told to leave
        torch.zeros(1, device="cuda")
        free = torch.cuda.mem_get_info()[0]
        held = torch.empty(max(free - int(float(kind[5:]) * 2**20), 0), dtype=torch.uint8, device="cuda")
        print("ready", flush=True)
        time.sleep(3600)
        del held
    found: dict[str, Any] = {"form": kind}
    kept: list[Any] = []
    before = None  # torch's allocated bytes before the form (its context made)
    try:
        if kind == "context":
            torch.zeros(1, device="cuda")
        else:
            torch.zeros(1, device="cuda")  # the context first, then (once the filler holds the rest) the form
            print("context", flush=True)
            sys.stdin.readline()
            before = torch.cuda.memory_allocated()
            found["free_before_mib"] = torch.cuda.mem_get_info()[0] / 2**20
            if kind == "cublas":
                a = torch.ones(64, 64, device="cuda")
                kept.append(a @ a)
            elif kind == "cudnn":
                x = torch.ones(1, 3, 64, 64, device="cuda")
                kept.append(torch.nn.functional.conv2d(x, torch.ones(8, 3, 3, 3, device="cuda")))
            else:
                kept.append(torch.empty(int(found["free_before_mib"] * 4) * 2**20, dtype=torch.uint8, device="cuda"))
        found["error"] = None
    except Exception as exc:
        found.update(error=type(exc).__name__, text=str(exc)[:3000])
    if kind != "context":
        kept.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        found["allocated_back"] = before is not None and torch.cuda.memory_allocated() <= before
        found["free_after_mib"] = torch.cuda.mem_get_info()[0] / 2**20
        found["freed"] = found["allocated_back"] and found["free_after_mib"] >= 0.9 * found["free_before_mib"]
    return found


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def oom_forms(env: dict[str, str], dry: bool) -> dict[str, Any]:
    """Each form of :data:`FORMS` in its own process: its CUDA context first (but for the context's own form), then
    a filler process takes all of GPU 0 but :data:`LEAVE_MIB`, then the form runs into it."""
    found = {}
    for kind in FORMS:
        prober = filler = None
        try:
            if not dry and kind == "context":  # the filler first: the probe's context is what runs into it
                filler = _child(["--probe", f"hold:{LEAVE_MIB[kind]}"], env)
                filler.stdout.readline()  # "ready": it holds the rest
            prober = _child(["--probe", kind, *(["--dry"] if dry else [])], env)
            if not dry and kind != "context":
                prober.stdout.readline()  # "context": the probe's context exists
                filler = _child(["--probe", f"hold:{LEAVE_MIB[kind]}"], env)
                filler.stdout.readline()
            out, err = prober.communicate("go\n", timeout=120)
            lines = out.strip().splitlines()
            found[kind] = json.loads(lines[-1]) if lines else {"form": kind, "crash": err[-2000:]}
        except subprocess.TimeoutExpired:
            found[kind] = {"form": kind, "crash": "no answer within 120 s"}
        finally:
            for child in (prober, filler):
                if child is not None and child.poll() is None:
                    child.kill()
                    child.wait()
    return found


def nvml_release(env: dict[str, str], dry: bool) -> dict[str, Any]:
    """Seconds from a SIGKILL of a process holding 1 GiB of GPU 0 until NVML lists it no more and its memory is
    back (polled every 0.05 s), against the relaunch's wait."""
    from yolosafe import gpus
    from yolosafe.supervisor import watch

    if dry:
        return {"dry": True, "listed_s": 0.0, "memory_s": 0.0, "bound_s": watch.RELEASE_WAIT_S}
    backend = gpus.NvmlBackend()
    try:
        floor = backend.read_memory(0).used_mib
        holder = _child(["--probe", f"hold:{max(backend.read_memory(0).total_mib - floor - 1024 - 600, 0):.0f}"], env)
        holder.stdout.readline()  # it holds about 1 GiB (all the free memory but what it leaves)
        listed = {p.pid for p in backend.read_memory(0).processes}
        holder.kill()
        killed, gone, freed = time.monotonic(), None, None
        while time.monotonic() - killed < 2 * watch.RELEASE_WAIT_S and (gone is None or freed is None):
            reading = backend.read_memory(0)
            if gone is None and holder.pid not in {p.pid for p in reading.processes}:
                gone = time.monotonic() - killed
            if freed is None and reading.used_mib <= floor + watch.RELEASE_SLACK_MIB:
                freed = time.monotonic() - killed
            time.sleep(0.05)
        holder.wait()
    finally:
        backend.close()
    return {"listed_before_kill": holder.pid in listed, "listed_s": gone, "memory_s": freed,
            "bound_s": watch.RELEASE_WAIT_S}


# --- verdicts ---------------------------------------------------------------------------------------------------


def _attempts(f: dict[str, Any]) -> list[tuple[Any, Any]]:
    return [(a.get("outcome"), a.get("phase")) for a in f.get("attempts", [])]


def verdicts(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``pass`` and why for each step the figures hold."""
    from yolosafe import oom

    found: dict[str, dict[str, Any]] = {}

    def say(name: str, ok: bool, why: str) -> None:
        found[name] = {"pass": bool(ok), "why": why}

    g = figures.get("gpus", {})
    if "gpus" in figures:
        say("gpus", bool(g.get("gpus")), f"{len(g.get('gpus') or [])} GPU(s) read ({g.get('problem') or 'no problem'})")
    trainings = {"baseline": ([("completed", None)], "one attempt, completed"),
                 "val_in_place": ([("completed", None)], "one attempt: the validation OOM recovered in place"),
                 "val_relaunch": ([("oom", "val"), ("completed", None)], "a validation OOM, then a relaunch"),
                 "train_oom": ([("oom", "train"), ("completed", None)], "a training OOM, then half the batch")}
    for name, (expected, what) in trainings.items():
        if name not in figures:
            continue
        f = figures[name]
        seen = [(o, p if o == "oom" else None) for o, p in _attempts(f)]
        real = all(o["real"] for o in f.get("ooms", [])) or figures.get("dry")
        ok = f.get("exit") == 0 and seen == expected and (name == "baseline" or (f.get("ooms") and real))
        say(name, ok, f"{what}: exit {f.get('exit')}, attempts {seen}, OOM records {len(f.get('ooms', []))}")
    for kind, f in (figures.get("oom_forms") or {}).items():
        text = f.get("text") or ""
        ok = bool(text) and oom.is_oom_text(text)
        if kind == "allocator" and ok:
            ok = bool(oom.parse_message(text))
        if kind != "context":
            ok = ok and f.get("freed") is True
        first = text.splitlines()[0][:120] if text else f.get("crash", "no error raised")[-120:]
        say(f"oom_{kind}", ok, f"{f.get('error')}: {first}; memory back after it: {f.get('freed')}")
    r = figures.get("nvml_release")
    if r:
        ok = r.get("dry") or (r.get("listed_s") is not None and r.get("memory_s") is not None
                              and max(r["listed_s"], r["memory_s"]) <= r["bound_s"])
        say("nvml_release", ok, f"unlisted after {r.get('listed_s')} s, memory back after {r.get('memory_s')} s "
            f"(the relaunch waits at most {r.get('bound_s')} s)")
    return found


PARTS = frozenset({"probes", "trainings"})


def check(work: Path, dry: bool, timeout: float, parts: frozenset[str] | set[str] = PARTS) -> dict[str, Any]:
    from yolosafe.planning import datasets

    s = sizes(dry)
    env = environment(dry, work)
    figures: dict[str, Any] = {"dry": dry, "sizes": s}
    gpus = cli(["gpus", "--json"], env, work, 60)
    figures["gpus"] = json.loads(gpus["stdout"]) if gpus["exit"] == 0 else gpus
    total = float(((figures["gpus"].get("gpus") or [{}])[0]).get("total_mib") or 0)
    if "probes" in parts:
        figures["oom_forms"] = oom_forms(env, dry)
        figures["nvml_release"] = nvml_release(env, dry)
    if "trainings" not in parts:
        return figures
    data = datasets.ensure_shapes(work / "data", train=s["train_images"], val=s["val_images"], size=s["imgsz"])
    figures["data"] = str(data)
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
    parser.add_argument("--parts", default="probes,trainings", help="probes, trainings or both (comma-separated)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # a probe's own process
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.dry)), flush=True)
        return
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="yolosafe-gpu-check-") as tmp:
        figures = check(Path(tmp), args.dry, args.timeout, set(args.parts.split(",")))
    figures["seconds"] = round(time.time() - started, 1)
    figures["verdicts"] = verdicts(figures)
    args.out.write_text(json.dumps(figures, indent=2))
    for name, v in figures["verdicts"].items():
        print(f"{'pass' if v['pass'] else 'FAIL'} {name:>13}: {v['why']}")
    print(f"figures: {args.out} ({figures['seconds']} s)")
    raise SystemExit(0 if all(v["pass"] for v in figures["verdicts"].values()) else 1)


if __name__ == "__main__":
    main()
