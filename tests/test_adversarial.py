"""What a hostile user and a hostile machine try: a closed terminal, a stop before the run exists, files that block
or never end, YAML that explodes, values that pass the first checks and fail late. Each ends in one line and its
exit status: 130 for a stop (the run resumable), 2 for bad input, 1 for an output that cannot be written."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import termios
import threading
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import drills
from tests.conftest import TINY, YOLOSAFE, alive, cli_env, run_dir_of, story, wait_gone, wait_until
from yolosafe.planning import bounded

FAST = [*TINY, "--imgsz", "32"]
LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))
LAUGHS = "l0: &l0 lol\n" + LAUGHS


def one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("yolosafe: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- bounded reading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["--config", "--data", "--datasets"])
def test_a_fifo_is_refused_without_blocking(run_cli, tmp_path, what):
    os.mkfifo(tmp_path / "f.yaml")
    result = run_cli("train", what, "f.yaml", "--dry-run", timeout=60)
    one_line_refusal(result, "f.yaml", "FIFO")
    assert not (tmp_path / "runs").exists()


def test_a_device_and_an_oversized_file_are_refused(run_cli, tmp_path):
    one_line_refusal(run_cli("train", "--config", "/dev/zero", "--dry-run", timeout=60), "character device")
    with open(tmp_path / "big.yaml", "wb") as fh:
        fh.truncate(bounded.FILE_MAX + 1)  # sparse: no disk used
    one_line_refusal(run_cli("train", "--config", "big.yaml", "--dry-run", timeout=60), "bytes, more than")


@pytest.mark.parametrize("where", ["config", "registry", "data"])
@pytest.mark.parametrize("doc", ["laughs", "cycle"])
def test_exploding_and_cyclic_yaml_is_refused_at_once(run_cli, tmp_path, where, doc):
    text = LAUGHS if doc == "laughs" else "classes: &a [*a]\n"
    if where == "registry":
        text = "datasets:\n  x:\n    path: x.yaml\n" + text.replace("classes:", "more:")
    if where == "data":
        text = "train: images\nval: images\nnames: [a]\n" + text.replace("classes:", "more:")
    (tmp_path / "d.yaml").write_text(text)
    args = {"config": ["--config", "d.yaml"], "registry": ["--datasets", "d.yaml", "--data", "x"],
            "data": ["--data", "d.yaml"]}[where]
    started = time.monotonic()
    result = run_cli("train", *args, "--dry-run", timeout=60)
    one_line_refusal(result, "d.yaml", "billion laughs" if doc == "laughs" else "a cycle")
    assert time.monotonic() - started < 30  # not the 44-65 s of expanding it


def test_a_dataset_under_proc_is_refused_before_listing(run_cli, tmp_path):
    (tmp_path / "d.yaml").write_text("path: /\ntrain: proc\nval: proc\nnames: [a]\n")
    one_line_refusal(run_cli("train", "--data", "d.yaml", "--dry-run", timeout=60), "/proc", "kernel")


def test_a_registry_path_that_is_not_text_is_refused(run_cli, tmp_path):
    (tmp_path / "datasets.yaml").write_text("datasets:\n  five:\n    path: 5\n")
    one_line_refusal(run_cli("train", "--data", "five", "--dry-run", timeout=60), "five", "not a path")


def test_a_huge_value_makes_a_readable_line(run_cli, tmp_path):
    (tmp_path / "c.yaml").write_text(f"name: {'x' * 20_000_000}\n")
    line = one_line_refusal(run_cli("train", "--config", "c.yaml", "--dry-run", timeout=120))
    assert len(line) <= 600


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=30))
def test_the_bounded_loader_reads_what_yaml_reads(document):
    """Delegation pinned: on documents within the bounds the bounded loader is PyYAML's safe loader."""
    text = yaml.safe_dump(document)
    assert bounded.load_yaml(text) == yaml.safe_load(text)
    anchored = f"a: &x {json.dumps(document)}\nb: *x\nc: *x\n"
    assert bounded.load_yaml(anchored) == yaml.safe_load(anchored)


# --- numbers and names that passed the first checks ------------------------------------------------------------------


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--imgsz", str(10**30)], {}, "at most 16384"),
    (["--min-batch", "64", "--batch", "8"], {}, "more than the per-GPU batch 8"),
    (["--gpus", "\u00b2"], {"YOLOSAFE_FAKE_GPUS": "4x16GB"}, "is not a GPU id"),
    (["--gpus", "\u0661"], {"YOLOSAFE_FAKE_GPUS": "4x16GB"}, "is not a GPU id"),  # Arabic-Indic one: isdecimal
    (["--gpus", "all"], {"YOLOSAFE_FAKE_GPUS": "4x16GB", "CUDA_VISIBLE_DEVICES": "1,1"}, "names 1 twice"),
])
def test_values_out_of_range_are_refused_before_a_run_exists(run_cli, tmp_path, args, env, needle):
    one_line_refusal(run_cli("train", "--data", "shapes", *args, "--dry-run", env=env, timeout=120), needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config", ["bad.yaml", "/dev/zero", "fifo.yaml", "folder.yaml"])
def test_fix_refuses_a_config_it_cannot_read_in_one_line(run_cli, tmp_path, config):
    (tmp_path / "bad.yaml").write_bytes(b"batch: \xff\xfe\n")
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "folder.yaml").mkdir()
    result = run_cli("fix", "--config", config, "--yes", timeout=60)
    one_line_refusal(result, config)
    assert result.stdout == ""


# --- the process's surroundings --------------------------------------------------------------------------------------


def test_a_deleted_working_directory_and_a_full_stdout(tmp_path, shared_cache):
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f"import os, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); os.execv({YOLOSAFE!r}, " \
             "[sys.argv[1], 'report'])"
    result = subprocess.run([os.sys.executable, "-c", script, YOLOSAFE], capture_output=True, text=True,
                            env=cli_env(shared_cache), timeout=60)
    one_line_refusal(result, "working directory is gone")
    with open("/dev/full", "w") as full:
        result = subprocess.run([YOLOSAFE, "gpus", "--json"], stdout=full, stderr=subprocess.PIPE, text=True,
                                env=cli_env(shared_cache), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [ln for ln in result.stderr.splitlines() if ln] == ["yolosafe: No space left on device"]


# --- stops -----------------------------------------------------------------------------------------------------------


def _check_child(pid: int) -> int | None:
    import psutil

    try:
        return next((c.pid for c in psutil.Process(pid).children() if "inputcheck" in " ".join(c.cmdline())), None)
    except psutil.Error:
        return None


@pytest.mark.parametrize(("signum", "ignored"), [(signal.SIGTERM, True), (signal.SIGHUP, True),
                                                 (signal.SIGINT, True), (signal.SIGINT, False)])
def test_a_stop_during_the_input_check_ends_its_child_in_one_line(tmp_path, shared_cache, signum, ignored):
    """Started as a script's ``cmd &`` starts it (SIGINT ignored) or from a terminal (SIGINT at its default): the stop
    lands, in one line, exit 130, the check's child ended."""
    # A verdict cache of its own: the check's child must run (a kept verdict answers without one).
    proc = drills.start(tmp_path, shared_cache, "train", *FAST, env={"YOLOSAFE_CACHE": str(tmp_path / "cache")},
                        ignore_sigint=ignored)
    found: list[int] = []
    wait_until(lambda: bool(found.append(_check_child(proc.pid)) or found[-1]), proc, "the input check", 120)
    proc.send_signal(signum)
    code, err = drills.finish(proc)
    assert code == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == \
        [f"yolosafe: stopped by {signal.Signals(signum).name} before the run started; nothing was trained"]
    assert not wait_gone({found[-1]}, 30)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_closed_terminal_stops_the_run_and_it_resumes(tmp_path, shared_cache):
    """A real pty hang-up: the supervisor is the session leader of a terminal whose master side closes mid-epoch.
    Every rank stops, the story says ``interrupted``, exit 130; the resume completes each epoch once."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([YOLOSAFE, "train", "--epochs", "2", *FAST], cwd=tmp_path, env=cli_env(shared_cache),
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=controlling_terminal)
    os.close(slave)
    hang_up = threading.Event()
    drained = threading.Thread(target=_drain, args=(master, hang_up), daemon=True)
    drained.start()
    run = run_dir_of(tmp_path)
    wait_until(lambda: any(e.get("event") == "train_start" for e in drills.events(run)), proc, "epoch 1", 240)
    tree = {e["pid"] for e in drills.events(run) if "pid" in e}
    hang_up.set()
    drained.join(10)
    os.close(master)  # the terminal is gone: the kernel sends SIGHUP to its session leader
    assert proc.wait(timeout=120) == 130
    assert story(run)["outcome"] == "interrupted"
    assert story(run)["attempts"][-1]["outcome"] == "interrupted"
    assert not wait_gone(tree, 30) and not alive({proc.pid})
    auto = subprocess.run([YOLOSAFE, "train", "--resume", str(run), "--batch", "auto", "--dry-run"], cwd=tmp_path,
                          env=cli_env(shared_cache), capture_output=True, text=True, timeout=120)
    one_line_refusal(auto, "--batch auto", "give a number")
    resumed = subprocess.run([YOLOSAFE, "train", "--resume", str(run)], cwd=tmp_path, env=cli_env(shared_cache),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (run / "results.csv").read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == [1, 2]
    (run / "memory.csv").write_bytes(bytes(range(256)) * 64)  # a binary memory.csv: one line, no traceback
    report = subprocess.run([YOLOSAFE, "report", str(run)], cwd=tmp_path, env=cli_env(shared_cache),
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr
    assert "memory.csv is not the memory watch's table" in report.stderr


def _drain(fd: int, done: threading.Event) -> None:
    """Read the terminal's output (a full pty would block the run) until ``done``; never blocked when it is set (a
    blocked read would keep the terminal open after its close)."""
    import select

    while not done.is_set():
        try:
            if select.select([fd], [], [], 0.1)[0] and not os.read(fd, 65536):
                return
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADF):
                return
            raise


# --- checkpoints read without running them ---------------------------------------------------------------------------


class _WritesAFile:
    """A pickle that runs code when loaded: ``os.system('touch MARKER')``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_checkpoints(tmp_path):
    import torch
    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "ran"
    model = DetectionModel("yolov8n.yaml", verbose=False)
    torch.save({"model": model, "epoch": 0, "train_args": {"epochs": 3}, "x": _WritesAFile(str(marker))},
               tmp_path / "evil.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pt")
    torch.save({"model": model, "epoch": 0, "train_args": {"epochs": 3},
                "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict(),
                "train_metrics": {"metrics/mAP50(B)": __import__("numpy").float64(0.5)}}, tmp_path / "good.pt")
    import pickle
    import zipfile

    with zipfile.ZipFile(tmp_path / "stack.pt", "w") as archive:  # protocol 4: names by STACK_GLOBAL, memoized
        archive.writestr("stack/data.pkl", pickle.dumps({"ultralytics": 1, "x": _WritesAFile(str(marker))}, 4))
    return marker


def test_a_checkpoint_that_runs_code_or_is_no_ultralytics_one_is_refused_unread(run_cli, tmp_path):
    """yolosafe reads a checkpoint's pickle by its opcodes: a ``__reduce__`` that writes a file never runs, neither in
    yolosafe's own reading nor in the input check (refused before it), and a bare ``nn.Linear`` is refused by name."""
    import torch

    from yolosafe.planning import checkpoint, validate

    marker = _hostile_checkpoints(tmp_path)
    for name in ("evil.pt", "stack.pt"):
        with pytest.raises(validate.InputError, match=r"would run posix\.system when loaded"):
            validate.check_checkpoint(tmp_path / name, name)
        line = one_line_refusal(run_cli("train", "--model", name, "--data", "shapes", "--dry-run", timeout=120),
                                "posix.system", "not loaded")
        assert name in line
    one_line_refusal(run_cli("train", "--model", "linear.pt", "--data", "shapes", "--dry-run", timeout=120),
                     "not an Ultralytics checkpoint", "torch.nn.modules.linear.Linear")
    assert not marker.exists() and not (tmp_path / "runs").exists()
    validate.check_checkpoint(tmp_path / "good.pt", "good.pt")  # a model, its optimizer, numpy metrics: accepted
    for name in ("evil.pt", "good.pt", "linear.pt"):  # delegation pinned: what torch's own reader finds unsafe
        ours = {n.replace(" ", ".") for n in checkpoint.pickled_globals(tmp_path / name)}
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / name)) <= ours
    assert not marker.exists()


# --- a full disk -----------------------------------------------------------------------------------------------------


def test_the_kept_checkpoint_is_a_hard_link_and_a_copy_only_where_links_fail(tmp_path, monkeypatch):
    """No byte copied to keep what an attempt resumes from; where the file system has no hard links a copy, and a
    copy that meets a full disk (ENOSPC from the kernel's sendfile, the layer shutil copies with) leaves nothing."""
    from yolosafe.rundir.layout import RunDir
    from yolosafe.supervisor.loop import keep_checkpoint
    from yolosafe.training.trainer import unlink_shared

    run = RunDir(tmp_path / "run")
    run.weights.mkdir(parents=True)
    last = run.last_checkpoint
    last.write_bytes(b"epoch 1" * 1000)
    kept = keep_checkpoint(run, last, 2)
    assert os.path.samefile(kept, last) and kept.read_bytes() == last.read_bytes()
    last.with_name(".last.pt.partial").write_bytes(b"epoch 2")  # the next save: written beside, renamed
    os.replace(last.with_name(".last.pt.partial"), last)
    assert kept.read_bytes() == b"epoch 1" * 1000
    os.link(last, run.weights / "linked.pt")
    unlink_shared(last)  # before Ultralytics strips last.pt in place: the other name keeps its data
    with open(last, "wb") as fh:
        fh.write(b"stripped")
    assert (run.weights / "linked.pt").read_bytes() == b"epoch 2"

    def no_links(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_links)
    copied = keep_checkpoint(run, last, 3)
    assert not os.path.samefile(copied, last) and copied.read_bytes() == b"stripped"
    monkeypatch.setattr(os, "sendfile", full)
    with pytest.raises(OSError, match="No space left"):
        keep_checkpoint(run, last, 4)
    assert not run.kept_checkpoint(4).exists() and not list(run.weights.glob(".*partial"))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2**34), st.lists(st.sampled_from(["last.pt", "best.pt", "unvalidated.pt"]), unique=True))
def test_the_space_a_resume_needs_is_its_checkpoints_less_those_there(tmp_path_factory, size, present):
    from yolosafe.supervisor import advice

    weights = tmp_path_factory.mktemp("run") / "weights"
    weights.mkdir()
    for name in present:
        with open(weights / name, "wb") as fh:
            fh.truncate(size)  # sparse: the size without the disk
    hint = advice.space_hint(weights)
    if not present:
        assert "starts over" in hint
        return
    need = size * (advice.RESUME_CHECKPOINTS - len(present))
    assert need == advice.resume_space(size, len(present))
    assert f"free at least {need / 2**20:.1f} MiB" in hint and f"{len(present)} are there" in hint


# --- the runs' folder where Ultralytics puts it ----------------------------------------------------------------------


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
def test_a_relative_project_is_checked_where_ultralytics_puts_it(run_cli, tmp_path):
    """``--project P`` relative goes to ``runs/<task>/P`` (Ultralytics' get_save_dir): a file, a symlink loop or a
    read-only folder named P here is no reason to refuse; a file where the run would go is, named both ways."""
    (tmp_path / "pfile").write_text("")
    os.symlink("loopb", tmp_path / "loopa")
    os.symlink("loopa", tmp_path / "loopb")
    (tmp_path / "x").mkdir(mode=0o555)
    for project in ("pfile", "pfile/sub", "loopa", "x"):
        result = run_cli("train", "--data", "shapes", "--project", project, "--dry-run", timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert str(tmp_path / "runs" / "detect" / project / "train") in result.stdout, result.stdout
    (tmp_path / "runs" / "detect").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / "detect" / "taken").write_text("")
    one_line_refusal(run_cli("train", "--data", "shapes", "--project", "taken", "--dry-run", timeout=120),
                     "--project taken, which Ultralytics puts at", "runs/detect/taken is a file")
    one_line_refusal(run_cli("train", "--data", "shapes", "--project", str(tmp_path / "pfile"), "--dry-run",
                             timeout=120), "pfile is a file")


def test_a_full_log_disk_under_the_tee_leaves_the_terminal_its_output(tmp_path):
    """The supervisor's tee of a worker's output: ``train.log`` on a full device (``/dev/full``: the kernel's own
    ENOSPC) is dropped with one line on the other streams, which get every byte; nothing is raised."""
    from yolosafe import proc as yproc

    child = subprocess.Popen([os.sys.executable, "-c", "import sys; sys.stdout.write('x' * 200000)"],
                             stdout=subprocess.PIPE)
    with open("/dev/full", "wb") as log, open(tmp_path / "terminal", "wb") as terminal:
        yproc._tee(child, [log, terminal])
    child.wait()
    text = (tmp_path / "terminal").read_text()
    assert text.count("x") == 200000
    assert "yolosafe: cannot write to /dev/full (No space left on device); its output goes on elsewhere" in text


def test_a_resume_with_batch_auto_and_a_binary_memory_table_are_one_line(run_cli, tmp_path):
    from tests.test_misuse import fake_run

    run = fake_run(tmp_path)
    one_line_refusal(run_cli("train", "--resume", str(run), "--batch", "auto", "--dry-run", timeout=120),
                     "--batch auto", "give a number")
    (run / "memory.csv").write_bytes(bytes(range(256)) * 64)
    report = run_cli("report", str(run), timeout=120)
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr
    assert "memory.csv is not the memory watch's table" in report.stderr
