"""``yolosafe fix`` run as a user runs it: without a terminal, with ``--yes``, and on a pseudo-terminal answering
y/N; stand-in processes on fake GPUs; a config adapted to a hand-made run, byte-exact outside the edited values."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.standins import Processes, alive, fake_gpus, oom_run, write_run
from yolosafe.readers.doctor import diagnosis as doctor

CONFIG = ("# my training\r\nbatch: 32   # total, over both GPUs\r\ngpus: [0, 1]\r\nimgsz: 1280\r\n"
          "args:\r\n  lr0: 0.01\r\n")


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop()


def fix_env(tmp_path: Path, fake: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTORCH_") and k not in doctor.STRAY_DIST_VARS}
    return {**env, "YOLOSAFE_FAKE_GPUS": fake, "HOME": str(tmp_path), **extra}


def run_fix(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "yolosafe", "fix", *args], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.bak.*"))


def scene(tmp_path: Path, procs: Processes) -> tuple[dict[str, int], str]:
    """A run with OOMs, a config, and GPU holders: an orphaned rank of an earlier run (stale, provably), a worker of a
    live run, a Jupyter kernel, a sleep, pid 1, and (as root) another user's process."""
    oom_run(tmp_path / "runs" / "detect" / "train3")
    (tmp_path / "run.yaml").write_bytes(CONFIG.encode())
    pids = {"orphan": procs.orphaned_rank(tmp_path / "runs" / "old"),
            "worker": procs.yolosafe_worker(tmp_path / "runs" / "live").pid,
            "kernel": procs.jupyter().pid, "sleep": procs.sleep().pid, "init": 1}
    if os.geteuid() == 0:
        pids["other_user"] = procs.start(["sleep", "600"], preexec_fn=lambda: os.setuid(65534)).pid
    time.sleep(0.3)
    return pids, fake_gpus([(pid, 1000.0 + i) for i, pid in enumerate(pids.values())], [])


def test_without_a_terminal_and_without_yes_nothing_changes(tmp_path, procs):
    pids, fake = scene(tmp_path, procs)
    out = run_fix(tmp_path, fix_env(tmp_path, fake), "--config", "run.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(alive(pid) for pid in pids.values())
    assert (tmp_path / "run.yaml").read_bytes() == CONFIG.encode() and not backups(tmp_path / "run.yaml")
    assert not (tmp_path / ".bashrc").exists()
    assert out.stdout.count("no (no terminal; --yes to accept)") == 5  # orphan, kernel, sleep, rc, config


def test_yes_stops_only_what_is_proven_stale_and_edits_with_backups(tmp_path, procs):
    pids, fake = scene(tmp_path, procs)
    env = fix_env(tmp_path, fake)
    out = run_fix(tmp_path, env, "--config", "run.yaml", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    if os.geteuid() == 0 and alive(pids["orphan"]):
        pytest.fail(f"the orphaned rank survived:\n{out.stdout}")
    assert not alive(pids["orphan"])
    assert all(alive(pid) for name, pid in pids.items() if name != "orphan")
    assert "not provably safe: answer it on a terminal" in out.stdout
    if "other_user" in pids:
        assert f"sudo kill -TERM {pids['other_user']}" in out.stdout
    assert f"stop pid {pids['worker']}" not in out.stdout and "stop pid 1 " not in out.stdout
    new = (tmp_path / "run.yaml").read_bytes().decode()
    assert new == CONFIG.replace("batch: 32", "batch: 16") + "effective_batch: 64\r\nval_batch: 8\r\n"
    [backup] = backups(tmp_path / "run.yaml")
    assert backup.read_bytes() == CONFIG.encode() and str(backup.name) in out.stdout.split("== summary ==")[1]
    assert "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in (tmp_path / ".bashrc").read_text()
    again = run_fix(tmp_path, env, "--config", "run.yaml", "--yes")
    assert "already has export" in again.stdout and "nothing to change" in again.stdout
    assert len(backups(tmp_path / "run.yaml")) == 1 and (tmp_path / "run.yaml").read_bytes().decode() == new


def _converse(cmd: list[str], env: dict[str, str], cwd: Path, answers: list[str]) -> str:
    """Run on a pseudo-terminal, answering each '[y/N]' prompt in turn."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen, pending = b"", list(answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            while pending and seen.count(b"[y/N]") > len(answers) - len(pending):
                os.write(master, pending.pop(0).encode() + b"\n")
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    return seen.decode(errors="replace")


def test_on_a_terminal_each_proposal_is_asked_and_enter_means_no(tmp_path, procs):
    oom_run(tmp_path / "runs" / "detect" / "train3")
    (tmp_path / "run.yaml").write_bytes(CONFIG.encode())
    kernel, sleeper = procs.jupyter(), procs.sleep()
    env = fix_env(tmp_path, fake_gpus([(kernel.pid, 13000.0), (sleeper.pid, 2000.0)]))
    cmd = [sys.executable, "-m", "yolosafe", "fix", "--config", "run.yaml"]
    text = _converse(cmd, env, tmp_path, ["y", "", "yes", "n"])
    assert text.count("[y/N]") == 4, text
    kernel.wait(15)
    assert not alive(kernel.pid) and alive(sleeper.pid)
    assert (tmp_path / ".bashrc").is_file() and (tmp_path / "run.yaml").read_bytes() == CONFIG.encode()
    assert f"pid {kernel.pid} exited" in text and f"pid {sleeper.pid} (sleep 600) left running" in text


def test_a_config_for_another_setup_is_not_changed(tmp_path):
    oom_run(tmp_path / "runs" / "detect" / "train3")
    config = tmp_path / "run.yaml"
    config.write_text("batch: 32\ngpus: 0,1,2,3\n")
    out = run_fix(tmp_path, fix_env(tmp_path, "2x48GB"), "--config", "run.yaml", "--yes")
    assert out.returncode == 1
    assert "does not belong to the run (gpus 0,1,2,3 in the config, 0,1 in the run): not changed" in out.stdout
    assert config.read_text() == "batch: 32\ngpus: 0,1,2,3\n" and not backups(config)


def test_the_configs_own_effective_batch_is_kept_not_the_runs(tmp_path):
    write_run(tmp_path / "runs" / "a", [], "oom_exhausted", [], batch=32, nbs=32)
    from tests.standins import attempt, failure
    write_run(tmp_path / "runs" / "b", [attempt(1, 32, 16, "oom", "train", 3, nbs=32)], "oom_exhausted",
              [failure(1, "train", 3, 16, 16)], batch=32, nbs=32)
    config = tmp_path / "run.yaml"
    config.write_text("batch: 32\n")
    out = run_fix(tmp_path, fix_env(tmp_path, "2x48GB"), "--config", "run.yaml", "--run", "runs/b", "--yes")
    assert config.read_text() == "batch: 16\neffective_batch: 64\n", out.stdout
    assert "the config has no effective_batch: with batch 32 it means Ultralytics' default, an effective batch of " \
           "64; written so it stays 64; the run itself used 32" in out.stdout


@pytest.mark.parametrize("make, words", [  # a config that is no readable file (a folder): tests/test_adversarial.py
    (lambda p: (p.write_text("batch: 32\n"), p.chmod(0o444)), "is read-only: not changed"),
    (lambda p: p.write_text("batch: [32\n"), "not valid YAML"),
])
def test_unreadable_read_only_or_broken_configs_are_one_line_and_the_rest_still_runs(tmp_path, make, words):
    oom_run(tmp_path / "runs" / "detect" / "train3")
    config = tmp_path / "run.yaml"
    make(config)
    before = config.read_bytes() if config.is_file() else None
    out = run_fix(tmp_path, fix_env(tmp_path, "2x48GB"), "--config", "run.yaml", "--yes")
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    [line] = [ln for ln in out.stdout.splitlines() if ln.startswith("failed: ")]
    assert words in line
    assert (tmp_path / ".bashrc").is_file()  # the rc proposal ran
    assert not backups(config) and (before is None or config.read_bytes() == before)


def test_an_unwritable_rc_directory_is_one_line_and_the_config_still_changes(tmp_path):
    oom_run(tmp_path / "runs" / "detect" / "train3")
    (tmp_path / "run.yaml").write_text("batch: 32\n")
    (tmp_path / "file").write_text("")
    env = fix_env(tmp_path, "2x48GB", YOLOSAFE_RC_FILE=str(tmp_path / "file" / ".bashrc"))
    out = run_fix(tmp_path, env, "--config", "run.yaml", "--yes")
    assert out.returncode == 1
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("failed: ")] == \
        [f"failed: {tmp_path / 'file' / '.bashrc'}: Not a directory"] or "Not a directory" in out.stdout
    assert (tmp_path / "run.yaml").read_text().startswith("batch: 16\n")


def test_cpu_only_machine_proposes_no_allocator_export(tmp_path):
    out = run_fix(tmp_path, fix_env(tmp_path, "none"), "--yes")
    assert out.returncode == 0 and "expandable_segments does not matter" in out.stdout
    assert not (tmp_path / ".bashrc").exists()


@pytest.mark.parametrize("args, fake, words", [
    (["--run", "nowhere"], "2x48GB", "--run nowhere: not a yolosafe run directory"),
    (["--config", "missing.yaml"], "2x48GB", "--config missing.yaml: no such file"),
    ([], "{bad", "YOLOSAFE_FAKE_GPUS: cannot read its JSON layout"),
])
def test_usage_errors(tmp_path, args, fake, words):
    out = run_fix(tmp_path, fix_env(tmp_path, fake), *args)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1 and words in out.stderr
