"""``yolosafe doctor`` on hand-made run directories and fake GPUs whose processes are real stand-ins, run as a user
runs it (a subprocess): the sections, the verdict and its order, usage errors as in train, damaged files as one line,
and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.standins import Processes, attempt, failure, fake_gpus, oom_run, write_run
from yolosafe.readers.doctor import diagnosis as doctor
from yolosafe.rundir import files as rundir


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop()


def run_doctor(cwd: Path, *args: str, fake: str = "2x48GB", **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTORCH_", "CUDA_VISIBLE")) and k not in
             doctor.STRAY_DIST_VARS}
    full = {**clean, "YOLOSAFE_FAKE_GPUS": fake, **env}
    return subprocess.run([sys.executable, "-m", "yolosafe", "doctor", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=60)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_machine_run_and_verdict_in_order(tmp_path, procs):
    run = oom_run(tmp_path / "runs" / "detect" / "train3")
    worker, kernel, other = procs.yolosafe_worker(tmp_path / "runs" / "live"), procs.jupyter(), procs.sleep()
    time.sleep(0.2)
    fake = fake_gpus([(worker.pid, 40000.0)], [(kernel.pid, 13000.0), (other.pid, 2000.0)], [])
    before = snapshot(tmp_path)
    out = run_doctor(tmp_path, fake=fake)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    text = out.stdout
    for section in ("== machine ==", "== environment ==", f"== run: {run.relative_to(tmp_path)} ==", "== verdict =="):
        assert section in text
    assert "yolosafe run: a running yolosafe run" in text and "Jupyter kernel: LIKELY STALE" in text
    verdict = text.split("== verdict ==")[1]
    order = ["--val-batch 8", "--batch 16 --effective-batch 64", "fragmentation",
             "GPU 0 is in use by a running yolosafe run", "wait for it, or --gpus 2", f"pid {kernel.pid}",
             f"pid {other.pid}", "GPU(s) 0, 1 hold more than 1024 MiB", "-> --gpus 2", "yolosafe fix --config"]
    positions = [verdict.index(word) for word in order]
    assert positions == sorted(positions), verdict
    assert f"kill -TERM {worker.pid}" not in text  # a live yolosafe run is never proposed
    assert snapshot(tmp_path) == before  # read-only


def test_json_is_the_same_data(tmp_path, procs):
    oom_run(tmp_path / "runs" / "detect" / "train")
    kernel = procs.jupyter()
    data = json.loads(run_doctor(tmp_path, "--json", fake=fake_gpus([(kernel.pid, 13000.0)])).stdout)
    assert data["machine"]["gpus"][0]["holders"][0]["kind"] == "Jupyter kernel"
    assert data["machine"]["gpus"][0]["others_mib"] == 13000.0
    assert [f["file"] for f in data["run"]["failures"]] == ["failure-1-rank1.json", "failure-2-rank1.json"]
    assert data["verdict"][0]["remedy"] == "--val-batch 8"


def test_a_malformed_fake_gpu_spec_is_the_usage_error_train_gives(tmp_path):
    out = run_doctor(tmp_path, fake="{not json")
    train = subprocess.run([sys.executable, "-m", "yolosafe", "train", "--dry-run"], cwd=tmp_path,
                           env={**os.environ, "YOLOSAFE_FAKE_GPUS": "{not json"}, capture_output=True, text=True)
    assert out.returncode == train.returncode == 2
    assert out.stderr == train.stderr and out.stderr.count("\n") == 1 and out.stdout == ""


def test_cpu_only_machine_gets_no_allocator_advice_and_stray_variables_are_the_ones_train_strips(tmp_path):
    out = run_doctor(tmp_path, fake="none", GROUP_RANK="0", ROLE_RANK="1", RANK="3")
    assert out.returncode == 0
    assert "no GPU: no NVIDIA driver" in out.stdout and "no yolosafe run found" in out.stdout
    assert "expandable_segments is" not in out.stdout.split("== verdict ==")[1]
    assert "stray launcher variables: RANK=3, GROUP_RANK=0, ROLE_RANK=1" in out.stdout
    assert "unset RANK GROUP_RANK ROLE_RANK" in out.stdout


def test_allocator_variables_as_torch_reads_them(tmp_path):
    out = run_doctor(tmp_path, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:true",
                     PYTORCH_ALLOC_CONF="max_split_size_mb:12")
    assert "torch itself accepts only True/False (expandable_segments:true)" in out.stdout
    assert "INVALID: PYTORCH_ALLOC_CONF: bad value '12' for 'max_split_size_mb'" in out.stdout
    assert "expandable_segments in this shell: invalid" in out.stdout
    fine = run_doctor(tmp_path, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    assert "expandable_segments in this shell: True" in fine.stdout and "yolosafe fix (adds" not in fine.stdout


@pytest.mark.parametrize("name, content, words", [
    (rundir.STORY, '{"plan": {"gpus": [0, 1]', "damaged, not JSON"),
    ("failure-1-rank0.json", "[]", "expected a JSON object"),
    ("failure-1-rank1.json", "{\"oom\": tr", "damaged, not JSON"),
])
def test_damaged_run_files_give_one_line_not_a_traceback(tmp_path, name, content, words):
    run = oom_run(tmp_path / "run")
    (run / name).write_text(content)
    out = run_doctor(tmp_path, str(run))
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if words in ln]
    assert lines and all(str(run / name) in ln for ln in lines), out.stdout


def test_a_damaged_memory_summary_is_one_line(tmp_path):
    run = oom_run(tmp_path / "run")
    (run / rundir.MEMORY_SUMMARY).write_text("{")
    out = run_doctor(tmp_path, str(run))
    assert "memory peaks: none (cannot read the memory data: JSONDecodeError" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_memory_peaks_come_from_the_report(tmp_path):
    run = oom_run(tmp_path / "run")
    phase = {"peak_used_share": 0.5, "epoch_of_peak": 3}
    summary = {"gpus": {"1": {"total_mib": 40960.0, "peak_used_mib": 33000.0, "headroom_mib": 7960.0,
                              "peak_others_mib": 13000.0,
                              "phases": {"train": {**phase, "peak_used_mib": 22000.0},
                                         "val": {**phase, "peak_used_mib": 33000.0}}}}}
    rundir.write_json(run / rundir.MEMORY_SUMMARY, summary)
    out = run_doctor(tmp_path, str(run))
    assert "memory peaks per GPU" in out.stdout and "21.5 GiB 50% e4" in out.stdout and "32.2 GiB" in out.stdout


def test_a_run_that_recovered_suggests_what_worked(tmp_path):
    write_run(tmp_path / "runs" / "a", [attempt(1, 32, 16, "oom", "train", 5, next_step="batch 32 -> 16"),
                                        attempt(2, 16, 16, "completed", None, None)],
              "completed", [failure(1, "train", 5, 16, 16)])
    out = run_doctor(tmp_path, "--project", "runs")
    assert "--batch 16 --effective-batch 64 --val-batch 16" in out.stdout


def test_not_a_run_directory_is_a_usage_error(tmp_path):
    out = run_doctor(tmp_path, str(tmp_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a yolosafe run directory" in out.stderr


def test_a_plan_of_the_wrong_shape_is_one_line(tmp_path):
    run = oom_run(tmp_path / "run")
    story = json.loads((run / rundir.STORY).read_text())
    story["plan"] |= {"gpus": ["zero", 1], "batch": "many"}
    (run / rundir.STORY).write_text(json.dumps(story))
    out = run_doctor(tmp_path, str(run))
    assert out.returncode == 0 and "Traceback" not in out.stdout + out.stderr


def test_epochs_are_one_based_and_unknowns_are_never_none(tmp_path):
    """The OOM at the trainer's epoch 133 is "epoch 134/200", as Ultralytics printed it while training; a rank killed
    by a signal (the launcher's record: no phase, no epoch) is said without a raw None."""
    from yolosafe.rundir.records import Failure, save_failure

    run = oom_run(tmp_path / "runs" / "detect" / "train3")
    save_failure(run, Failure.new(attempt=2, rank=0, oom=False, error="SIGTERM", message="rank 0 was killed by "
                                  "SIGTERM", signal="SIGTERM", by="launcher"))
    text = run_doctor(tmp_path).stdout
    assert "in val at epoch 134/200, rank 1" in text and "at epoch 134/200 on GPU 1" in text, text
    assert "None" not in text and "0-based" not in text and "e134" not in text.replace("e134/", "")
    attempts = text.split("attempts")[1].splitlines()[2]
    assert attempts.split()[8] == "134", attempts  # the attempts table's epoch column, 1-based
