"""What Ultralytics hands its DDP ranks: no GPU here, so the rank side is replayed in a fresh interpreter.

Ultralytics' multi-GPU launch pickles ``type(trainer)`` and ``trainer.callbacks`` with cloudpickle into a state file
(``ultralytics.utils.dist.generate_ddp_file``) that every rank loads to rebuild the trainer. This test makes that
file from a real yolosafe trainer, then loads it in a new process, as a rank does, and checks that yolosafe's trainer
and callbacks arrive by reference and that the rebuilt trainer's validation loader has yolosafe's ``--val-batch``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env

pytestmark = pytest.mark.slow  # real Ultralytics trainings on CPU

MAKE = """
import sys
from ultralytics import YOLO
from ultralytics.utils.dist import generate_ddp_file
from yolosafe import callbacks, datasets
from yolosafe.trainer import SafeDetectionTrainer

model = YOLO("yolov8n.yaml")
callbacks.register(model)
args = {"model": "yolov8n.yaml", "data": str(datasets.ensure_shapes()), "device": "cpu", "epochs": 1, "imgsz": 64,
        "batch": 8, "project": sys.argv[1], "name": "ddp", "exist_ok": True, "plots": False}
trainer = SafeDetectionTrainer(overrides=args, _callbacks=model.callbacks)
print(generate_ddp_file(trainer))
"""

RANK = """
import sys
from pathlib import Path
from ultralytics.utils import DEFAULT_CFG_DICT
from ultralytics.utils.patches import torch_load
from yolosafe import callbacks

state = torch_load(str(Path(sys.argv[1]).with_suffix(".pt")), map_location="cpu")
cls = state["trainer"]
assert (cls.__module__, cls.__name__) == ("yolosafe.trainer", "SafeDetectionTrainer"), cls
for event, fn in callbacks.CALLBACKS.items():
    assert fn in state["callbacks"][event], event  # the very functions: imported, not copied
trainer = cls(cfg=DEFAULT_CFG_DICT | {"save_dir": ""}, overrides=state["args"], _callbacks=state["callbacks"])
trainer.model = state["model"]
trainer.setup_model()  # what _setup_train does first in a rank
loader = trainer.get_dataloader(trainer.data["val"], batch_size=16, rank=-1, mode="val")  # Ultralytics asks 2 x 8
print("VAL_BATCH", loader.batch_size)
"""


def test_ddp_state_carries_yolosafe_trainer_callbacks_and_val_batch(tmp_path: Path, shared_cache: Path):
    env = cli_env(shared_cache, {"YOLO_CONFIG_DIR": str(tmp_path / "ultralytics")})
    made = subprocess.run([sys.executable, "-c", MAKE, str(tmp_path)], env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    ddp_file = made.stdout.strip().splitlines()[-1]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"attempt": 1, "val_batch": 4}))
    rank_env = env | {"YOLOSAFE_SPEC": str(spec), "YOLOSAFE_RUN_DIR": str(tmp_path)}
    rank = subprocess.run([sys.executable, "-c", RANK, ddp_file], env=rank_env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert rank.returncode == 0, rank.stderr[-3000:]
    assert "VAL_BATCH 4" in rank.stdout


LAUNCH = """
import subprocess, sys
from pathlib import Path
from ultralytics.engine import trainer as engine
from yolosafe import datasets
from yolosafe.trainer import SafeDetectionTrainer

args = {"model": "yolov8n.yaml", "data": str(datasets.ensure_shapes()), "device": "cpu", "epochs": 1, "imgsz": 64,
        "batch": 8, "project": sys.argv[1], "name": "ddp", "exist_ok": True, "plots": False}
trainer = SafeDetectionTrainer(overrides=args)
(trainer.save_dir / "yolosafe.json").write_text("{}")
trainer.ddp, trainer.world_size = True, 2  # what '--gpus 0,1' makes of it on a machine with GPUs
launched = []
engine.subprocess.run = lambda cmd, check: launched.append(cmd)  # the ranks themselves need GPUs
trainer.train()
assert "torch.distributed.run" in launched[0], launched
print("KEPT", (trainer.save_dir / "yolosafe.json").is_file(), trainer.resume)
"""


def test_fresh_ddp_launch_keeps_the_run_directory(tmp_path: Path, shared_cache: Path):
    """Ultralytics deletes save_dir before a fresh DDP launch; yolosafe's story, log and spec live there."""
    env = cli_env(shared_cache, {"YOLO_CONFIG_DIR": str(tmp_path / "ultralytics")})
    result = subprocess.run([sys.executable, "-c", LAUNCH, str(tmp_path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KEPT True False" in result.stdout
