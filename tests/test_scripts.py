"""scripts/diagnose_gpu_memory.sh and scripts/fix_gpu_memory.sh are thin entry points: they find the environment's
yolosafe (on PATH, else ``python3 -m yolosafe``) and hand over their arguments unchanged. The logic is
tested in
test_doctor.py, test_fix.py, test_holders.py and test_configedit.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.standins import oom_run

ROOT = Path(__file__).resolve().parent.parent
DIAGNOSE = ROOT / "scripts" / "diagnose_gpu_memory.sh"
FIX = ROOT / "scripts" / "fix_gpu_memory.sh"
VENV_BIN = Path(sys.executable).parent


def script_env(tmp_path: Path, path: str) -> dict[str, str]:
    return {**os.environ, "PATH": path, "HOME": str(tmp_path), "YOLOSAFE_FAKE_GPUS": "2x48GB",
            "PYTHONPATH": str(ROOT)}


def run(script: Path, tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def test_scripts_are_thin_and_pass_shellcheck():
    for script in (DIAGNOSE, FIX):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert len(text.splitlines()) <= 12 and "<<" not in text and "python3 -m yolosafe" in text
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(DIAGNOSE), str(FIX)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_diagnose_runs_yolosafe_doctor_with_its_arguments(tmp_path):
    run_dir = oom_run(tmp_path / "runs" / "detect" / "train")
    env = script_env(tmp_path, f"{VENV_BIN}:/usr/bin:/bin")
    out = run(DIAGNOSE, tmp_path, env)
    assert out.returncode == 0 and "== verdict ==" in out.stdout and "--val-batch 8" in out.stdout, out.stderr
    assert '"verdict"' in run(DIAGNOSE, tmp_path, env, str(run_dir), "--json").stdout
    bad = run(DIAGNOSE, tmp_path, env, str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a yolosafe run directory" in bad.stderr
    assert "Usage: yolosafe doctor" in run(DIAGNOSE, tmp_path, env, "--help").stdout


def test_without_yolosafe_on_path_the_environments_python3_is_used(tmp_path):
    oom_run(tmp_path / "runs" / "detect" / "train")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # the venv's, not on PATH
    (bin_dir / "python3").chmod(0o755)
    env = script_env(tmp_path, f"{bin_dir}:/usr/bin:/bin")
    if shutil.which("yolosafe", path=env["PATH"]):
        pytest.skip("a yolosafe is installed system-wide")
    out = run(DIAGNOSE, tmp_path, env)
    assert out.returncode == 0 and "OOM in val at epoch 134/200" in out.stdout, out.stderr


def test_fix_runs_yolosafe_fix_with_the_old_options(tmp_path):
    oom_run(tmp_path / "runs" / "detect" / "train")
    config = tmp_path / "run.yaml"
    config.write_text("batch: 32  # two GPUs\n")
    env = script_env(tmp_path, f"{VENV_BIN}:/usr/bin:/bin") | {"YOLOSAFE_RC_FILE": str(tmp_path / "zshrc")}
    out = run(FIX, tmp_path, env, "--config=run.yaml", "--run", "runs/detect/train", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert config.read_text() == "batch: 16  # two GPUs\neffective_batch: 64\nval_batch: 8\n"
    assert "expandable_segments:True" in (tmp_path / "zshrc").read_text()
    bad = run(FIX, tmp_path, env, "--frobnicate")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--frobnicate" in bad.stderr
