"""The CLI without training: bad input, the dry run, start-up cost, the GPU table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_dir_of

FOUR = {"YOLOSAFE_FAKE_GPUS": "4x24GB"}


def assert_usage_error(result, *words):
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["--gpus", "0,0"], FOUR, ["GPU 0 is listed twice"]),
        (["--gpus", "9"], FOUR, ["no GPU 9", "0, 1, 2, 3"]),
        (["--gpus", "a,b"], FOUR, ["not a GPU id"]),
        (["--gpus", "0,1,2,3"], {"YOLOSAFE_FAKE_GPUS": "none"}, ["no GPU", "--gpus cpu"]),
        (["--gpus", "0,1,2,3"], {}, ["no GPU", "--gpus cpu"]),  # the real NVML path: this machine has no driver
        (["--gpus", "0,1,2,3", "--batch", "6"], FOUR, ["does not split evenly over 4 GPUs", "4 or 8"]),
        (["--batch", "0"], FOUR, ["--batch 0"]),
        (["--batch", "abc"], FOUR, ["--batch", "abc"]),
        (["--effective-batch", "8", "--batch", "16"], FOUR, ["--effective-batch 8 is smaller than --batch 16"]),
        (["--alloc-conf", "expandable_segments:maybe"], FOUR, ["--alloc-conf", "expandable_segments"]),
        (["--alloc-conf", "garbage"], FOUR, ["--alloc-conf", "garbage"]),
        (["--data", "nonexistent"], FOUR, ["unknown dataset", "shapes"]),
        (["--data", "missing/data.yaml"], FOUR, ["file not found"]),
        (["accumulate=4"], FOUR, ["'accumulate' is not an Ultralytics train argument", "--effective-batch"]),
        (["epoch=3"], FOUR, ["did you mean 'epochs'"]),
        (["--batch", "8", "batch=3"], FOUR, ["--batch 8 and batch=3 disagree"]),
        (["--batch", "1.5"], FOUR, ["--batch 1.5", "between 0 and 1"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_cli, tmp_path, args, env, words):
    assert_usage_error(run_cli("train", *args, env=env), *words)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_bad_user_allocator_env_names_the_variable(run_cli):
    result = run_cli("train", "--dry-run", env={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:abc"})
    assert_usage_error(result, "PYTORCH_CUDA_ALLOC_CONF")


def test_registry_entry_pointing_to_missing_file(run_cli, tmp_path):
    (tmp_path / "datasets.yaml").write_text("datasets:\n  coco:\n    path: data/coco.yaml\n")
    assert_usage_error(run_cli("train", "--data", "coco"), "coco", "does not exist")


def test_malformed_config(run_cli, tmp_path):
    (tmp_path / "bad.yaml").write_text("batch: [16\n")
    assert_usage_error(run_cli("train", "--config", "bad.yaml"), "--config bad.yaml", "not valid YAML")
    (tmp_path / "typo.yaml").write_text("batchsize: 16\n")
    assert_usage_error(run_cli("train", "--config", "typo.yaml"), "unknown key", "batchsize")


def test_dry_run_four_fake_gpus(run_cli):
    result = run_cli("train", "--gpus", "0,1,2,3", "--batch", "64", "--effective-batch", "128", "--dry-run", env=FOUR)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("0,1,2,3", "64 total = 16 per GPU", "nbs 128", "accumulate 2", "16 per GPU",
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "-m yolosafe.training.worker", '"nbs": 128',
                 # shapes: 32 images over 4 ranks = 1 batch of 16 per epoch, 3 epochs; warm-up min(3, 3 - 1) epochs
                 "accumulation     2, at most the run's 3 iterations (1 per epoch); ramped 1 -> 2 over its first 2",
                 "-m yolosafe.training.launcher --nnodes 1 --nproc-per-node 4", "each one a rank process on the CPU"):
        assert text in out, out


def test_config_file_and_flag_precedence(run_cli, tmp_path):
    (tmp_path / "run.yaml").write_text("gpus: [0, 1]\nbatch: 32\neffective-batch: 64\nepochs: 7\nargs:\n  lr0: 0.02\n")
    result = run_cli("train", "--config", "run.yaml", "--batch", "16", "--dry-run", env=FOUR)
    assert result.returncode == 0, result.stderr
    assert "16 total = 8 per GPU" in result.stdout and "accumulate 4" in result.stdout
    assert '"epochs": 7' in result.stdout and '"lr0": 0.02' in result.stdout and "0,1  (2 GPUs)" in result.stdout


def test_dry_run_never_reuses_a_run_name(run_cli, tmp_path):
    run_dir_of(tmp_path).mkdir(parents=True)
    result = run_cli("train", "--dry-run")
    assert "runs/detect/train2" in result.stdout


def test_allocator_merges_user_env(run_cli):
    result = run_cli("train", "--dry-run", "--alloc-conf", "garbage_collection_threshold:0.6",
                     env={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    assert ("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,max_split_size_mb:128,"
            "garbage_collection_threshold:0.6") in result.stdout


def test_cli_does_not_import_torch_or_ultralytics(tmp_path):
    code = (
        "import sys\n"
        "from yolosafe.cli.main import main\n"
        "for argv in (['--help'], ['train', '--help'], ['train', '--dry-run'], ['gpus']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'ultralytics', 'matplotlib', 'pandas') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path,
                            env={"YOLOSAFE_FAKE_GPUS": "2x24GB", "YOLOSAFE_CACHE": str(tmp_path)})
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_gpus_table_with_fake_backend(run_cli):
    spec = json.dumps({"gpus": [{"name": "A100", "total_mib": 40960, "used_mib": 13000,
                                 "processes": [{"pid": 4242, "used_mib": 13000}]}]})
    result = run_cli("gpus", env={"YOLOSAFE_FAKE_GPUS": spec})
    assert result.returncode == 0
    assert "A100" in result.stdout and "27960" in result.stdout and "4242:13000MiB" in result.stdout
    result = run_cli("gpus", env={"YOLOSAFE_FAKE_GPUS": "none"})
    assert result.returncode == 1 and "no GPU" in result.stderr and "Traceback" not in result.stderr


def test_ultralytics_builtin_dataset_names_pass_through(run_cli):
    result = run_cli("train", "--data", "coco8.yaml", "--dry-run")
    assert result.returncode == 0 and '"data": "coco8.yaml"' in result.stdout


def test_resume_refuses_what_cannot_be_resumed(run_cli, tmp_path):
    assert_usage_error(run_cli("train", "--resume", "nowhere"), "not a yolosafe run directory")
    run = run_dir_of(tmp_path)
    (run / "weights").mkdir(parents=True)
    (run / "yolosafe.json").write_text(json.dumps({"outcome": "completed"}))
    assert_usage_error(run_cli("train", "--resume", str(run)), "no weights/last.pt")
    (run / "weights" / "last.pt").write_bytes(b"")
    assert_usage_error(run_cli("train", "--resume", str(run)), "already completed")


def test_worker_sees_exactly_the_planned_gpus(run_cli):
    """--gpus are nvidia-smi's numbers; the worker gets them as CUDA_VISIBLE_DEVICES and torch devices 0..n-1."""
    from yolosafe.planning.trainplan import build_plan
    from yolosafe.supervisor.child import launch_device

    p = build_plan(model="m.yaml", data="d.yaml", gpus=(2, 3), batch=16)
    assert launch_device(p, simulate_on_cpu=False) == ("0,1", "2,3")
    assert launch_device(p, simulate_on_cpu=True) == ("cpu", None)
    result = run_cli("train", "--gpus", "1", "--dry-run", env={**FOUR, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert_usage_error(result, "no GPU 1", "available: 2, 3", "CUDA_VISIBLE_DEVICES=2,3")


def test_readme_exit_table_is_the_one_exit_table():
    import re

    from yolosafe.exits import Exit

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| .+ \|$", readme, re.MULTILINE)
    assert sorted(map(int, rows)) == sorted(status.value for status in Exit)


def test_help_shows_the_defaults_of_the_one_defaults_table(run_cli):
    from yolosafe.planning.options import DEFAULTS

    helptext = " ".join(run_cli("train", "--help").stdout.split())
    for key in ("batch", "max_retries", "min_batch", "warn_at", "memory_fraction", "project"):
        assert f"Default {DEFAULTS[key]}." in helptext, key
