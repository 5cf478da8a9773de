"""Every private Ultralytics detail yolosafe relies on, in one list, each with a cheap check that names it.

yolosafe subclasses Ultralytics' trainers and hooks its callbacks (trainer.py, callbacks.py, fakephase.py, worker.py,
plan.py): it leans on details Ultralytics does not promise to keep. When a new Ultralytics changes one, the check of
that detail fails with its name, what yolosafe assumes and where in Ultralytics it lives, instead of an OOM recovery
that silently does the wrong thing. The checks read Ultralytics' source (``inspect``/``ast``) or make tiny real calls:
no training, no GPU. tests/test_compat.py runs them all; the worker warns in one line when the installed Ultralytics
is outside :data:`SUPPORTED` (the range whose private details were verified; pyproject declares the same range).
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yolosafe.planning import accumulation

SUPPORTED = (">=8.4.190", "<8.5")  # pyproject.toml's ultralytics requirement; constraints.txt pins the tested one


class CompatError(AssertionError):
    """An assumption about Ultralytics does not hold; ``str()`` names it."""


class CheckFailed(CompatError):
    """One check's finding (what :meth:`Assumption.verify` wraps with the assumption's name). Raised by
    :func:`_require`, never by ``assert``: ``python -O`` strips asserts, and a check must not pass by being gone."""


def _require(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class Assumption:
    name: str
    assumes: str  # what yolosafe takes for granted
    where: str  # Ultralytics module.function
    check: Callable[[], None]  # raises CheckFailed (with details) when the assumption is broken

    def verify(self) -> None:
        try:
            self.check()
        except Exception as exc:
            raise CompatError(f"Ultralytics assumption '{self.name}' broken ({self.where}): yolosafe assumes "
                              f"{self.assumes}; {type(exc).__name__}: {exc}") from exc


def _source(obj: Any) -> str:
    """The source with whitespace collapsed, so formatting changes do not break a check."""
    return " ".join(inspect.getsource(obj).split())


def _in_order(obj: Any, *needles: str) -> None:
    """Each needle occurs in ``obj``'s source, after the previous one."""
    text, at = _source(obj), 0
    for needle in needles:
        found = text.find(needle, at)
        _require(found >= 0, f"{needle!r} not found{' after the previous step' if at else ''} in {obj.__qualname__}")
        at = found + len(needle)


def _rank_guarded(func: Any, event: str) -> bool:
    """Whether ``func`` runs callback ``event`` only inside an ``if`` on ``RANK`` (e.g. ``if RANK in {-1, 0}``)."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(func)))
    guarded: list[bool] = []

    def visit(node: ast.AST, under_rank: bool) -> None:
        if isinstance(node, ast.Call) and ast.unparse(node).endswith(f"run_callbacks({event!r})"):
            guarded.append(under_rank)
        for child in ast.iter_child_nodes(node):
            rank_if = isinstance(node, ast.If) and "RANK" in ast.unparse(node.test) and child in node.body
            visit(child, under_rank or rank_if)

    visit(tree, False)
    _require(guarded, f"{func.__qualname__} does not run {event!r}")
    return all(guarded)


def _trainer() -> Any:
    from ultralytics.engine.trainer import BaseTrainer

    return BaseTrainer


def _check_oom_retries() -> None:
    _in_order(_trainer()._do_train, "self._oom_retries = 0", 'self.run_callbacks("on_train_epoch_start")',
              "except RuntimeError", "self._oom_retries >= 3", "raise")


def _check_do_train_signature() -> None:
    params = list(inspect.signature(_trainer()._do_train).parameters)
    _require(params == ["self"], f"_do_train{inspect.signature(_trainer()._do_train)}")
    _in_order(_trainer().train, "if self.ddp:", "generate_ddp_command(self)", "else: self._do_train()")
    _in_order(_trainer()._do_train, "self._setup_ddp()", "self._setup_train()", "self.final_eval()")


def _check_val_loader() -> None:
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.models.yolo.detect import DetectionTrainer

    _in_order(_trainer()._build_train_pipeline, "self.test_loader = self.get_dataloader(", 'mode="val"')
    _in_order(DetectionTrainer.get_validator, "self.test_loader")
    _in_order(BaseValidator.__call__, "self.dataloader = self.dataloader or", 'self.run_callbacks("on_val_start")')
    _in_order(_trainer().final_eval, "self.validator(model=model)")


def _check_preprocess_in_try() -> None:
    import torch

    _require(issubclass(torch.OutOfMemoryError, RuntimeError), "torch.OutOfMemoryError is no RuntimeError")
    _in_order(_trainer()._do_train, 'self.run_callbacks("on_train_batch_start")', "try:",
              "batch = self.preprocess_batch(batch)", "self.scaler.scale(self.loss).backward()", "except RuntimeError")


def _check_save_model() -> None:
    _in_order(_trainer().__init__, 'self.last, self.best = self.wdir / "last.pt", self.wdir / "best.pt"')
    _in_order(_trainer().save_model, "self.last.write_bytes(", "if self.best_fitness == self.fitness:",
              "self.best.write_bytes(", 'self.wdir / f"epoch{self.epoch}.pt"')
    writes = _source(_trainer().save_model).count(".write_bytes(")
    _require(writes == 3, f"{writes} checkpoint writes, not last, best and epochN")


def _check_final_eval_writes() -> None:
    _in_order(_trainer().final_eval, "strip_optimizer(self.last)", "strip_optimizer(self.best")


def _check_callback_order() -> None:
    _in_order(_trainer()._do_train, "self.epoch = epoch", 'self.run_callbacks("on_train_epoch_start")',
              'self.run_callbacks("on_train_batch_start")', 'self.run_callbacks("on_train_epoch_end")',
              "self.validate()", "self.save_model()", 'self.run_callbacks("on_fit_epoch_end")', "self.final_eval()",
              'self.run_callbacks("on_train_end")')
    _in_order(_trainer().final_eval, "self.validator(model=model)", 'self.run_callbacks("on_fit_epoch_end")')


def _check_val_batch_start() -> None:
    from ultralytics.engine.validator import BaseValidator

    _in_order(BaseValidator.__call__, 'self.run_callbacks("on_val_start")', "for batch_i, batch in enumerate(",
              'self.run_callbacks("on_val_batch_start")', "batch = self.preprocess(batch)", "preds = model(")


def _check_callback_ranks() -> None:
    from ultralytics.engine.validator import BaseValidator

    trainer = _trainer()
    for event in ("on_train_epoch_start", "on_train_batch_start", "on_train_epoch_end", "on_fit_epoch_end"):
        _require(not _rank_guarded(trainer._do_train, event), f"{event} no longer runs on every rank")
    for event in ("on_val_start", "on_val_batch_start"):
        _require(not _rank_guarded(BaseValidator.__call__, event), f"{event} no longer runs on every rank")
    _require(_rank_guarded(BaseValidator.__call__, "on_val_end"), "on_val_end now runs on every rank")
    _in_order(trainer._setup_train, "self._build_train_pipeline()", "self.validator = self.get_validator()",
              "if RANK in {-1, 0}:")


def _check_resume_batch() -> None:
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(_trainer().check_resume)))
    allowed = next((n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and ast.unparse(n.targets[0]) == "allowed"), None)
    _require(isinstance(allowed, ast.Set), "no 'allowed' set of resume overrides")
    keys = {e.value for e in allowed.elts if isinstance(e, ast.Constant)}
    _require({"batch", "device", "workers", "plots"} <= keys, f"resume overrides {sorted(keys)}")
    _in_order(_trainer().resume_training, 'start_epoch = ckpt.get("epoch", -1) + 1')
    _in_order(_trainer().save_model, '"epoch": self.epoch')


def _check_accumulate() -> None:
    _in_order(_trainer()._build_train_pipeline, "batch_size = self.batch_size // max(self.world_size, 1)",
              "self.accumulate = max(round(self.args.nbs / self.batch_size), 1)", "if not self.args.time:",
              "self.accumulate = min(self.accumulate, len(self.train_loader) * self.epochs)")
    for nbs, batch, iterations in ((64, 16, None), (16, 8, 8), (64, 8, 4), (100, 48, None), (96, 64, 1)):
        capped = max(round(nbs / batch), 1) if iterations is None else min(max(round(nbs / batch), 1), iterations)
        _require(accumulation.nominal_accumulate(nbs, batch, iterations) == capped, str((nbs, batch, iterations)))


def _check_warmup() -> None:
    from types import SimpleNamespace

    import numpy as np

    _in_order(_trainer()._do_train, "nw = self._get_warmup_iterations(nb)", "acc0 = self.accumulate",
              "ni = i + nb * epoch", "if nw and ni <= nw:", "xi = [0, nw]",
              "self.accumulate = max(1, int(np.interp(ni, xi, [1, acc0]).round()))")
    for warmup_epochs, epochs, nb in ((3.0, 100, 7), (3.0, 2, 4), (0.5, 10, 3), (0.0, 5, 9), (3.0, 1, 4)):
        fake = SimpleNamespace(args=SimpleNamespace(warmup_epochs=warmup_epochs), epochs=epochs)
        real = _trainer()._get_warmup_iterations(fake, nb)
        ours = accumulation.warmup_iterations(warmup_epochs, epochs, nb)
        _require(real == ours, f"warmup_epochs={warmup_epochs}, epochs={epochs}, {nb} batches: {real} != plan's {ours}")
    for acc0 in (1, 2, 3, 4, 7, 16):
        for nw in (1, 2, 4, 5, 12, 21):
            for ni in range(nw + 1):
                real = max(1, int(np.interp(ni, [0, nw], [1, acc0]).round()))
                ours = accumulation.warmup_accumulate(ni, nw, acc0)
                _require(ours == real, f"iteration {ni} of {nw}, accumulate {acc0}: {real} != plan's {ours}")


def _check_loader_length() -> None:
    from ultralytics.data.build import build_dataloader

    _in_order(build_dataloader, "batch = min(batch, dataset_len)", "distributed.DistributedSampler(dataset,")
    for images, batch in ((32, 8), (30, 8), (5, 8), (16, 16), (33, 4)):
        loader = build_dataloader(list(range(images)), batch, 0, shuffle=True, rank=-1, device="cpu")
        _require(len(loader) == accumulation.batches_per_epoch(images, batch, 1), str((images, batch)))
    _require(accumulation.batches_per_epoch(33, 4, 2) == math.ceil(math.ceil(33 / 2) / 4),  # DistributedSampler pads up
             "33 images over 2 ranks in batches of 4")


def _check_defaults() -> None:
    import yaml
    from ultralytics.utils import DEFAULT_CFG_PATH

    cfg = yaml.safe_load(DEFAULT_CFG_PATH.read_text())
    _require(cfg["nbs"] == accumulation.ULTRALYTICS_DEFAULT_NBS, f"nbs default {cfg['nbs']}")
    warmup = cfg["warmup_epochs"]
    _require(warmup == accumulation.ULTRALYTICS_DEFAULT_WARMUP_EPOCHS, f"warmup_epochs {warmup}")


def _check_ddp_flag() -> None:  # train() acting on it: _check_do_train_signature
    _in_order(_trainer().__init__, "self.ddp = world_size > 1 and LOCAL_RANK == -1", "self.world_size = world_size")


def _check_model_api() -> None:
    from ultralytics.engine.model import Model

    _require("trainer" in inspect.signature(Model.train).parameters, "Model.train has no 'trainer' argument")
    _in_order(Model.train, "(trainer or self._smart_load(\"trainer\"))(overrides=args, _callbacks=self.callbacks)")
    _in_order(Model._load, "self.ckpt")



def _check_ddp_setup() -> None:  # what cpuranks' _setup_ddp replaces on the CPU
    _in_order(_trainer()._setup_ddp, "index = int(devices[LOCAL_RANK])", "self.device = torch.device(device_type, "
              "index)", "self.accelerator.set_device(index)", "dist.init_process_group(", "rank=RANK",
              "world_size=self.world_size")


def _check_ddp_device_ids() -> None:  # what cpuranks' DistributedDataParallel replaces on the CPU
    _in_order(_trainer()._setup_train, "if self.world_size > 1:", "nn.parallel.DistributedDataParallel(",
              "device_ids=[self.device.index]")


def _environ_writes(func: Any) -> list[str]:
    """The statements of ``func`` that may write ``CUDA_VISIBLE_DEVICES``: an item of ``os.environ`` set under that
    name, or the environment changed wholesale (update/setdefault/pop/putenv)."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(func)))
    found = []
    for node in ast.walk(tree):
        targets = [node.target] if isinstance(node, ast.AugAssign) else getattr(node, "targets", [])
        item = any(isinstance(t, ast.Subscript) and "environ" in ast.unparse(t.value)
                   and "CUDA_VISIBLE_DEVICES" in ast.unparse(t.slice) for t in targets)
        method = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
            node.func.attr in {"putenv", "unsetenv"}
            or (node.func.attr in {"update", "setdefault", "pop"} and "environ" in ast.unparse(node.func)))
        if item or method:
            found.append(ast.unparse(node)[:80])
    return found


def _check_select_device_keeps_visible() -> None:
    import os

    from ultralytics.utils import torch_utils

    writes = _environ_writes(torch_utils.select_device)
    _require(not writes, f"select_device writes the environment: {writes}")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    torch_utils.select_device("cpu", verbose=False)  # older releases set CUDA_VISIBLE_DEVICES=-1 here
    _require(os.environ.get("CUDA_VISIBLE_DEVICES") == before, "select_device('cpu') changed CUDA_VISIBLE_DEVICES")


def _check_final_val_device() -> None:  # what cpuranks' final_eval replaces on the CPU
    from ultralytics.engine import validator

    _in_order(validator.BaseValidator.__call__, "model = AutoBackend(", "select_device(self.args.device) if RANK "
              "== -1 else torch.device(device_type, get_torch_device_backend(device_type).current_device())")
    _require(callable(getattr(validator, "get_torch_device_backend", None)) and callable(validator.AutoBackend),
             "ultralytics.engine.validator no longer imports get_torch_device_backend and AutoBackend")


ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption("oom_retries_cap", "a training-step OOM is re-raised once trainer._oom_retries >= 3, and the counter "
               "is reset before on_train_epoch_start (which sets it to 3: no in-process halving)",
               "ultralytics.engine.trainer.BaseTrainer._do_train", _check_oom_retries),
    Assumption("do_train_signature", "_do_train(self) takes no arguments and runs the whole training (DDP setup to "
               "final_eval) in a single process and in every DDP rank", "BaseTrainer.train/_do_train",
               _check_do_train_signature),
    Assumption("val_loader_from_get_dataloader", "get_dataloader(mode='val') builds the validation loader that the "
               "validator (and final_eval) reuses", "BaseTrainer._build_train_pipeline, DetectionTrainer."
               "get_validator, BaseValidator.__call__", _check_val_loader),
    Assumption("preprocess_batch_in_oom_try", "preprocess_batch runs inside the training step's try whose "
               "'except RuntimeError' handles OOMs", "BaseTrainer._do_train", _check_preprocess_in_try),
    Assumption("save_model_paths", "save_model writes last.pt and best.pt only through self.last/self.best (best only "
               "when fitness improved); epochN.pt bypasses them", "BaseTrainer.save_model", _check_save_model),
    Assumption("final_eval_strip_writes", "final_eval rewrites last.pt and best.pt in place (strip_optimizer), "
               "outside save_model", "BaseTrainer.final_eval", _check_final_eval_writes),
    Assumption("final_eval_callback_order", "each epoch runs on_train_epoch_start (after setting trainer.epoch), "
               "on_train_batch_start per batch, on_train_epoch_end, validation, save_model, on_fit_epoch_end; then "
               "final_eval validates best.pt and runs on_fit_epoch_end, before on_train_end",
               "BaseTrainer._do_train/final_eval", _check_callback_order),
    Assumption("val_batch_start_per_batch", "on_val_batch_start runs once per validation batch before its forward "
               "pass (yolosafe counts the batches itself, never reads validator.batch_i: it is set after the callback)",
               "ultralytics.engine.validator.BaseValidator.__call__", _check_val_batch_start),
    Assumption("callback_ranks", "train epoch/batch callbacks, on_fit_epoch_end, on_val_start and on_val_batch_start "
               "run on every rank, on_val_end on rank 0 only; every rank has a validator",
               "BaseTrainer._do_train/_setup_train, BaseValidator.__call__", _check_callback_ranks),
    Assumption("resume_accepts_batch", "resume accepts a new batch/device/workers/plots and starts at the "
               "checkpoint's epoch + 1", "BaseTrainer.check_resume/resume_training", _check_resume_batch),
    Assumption("accumulate_formula", "accumulate = max(round(nbs / total batch), 1), capped at len(train_loader) * "
               "epochs unless time=", "BaseTrainer._build_train_pipeline", _check_accumulate),
    Assumption("warmup_ramp", "warm-up ramps accumulate from 1 to its nominal value by np.interp over the "
               "_get_warmup_iterations first iterations", "BaseTrainer._do_train/_get_warmup_iterations",
               _check_warmup),
    Assumption("train_loader_length", "len(train_loader) per rank = ceil(ceil(images / world) / per-GPU batch)",
               "ultralytics.data.build.build_dataloader", _check_loader_length),
    Assumption("default_cfg", "Ultralytics' defaults nbs=64 and warmup_epochs=3.0 (accumulation.py's constants)",
               "ultralytics/cfg/default.yaml", _check_defaults),
    Assumption("ddp_flag", "BaseTrainer.__init__ sets self.ddp and world_size (Ultralytics' own rank launch) from "
               "the device string, and train() launches ranks only if self.ddp, else runs _do_train here: yolosafe "
               "sets ddp False and the world size from its launcher after __init__", "BaseTrainer.__init__/train",
               _check_ddp_flag),
    Assumption("model_train_api", "Model.train(trainer=cls) instantiates our trainer with the model's callbacks, and "
               "a loaded model keeps its checkpoint in model.ckpt", "ultralytics.engine.model.Model.train/_load",
               _check_model_api),
    Assumption("ddp_setup_device", "_setup_ddp takes the rank's device from the device string at LOCAL_RANK, calls "
               "set_device before init_process_group (the CPU ranks of fake GPUs replace it with the CPU and gloo)",
               "BaseTrainer._setup_ddp", _check_ddp_setup),
    Assumption("ddp_device_ids", "DDP wraps the model with device_ids=[self.device.index] (the CPU ranks pass None)",
               "BaseTrainer._setup_train", _check_ddp_device_ids),
    Assumption("select_device_keeps_visible", "select_device never writes CUDA_VISIBLE_DEVICES: the supervisor's "
               "list of GPU UUIDs stays what every rank sees", "ultralytics.utils.torch_utils.select_device",
               _check_select_device_keeps_visible),
    Assumption("final_val_current_device", "the validation of a DDP rank builds AutoBackend on the current device "
               "of its backend (the CPU ranks answer device 0 and build it on the CPU)",
               "ultralytics.engine.validator.BaseValidator.__call__", _check_final_val_device),
)


def failed() -> list[str]:
    """The names of the assumptions the installed Ultralytics breaks."""
    names = []
    for assumption in ASSUMPTIONS:
        try:
            assumption.verify()
        except CompatError:
            names.append(assumption.name)
    return names


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def supported(version: str) -> bool:
    low, high = (_version(bound) for bound in SUPPORTED)
    return low <= _version(version) < high


def version_warning(version: str) -> str | None:
    """One line when ``version`` is outside :data:`SUPPORTED`: which assumptions are unverified, which fail."""
    if supported(version):
        return None
    broken = failed()
    verdict = f"these checks fail: {', '.join(broken)}" if broken else "the cheap checks pass"
    return (f"yolosafe: warning: ultralytics {version} is outside the supported range {','.join(SUPPORTED)}; "
            f"unverified assumptions: {', '.join(a.name for a in ASSUMPTIONS)}; {verdict}")
