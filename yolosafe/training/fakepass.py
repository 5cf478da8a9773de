"""Measure a model's memory terms without a GPU: a fake-tensor pass for the network, a real CPU pass for the loss.

Run as ``python -m yolosafe.training.fakepass MODEL.yaml [--imgsz 640]`` by ``tools/make_memtable.py`` for the
shipped table and by ``yolosafe plan`` for a custom model YAML (:func:`yolosafe.supervisor.children.fake_pass`),
always in a child process: it imports torch and ultralytics, which the CLI must not. Its command line is a
:class:`~yolosafe.rundir.childrecords.FakePassRequest`, its answer a
:class:`~yolosafe.rundir.childrecords.FakePassResult`, one JSON line on stdout.

Why these tools: torch's ``MemTracker`` counts every tensor a module holds, by kind (parameters, activations saved
for backward, gradients, optimizer state), and under ``FakeTensorMode`` no tensor has real storage, so a yolov8x
step at batch 2 and 640 px is "run" on a laptop CPU in seconds. The parameters must be fake CPU tensors (fake
``cuda`` tensors need CUDA). The loss cannot run on fake tensors (its target assignment has data-dependent shapes),
so it is measured for real, on CPU, at a small size, and scaled by the number of anchors (quadratic in imgsz).
Activations are exactly linear in the batch, so two batches give the fixed and per-image terms.
"""

from __future__ import annotations

import sys
from typing import Any

from yolosafe.rundir.childrecords import FakePassRequest, FakePassResult

MIB = 2**20
LOSS_IMGSZ = 160  # the real CPU loss pass: anchors scale as imgsz², so 160 px is 1/16 of 640's
LOSS_OBJECTS = (4, 64, 256, 1024)  # labels per image in the loss passes: the measured curve; 256 -> 1024 is where
# the assigner's batch x objects x anchors tensors dominate a detection loss (a crowded image)


def _tracker_total(run: Any, module: Any, optimizer: Any = None) -> float:
    """Peak MiB of everything ``run()`` keeps alive, as torch's MemTracker counts it."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    external = [x for x in (module, optimizer) if x is not None]
    if external:
        tracker.track_external(*external)
    with tracker:
        run()
    peaks = tracker.get_tracker_snapshot("peak")
    return max(float(kinds.get("Total", 0)) for dev, kinds in peaks.items() if isinstance(dev, torch.device)) / MIB


def _leaves(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [leaf for item in items for leaf in _leaves(item)]


def build(model: str) -> Any:
    """The real model from its YAML, built as ``YOLO(model)`` builds it (its task map; offline: nothing downloads),
    every parameter trainable as Ultralytics trains."""
    from ultralytics import YOLO

    return YOLO(model, verbose=False).model


def _fake_copy(model: Any, mode: Any, half: bool = False) -> Any:
    """The same module with fake parameters and buffers (the real ones are dropped); ``half`` as validation runs."""
    import copy

    import torch

    fake = copy.deepcopy(model).half() if half else copy.deepcopy(model)
    for sub in fake.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[key] = torch.nn.Parameter(mode.from_tensor(p.detach()), requires_grad=True)
        for key, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[key] = mode.from_tensor(b)
        if isinstance(getattr(sub, "stride", None), torch.Tensor):  # the head's anchors read it as numbers
            sub.stride = sub.stride.tolist()
    return fake


def network_peaks(model: Any, imgsz: int, batch: int) -> dict[str, float]:
    """Fake-tensor peaks (MiB) of one AMP training step without the loss, and of one validation forward in half."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # Detect.stride is a plain tensor attribute
    train_net, val_net = _fake_copy(model, mode), _fake_copy(model, mode, half=True)
    with mode:
        train_net.train()
        x = torch.randn(batch, 3, imgsz, imgsz)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 and fp16 are the same size
                out = train_net(x)
            sum(o.float().sum() for o in _leaves(out)).backward()

        train = _tracker_total(step, train_net)
        val_net.eval()
        xh = x.half()

        def forward() -> None:
            with torch.no_grad():
                val_net(xh)

        val = _tracker_total(forward, val_net)
    return {"train": train, "val": val}


def _targets(model: Any, task: str, batch: int, objects: int, x: Any) -> dict[str, Any]:
    """A batch of ``objects`` random labels per image, as Ultralytics' collate_fn gives them to the task's loss."""
    import torch

    n, imgsz = batch * objects, x.shape[-1]
    xy = torch.rand(n, 2) * 0.8 + 0.1
    boxes = torch.cat([xy, torch.full((n, 2), 0.1)], 1)
    targets: dict[str, Any] = {"batch_idx": torch.arange(batch).repeat_interleave(objects).float(),
                               "cls": torch.zeros(n, 1), "bboxes": boxes, "img": x}
    if task == "classify":
        return {"cls": torch.zeros(batch, dtype=torch.long), "img": x}
    if task == "obb":
        targets["bboxes"] = torch.cat([boxes, torch.rand(n, 1)], 1)
    if task == "pose":
        kpt = list(getattr(model, "kpt_shape", None) or model.yaml.get("kpt_shape", [17, 3]))
        targets["keypoints"] = torch.rand(n, *kpt)
    if task == "segment":  # overlap_mask=True: one mask per image at imgsz / mask_ratio, pixel = object index
        ratio = int(model.args.mask_ratio)
        targets["masks"] = torch.randint(0, objects + 1, (batch, imgsz // ratio, imgsz // ratio)).float()
    return targets


def loss_peak(model: Any, batch: int, objects: int) -> float:
    """Real CPU peak (MiB) of the task's loss and its backward at LOSS_IMGSZ with ``objects`` labels per image."""
    import torch
    from ultralytics.cfg import get_cfg

    model.args = get_cfg()
    model.train()
    x = torch.rand(batch, 3, LOSS_IMGSZ, LOSS_IMGSZ)
    preds = model(x)
    targets = _targets(model, task_of(model), batch, objects, x)
    detached = [p.detach().requires_grad_() for p in _leaves(preds)]

    def run() -> None:
        rebuilt = _rebuild(preds, iter(detached))
        loss, _ = model.loss(targets, rebuilt)
        loss.sum().backward()

    return _tracker_total(run, None)  # the predictions are detached: only the loss's own tensors count


def task_of(model: Any) -> str:
    from ultralytics.nn.tasks import guess_model_task

    return guess_model_task(model.yaml)


def _rebuild(out: Any, leaves: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return next(leaves)
    if isinstance(out, dict):
        return {k: _rebuild(v, leaves) for k, v in out.items()}
    return type(out)(_rebuild(v, leaves) for v in out)


def loss_terms(model: Any, imgsz: int) -> dict[str, Any]:
    """The task's loss at ``imgsz``: MiB per image at each of LOSS_OBJECTS labels per image (the curve), measured at
    LOSS_IMGSZ and scaled by the anchor count (imgsz²); its first point and last slope as per image / per object; the
    task and the head's output channels per anchor (NMS's candidates)."""
    import ultralytics

    task, head = task_of(model), model.model[-1]
    entry: dict[str, Any] = {"task": task, "head_outputs": 4 + int(getattr(head, "nc", 0)) + sum(
        int(getattr(head, k, 0) or 0) for k in ("nm", "nk", "ne"))}
    scale = (imgsz / LOSS_IMGSZ) ** 2
    counts = LOSS_OBJECTS[:1] if task == "classify" else LOSS_OBJECTS
    one = loss_peak(model, 1, counts[0])
    two = {n: loss_peak(model, 2, n) for n in counts}
    fixed = max(2 * one - two[counts[0]], 0.0)  # what does not grow with the batch
    curve = [(n, round((two[n] - fixed) / 2 * scale, 3)) for n in counts]
    entry["loss_curve"] = curve
    slope = (curve[-1][1] - curve[-2][1]) / (curve[-1][0] - curve[-2][0]) if len(curve) > 1 else 0.0
    entry["loss_per_object_mib"] = round(slope, 4)
    entry["loss_per_image_mib"] = round(curve[0][1] - slope * curve[0][0], 3)
    entry["loss_source"] = (f"fake pass: the {task} loss measured on CPU at {LOSS_IMGSZ} px with "
                            f"{'/'.join(map(str, counts))} labels per image (ultralytics {ultralytics.__version__})")
    return entry


def measure(model_path: str, imgsz: int = 640, loss_only: bool = False) -> FakePassResult:
    """All terms of one model at ``imgsz``: parameters, fixed + per-image MiB for train, val and the loss."""
    import torch
    import ultralytics

    model = build(model_path)
    entry: dict[str, Any] = {"imgsz": imgsz}
    if not loss_only:
        one, two = network_peaks(model, imgsz, 1), network_peaks(model, imgsz, 2)
        entry.update(params=sum(p.numel() for p in model.parameters()),
                     buffers_mib=sum(b.numel() * b.element_size() for b in model.buffers()) / MIB)
        for phase in ("train", "val"):
            per_image = two[phase] - one[phase]
            entry[f"{phase}_act_per_image_mib"] = round(per_image, 3)
            entry[f"{phase}_act_fixed_mib"] = round(one[phase] - per_image, 3)
        entry["source"] = f"fake pass (torch {torch.__version__}, ultralytics {ultralytics.__version__})"
    try:
        entry.update(loss_terms(model, imgsz))
    except Exception as exc:  # a loss the CPU pass cannot run: the plan refuses the model rather than guess
        entry["loss_error"] = f"{type(exc).__name__}: {exc}"
    return FakePassResult(**entry)


def main(argv: list[str] | None = None) -> None:
    from yolosafe import proc

    proc.reset_inherited_signals()  # a Ctrl-C reaches it however yolosafe was started
    request = FakePassRequest.from_args(argv, description=__doc__.split("\n")[0])
    result = measure(request.model, request.imgsz, request.loss_only)
    sys.stdout.write(result.to_json() + "\n")


if __name__ == "__main__":
    main()
