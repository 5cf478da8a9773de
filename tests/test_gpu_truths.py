"""What real GPUs do that a CPU does not, simulated at the lowest layer: every real out-of-memory form recovered by
the retry loop over real CPU ranks (fake GPUs), raised as the exception type a GPU raises with its real text; a
resume that finds the run's GPUs by UUID; a container's PID namespace."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY, run_dir_of, story
from yolosafe import gpus


@pytest.mark.slow
@pytest.mark.parametrize("error", ["accelerator", "nccl", "cudnn"])
def test_the_retry_loop_recovers_each_real_oom_form_on_two_ranks(run_cli, tmp_path, error):
    env = {"YOLOSAFE_FAKE_GPUS": "2x24GB", "YOLOSAFE_INJECT_OOM": f"phase=train,epoch=0,rank=1,error={error}"}
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", *TINY, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = story(run_dir_of(tmp_path))["attempts"]
    assert (first["outcome"], first["phase"], first["rank"], first["gpu"]) == ("oom", "train", 1, 1)
    assert second["outcome"] == "completed" and second["per_gpu_batch"] == 2


def _layout(uuids: list[str]) -> str:
    return json.dumps({"gpus": [{"total_mib": 24576, "uuid": u} for u in uuids]})


def _stopped_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uuids: list[str], planned: tuple[int, ...]) -> Path:
    """A run stopped on GPUs ``planned`` of a machine whose GPUs have ``uuids``: its story and a checkpoint."""
    from yolosafe.planning.trainplan import build_plan
    from yolosafe.rundir import records

    run = tmp_path / "runs" / "detect" / "train"
    (run / "weights").mkdir(parents=True)
    with zipfile.ZipFile(run / "weights" / "last.pt", "w") as archive:
        archive.writestr("last/data.pkl", b"ultralytics.nn.tasks DetectionModel")
    data = tmp_path / "data.yaml"
    data.write_text("path: .\ntrain: images\nval: images\nnames: {0: box}\n")
    p = build_plan(model="yolov8n.yaml", data=str(data), gpus=planned, batch=8, imgsz=64, epochs=2)
    monkeypatch.setenv(gpus.FAKE_ENV, _layout(uuids))
    inventory = gpus.read_inventory()
    story = records.Story(run_dir=str(run), plan=p.summary(), gpu_backend="fake", simulated_on_cpu=True,
                          gpus=[g.as_dict() for g in inventory.gpus if g.index in planned],
                          attempts=[records.Attempt(attempt=1, outcome="interrupted")], outcome="interrupted")
    records.save_story(run, story)
    return run


def test_a_resume_maps_the_runs_gpus_by_uuid_or_refuses_in_one_line(tmp_path, monkeypatch):
    """First run on GPUs 2,3 of four; resumed in an allocation where those two are NVML's 0,1 (another job's
    container): the same GPUs by UUID. Resumed where CUDA_VISIBLE_DEVICES shows other GPUs: refused, naming it."""
    from yolosafe.planning import resume, validate

    uuids = [f"GPU-{i}aaaaaaa-0000-0000-0000-00000000000{i}" for i in range(4)]
    run = _stopped_run(tmp_path, monkeypatch, uuids, (2, 3))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(gpus.FAKE_ENV, _layout(uuids[2:]))  # the new allocation: only the run's two GPUs, as 0,1
    r = resume.prepare(run, {}, dry_run=True)
    assert r.plan.gpus == (0, 1) and [g["uuid"] for g in r.gpus] == uuids[2:]
    monkeypatch.setenv(gpus.FAKE_ENV, _layout(uuids))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{uuids[3]},{uuids[2]}")  # the scheduler's UUIDs, in its order
    assert resume.prepare(run, {}, dry_run=True).plan.gpus == (2, 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # another allocation: not the run's GPUs
    with pytest.raises(validate.InputError) as refused:
        resume.prepare(run, {}, dry_run=True)
    message = str(refused.value)
    assert "\n" not in message and "CUDA_VISIBLE_DEVICES is '0,1'" in message and "--gpus" in message
    assert uuids[2] in message and resume.prepare(run, {"gpus": "1"}, dry_run=True).plan.gpus == (1,)


def test_a_refused_resume_is_exit_2_before_any_worker_starts(tmp_path, monkeypatch, run_cli):
    uuids = [f"GPU-{i}bbbbbbb-0000-0000-0000-00000000000{i}" for i in range(4)]
    run = _stopped_run(tmp_path, monkeypatch, uuids, (2, 3))
    result = run_cli("train", "--resume", str(run),
                     env={gpus.FAKE_ENV: _layout(uuids), "CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "CUDA_VISIBLE_DEVICES" in result.stderr and "--gpus" in result.stderr
    assert not list(run.glob("spec-*.json"))
