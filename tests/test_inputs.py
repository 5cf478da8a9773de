"""Every input and environment variable yolosafe reads, malformed: one line on stderr, exit 2, no traceback, no run
directory. The CLI is called in-process (``yolosafe.cli.main.main``), as the installed command runs it; a property
test feeds it malformed GPU layouts, configs and option values."""

from __future__ import annotations

import json
import os
import subprocess
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_misuse import fake_run
from yolosafe.cli.main import main


class Called:
    def __init__(self, code: int | None, err: str, crash: str | None) -> None:
        self.code, self.err, self.crash = code, err, crash
        self.lines = err.strip().splitlines()


@pytest.fixture
def cli(tmp_path, shared_cache, monkeypatch, capsys):
    """``cli(*args, env={...})``: the CLI in-process in ``tmp_path`` with a clean yolosafe environment."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith(("YOLOSAFE_", "SLURM_", "PYTORCH_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("YOLOSAFE_CACHE", str(shared_cache / "yolosafe"))
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(shared_cache / "ultralytics"))

    def call(*args: str, env: dict[str, str] | None = None) -> Called:
        saved = dict(os.environ)
        os.environ.update(env or {})
        code, crash = None, None
        capsys.readouterr()
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # a traceback the user would see
            crash = traceback.format_exc()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return Called(code, capsys.readouterr().err, crash)

    return call


def refused(called: Called, *words: str) -> None:
    assert called.crash is None, called.crash
    assert called.code == 2, called.err
    assert len(called.lines) == 1, called.err
    assert "Traceback" not in called.err
    for word in words:
        assert word in called.lines[0], called.lines[0]


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


CASES = [
    (["--config", "@bad-utf8"], {}, ["--config", "not UTF-8"]),
    (["--config", "@list"], {}, ["expected a mapping", "list"]),
    (["--data", "@bad-list-data"], {}, ["image list is not UTF-8"]),
    (["--datasets", "@bad-utf8"], {}, ["--datasets", "not UTF-8"]),
    (["--name", "n" * 300], {}, ["--name", "300 bytes"]),
    (["--project", "p" * 300], {}, ["--project", "300 bytes"]),
    (["--name", "a\udcff"], {}, ["--name", "not valid UTF-8"]),
    (["--project", "x\udcfe/runs"], {}, ["--project", "not valid UTF-8"]),
    (["--project", "@loop"], {}, ["symbolic link loop"]),  # absolute: a relative one goes under runs/<task>
    (["--memory-fraction", "-1"], {}, ["--memory-fraction -1"]),
    (["--project", "/proc/yolosafe-runs"], {}, ["--project /proc/yolosafe-runs"]),
    ([], {"SLURM_NNODES": "x"}, ["SLURM_NNODES 'x'"]),
    ([], {"SLURM_NNODES": "2", "SLURM_NODEID": "a", "SLURM_JOB_NODELIST": "n[1-2]"}, ["SLURM_NODEID 'a'"]),
    ([], {"SLURM_NNODES": "-3", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}, ["SLURM_NNODES"]),
    ([], {"SLURM_NNODES": "2", "SLURM_NODEID": "7", "SLURM_JOB_NODELIST": "n[1-2]"}, ["SLURM_NODEID 7"]),
    ([], {"YOLOSAFE_FAKE_GPUS": "[1, 2]"}, ["YOLOSAFE_FAKE_GPUS"]),
    ([], {"YOLOSAFE_FAKE_GPUS": "24"}, ["YOLOSAFE_FAKE_GPUS", "'24'"]),
    ([], {"YOLOSAFE_FAKE_GPUS": '{"gpus": [24, 24]}'}, ["gpus[0] is 24"]),
    ([], {"YOLOSAFE_FAKE_GPUS": '{"gpus": [{"total_mib": 100, "phase_mib": [1]}]}'}, ["phase_mib"]),
    ([], {"YOLOSAFE_FAKE_GPUS": '{"gpus": [{"total_mib": 100, "name": 5}]}'}, ["name is 5"]),
    ([], {"YOLOSAFE_FAKE_GPUS": "@bad-utf8"}, ["not UTF-8"]),
    ([], {"YOLOSAFE_FAKE_GPUS": "1000000x24GB"}, ["1 to 1024 GPUs"]),
    (["--epochs", "2"], {"YOLOSAFE_INJECT_OOM": "phase=train,epoch=5"}, ["epoch=5 never comes"]),
    (["--epochs", "2"], {"YOLOSAFE_INJECT_OOM": "phase=final"}, ["give epoch=1"]),
]


@pytest.mark.parametrize(("args", "env", "words"), CASES, ids=[" ".join(c[0]) or next(iter(c[1])) for c in CASES])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "train"])
def test_malformed_inputs_are_one_line_before_anything_exists(cli, tmp_path, args, env, words, dry):
    files = {"@bad-utf8": write(tmp_path / "bad.yaml", b"epochs: 1\n\xff\xfe\n"),
             "@list": write(tmp_path / "list.yaml", b"[]\n"), "@loop": str(tmp_path / "loop1" / "runs"),
             "@bad-list-data": write(tmp_path / "data.yaml", b"path: .\ntrain: list.txt\nval: list.txt\n"
                                                             b"names: {0: a}\n")}
    write(tmp_path / "list.txt", b"\xff\xfe.jpg\n")
    if not (tmp_path / "loop1").is_symlink():
        os.symlink("loop2", tmp_path / "loop1")
        os.symlink("loop1", tmp_path / "loop2")
    args = [files.get(a, a) for a in args]
    env = {k: "@" + files[v] if v in files else v for k, v in env.items()}
    refused(cli("train", *args, *(["--dry-run"] if dry else []), env=env), *words)
    assert not (tmp_path / "runs").exists()


def test_a_resume_refuses_what_it_would_ignore_and_checks_values_as_a_new_run(cli, tmp_path):
    run = fake_run(tmp_path)
    refused(cli("train", "--resume", str(run), "--memory-fraction", "0.5", "--dry-run"), "--memory-fraction")
    refused(cli("train", "--resume", str(run), "--watch-interval", "100", "--dry-run"), "--watch-interval 100")
    refused(cli("train", "--resume", "", "--dry-run"), "--resume ''")


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only file system (a tmpfs remounted read-only), or read-only by its mode when not root."""
    where = tmp_path / "ro"
    where.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                                                   capture_output=True).returncode == 0
    if not mounted and os.geteuid() == 0:
        pytest.skip("root without mount: permission bits do not stop root")

    def freeze() -> None:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        else:
            for path in [where, *where.rglob("*")]:
                path.chmod(0o555 if path.is_dir() else 0o444)

    yield where, freeze
    if mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
    else:
        for path in [where, *where.rglob("*")]:
            path.chmod(0o755)


def test_a_read_only_project_refuses_a_new_run_and_a_resume(cli, read_only):
    where, freeze = read_only
    run = fake_run(where)
    freeze()
    refused(cli("train", "--project", str(where / "runs" / "detect"), "--name", "new"), "read-only" if
            os.geteuid() == 0 else "not writable")
    refused(cli("train", "--resume", str(run)), "--resume", "a resume writes")


# --- the property: malformed layouts, configs and option values ----------------------------------------------------

NOT_A_COUNT = st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.none(), st.booleans(),
                        st.integers(max_value=0), st.floats(max_value=0, allow_nan=False))
BAD_GPU = st.one_of(
    st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3),
    st.fixed_dictionaries({"total_mib": NOT_A_COUNT}),
    st.fixed_dictionaries({"total_mib": st.just(1000), "name": st.one_of(st.integers(), st.lists(st.text()))}),
    st.fixed_dictionaries({"total_mib": st.just(1000), "phase_mib": st.one_of(st.lists(st.integers()), st.text())}),
    st.fixed_dictionaries({"total_mib": st.just(1000), "processes": st.one_of(st.integers(), st.lists(st.integers(),
                                                                                                     min_size=1))}),
)
LAYOUTS = st.one_of(
    st.builds(lambda g: json.dumps({"gpus": [g]}), BAD_GPU),
    st.builds(lambda g: json.dumps({"gpus": g}), st.one_of(st.integers(), st.text(), st.dictionaries(st.text(),
                                                                                                     st.integers()))),
    st.builds(json.dumps, st.one_of(st.lists(st.integers()), st.integers(min_value=1), st.text(min_size=1))),
    st.builds(lambda n, size: f"{n}x{size}GB", st.integers(min_value=1025, max_value=10**9), st.integers(1, 80)),
    st.builds(lambda n: f"0x{n}GB", st.integers(1, 80)),
)
CONFIGS = st.one_of(
    st.builds(lambda v: yaml.safe_dump(v).encode(), st.one_of(st.lists(st.integers(), min_size=0, max_size=3),
                                                              st.integers(), st.text(min_size=1, max_size=8))),
    st.builds(lambda head, tail: head + b"\xff" + tail, st.binary(max_size=8), st.binary(max_size=8)),
)
BAD_OPTIONS = st.one_of(
    st.builds(lambda v: ["--memory-fraction", repr(v)], st.one_of(st.floats(max_value=0, allow_nan=False),
                                                                 st.floats(min_value=1.0001, max_value=1e6))),
    st.builds(lambda v: ["--max-retries", str(v)], st.integers(max_value=-1)),
    st.builds(lambda v: ["--min-batch", str(v)], st.integers(max_value=0)),
    st.builds(lambda v: ["--warn-at", repr(v)], st.floats(min_value=1.0001, max_value=1e6)),
    st.builds(lambda v: ["--name", v], st.text(alphabet="ab", min_size=256, max_size=300)),
)
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(layout=LAYOUTS)
def test_property_malformed_gpu_layouts(cli, tmp_path, layout):
    refused(cli("train", "--dry-run", env={"YOLOSAFE_FAKE_GPUS": layout}), "YOLOSAFE_FAKE_GPUS")
    assert not (tmp_path / "runs").exists()


@PROPERTY
@given(config=CONFIGS)
def test_property_malformed_configs(cli, tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_bytes(config)
    refused(cli("train", "--config", str(path), "--dry-run"), "--config")
    assert not (tmp_path / "runs").exists()


@PROPERTY
@given(option=BAD_OPTIONS)
def test_property_malformed_option_values(cli, tmp_path, option):
    refused(cli("train", *option), option[0])
    assert not (tmp_path / "runs").exists()
