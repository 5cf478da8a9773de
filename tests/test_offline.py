"""The AMP check rank 0 runs in ``_setup_train`` never waits on the network of an offline machine: Ultralytics' own
path opens a socket before it asks whether it is online; yolosafe's gives Ultralytics' offline answer without one,
and Ultralytics' own check wherever its weights are on disk (``--download`` fetches them once, in the input check).
The training over fake GPUs with every socket of every rank blocked is in test_gpu_truths.py."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.contexts import run_context
from yolosafe.training import inputcheck, offline


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every name lookup and connection of this process recorded and refused, as on an offline machine."""
    tried: list[tuple] = []

    def refused(*args, **kwargs):
        tried.append(args[:2])
        raise OSError("network unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", refused)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refused(address))
    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    return tried


@pytest.fixture
def weights_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from ultralytics import utils

    folder = tmp_path / "weights"
    monkeypatch.setattr(utils, "WEIGHTS_DIR", folder)
    return folder


def test_ultralytics_loading_the_amp_weights_offline_tries_the_network_first(no_network, weights_dir):
    """What check_amp does on a GPU without its weights: YOLO(WEIGHTS_DIR / 'yolo26n.pt') reaches safe_download,
    whose requests.get looks github.com up before is_online() is asked; YOLO_OFFLINE does not stop it."""
    from ultralytics import YOLO

    with pytest.raises(ConnectionError, match="offline"):
        YOLO(offline.amp_weights())
    assert ("github.com", 443) in no_network


def test_offline_without_its_weights_the_check_opens_no_socket_and_answers_as_ultralytics_offline(
        no_network, weights_dir, caplog):
    import torch

    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="ultralytics"):
        assert offline.check_amp(model, accelerator=True) is True  # Ultralytics' ConnectionError branch: AMP on
    assert no_network == []
    said = [r.getMessage() for r in caplog.records if "checks skipped" in r.getMessage()]
    assert len(said) == 1 and "--download" in said[0] and str(weights_dir / "yolo26n.pt") in said[0]
    assert offline.check_amp(model) is False and no_network == []  # a CPU model: Ultralytics' own check, no AMP


def test_with_its_weights_on_disk_or_online_the_check_is_ultralytics_own(no_network, weights_dir, monkeypatch):
    """Ultralytics' check_amp answers False for a CPU model at once: that answer (not the offline True) proves it ran.
    Online (YOLO_OFFLINE unset and Ultralytics' is_online() true) it downloads as Ultralytics does."""
    import torch
    from ultralytics import utils

    model = torch.nn.Linear(2, 2)
    weights_dir.mkdir()
    offline.amp_weights().write_bytes(b"")
    assert offline.check_amp(model, accelerator=True) is False
    offline.amp_weights().unlink()
    monkeypatch.setattr(utils, "is_online", lambda: True)
    assert offline.check_amp(model, accelerator=True) is False and no_network == []


def test_download_fetches_the_amp_weights_once_through_ultralytics_release_download(weights_dir, monkeypatch):
    from ultralytics.utils import downloads

    fetched: list[tuple[str, Path]] = []

    def safe_download(url, file=None, **kwargs):  # the network's edge: the release URL Ultralytics picked
        fetched.append((url, Path(file)))
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        Path(file).write_bytes(b"weights")

    monkeypatch.setattr(downloads, "safe_download", safe_download)
    assert offline.fetch_amp_weights() == weights_dir / "yolo26n.pt" and offline.fetch_amp_weights().is_file()
    assert len(fetched) == 1
    url, file = fetched[0]
    assert url.startswith("https://github.com/ultralytics/assets/releases/download/") and url.endswith("/yolo26n.pt")
    assert file == weights_dir / "yolo26n.pt"
    assert [offline.amp_wanted(a) for a in (True, False, "fp32", "bf16", "fp16")] == [True, False, False, False, True]
    fetched.clear()
    offline.amp_weights().unlink()
    notes: list[str] = []
    for download, amp in ((False, True), (True, "bf16"), (True, True)):
        inputcheck.amp_check_weights(download, SimpleNamespace(amp=amp), notes)  # the input check's step
    assert [file for _, file in fetched] == [weights_dir / "yolo26n.pt"] and notes == []

    def unreachable(url, file=None, **kwargs):
        raise ConnectionError(f"Download failure for {url}. Environment may be offline.")

    offline.amp_weights().unlink()
    monkeypatch.setattr(downloads, "safe_download", unreachable)
    inputcheck.amp_check_weights(True, SimpleNamespace(amp=True), notes)
    assert len(notes) == 1 and notes[0].startswith("AMP: yolo26n.pt could not be fetched (Download failure")


def test_the_font_check_probes_the_network_offline_and_not_under_no_probes(no_network, monkeypatch, tmp_path):
    """check_font (every check_det_dataset, the label plots) without Arial in Ultralytics' config folder: its
    is_url(check=True) sends a HEAD request though YOLO_OFFLINE is set; under no_probes it answers as it does
    offline (no font) without one, and the input check's ``online`` (--download asked) lets it through."""
    from ultralytics.utils import checks

    monkeypatch.setattr(checks, "USER_CONFIG_DIR", tmp_path)
    font = "NoSuchFontAnywhere{}.ttf"  # in no matplotlib font list either; a new name each time (an lru_cache)
    assert checks.check_font(font.format(1)) is None and no_network == [("github.com", 443)]  # the assets URL
    no_network.clear()
    with offline.no_probes():
        assert checks.check_font(font.format(2)) is None
    assert no_network == []
    with offline.no_probes(lambda: True):
        assert checks.check_font(font.format(3)) is None
    assert no_network  # online as asked: Ultralytics' own probe


def test_every_fake_gpu_decides_the_amp_check_as_a_gpu_and_trains_as_the_cpu(tmp_path):
    from yolosafe.training import trainer
    from yolosafe.training.fake import cpuranks

    rank = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    real = trainer.trainer_class("detect", run_context(tmp_path / "a"))
    one_fake = trainer.trainer_class("detect", run_context(tmp_path / "b", fake_gpus=True))
    fake_rank = trainer.trainer_class("detect", run_context(tmp_path / "c", rank, fake_gpus=True))
    assert trainer.AmpCheckOffline in real.__mro__ and cpuranks.AmpCheckAsOnAGpu not in real.__mro__
    for cls in (one_fake, fake_rank):
        assert cls.__mro__.index(cpuranks.AmpCheckAsOnAGpu) < cls.__mro__.index(trainer.AmpCheckOffline)


def test_the_children_that_check_measure_or_train_are_offline_unless_the_user_or_download_says_otherwise(
        monkeypatch, tmp_path):
    """``import ultralytics`` asks is_online(), two DNS lookups, unless YOLO_OFFLINE is set: the input check (but
    with --download), the fake pass and every attempt's processes get it unless the user set it."""
    from yolosafe import proc
    from yolosafe.planning import validate
    from yolosafe.planning.memory.model import UnknownModel
    from yolosafe.rundir.childrecords import CheckRequest, FakePassRequest
    from yolosafe.supervisor import children
    from yolosafe.supervisor.child import training_env

    assert proc.offline_env({"PATH": "/bin"})["YOLO_OFFLINE"] == "1"
    assert proc.offline_env({"YOLO_OFFLINE": "0"})["YOLO_OFFLINE"] == "0"  # the user's word
    assert training_env({"PATH": "/bin"}, {})["YOLO_OFFLINE"] == "1"
    seen: list[dict] = []

    def run_module(module, args, timeout, env=None):
        seen.append(dict(env or {}))
        raise proc.subprocess.TimeoutExpired(module, timeout)

    monkeypatch.setattr(proc, "run_module", run_module)
    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    for download in (False, True):
        with pytest.raises(validate.InputError, match="did not answer within"):
            children.input_check(CheckRequest("yolov8n.yaml", None, None, {}, None, "train", download=download))
    with pytest.raises(UnknownModel, match="did not answer within"):
        children.fake_pass(FakePassRequest("my-net.yaml"))
    assert seen[0]["YOLO_OFFLINE"] == "1" and "YOLO_OFFLINE" not in seen[1] and seen[2]["YOLO_OFFLINE"] == "1"
