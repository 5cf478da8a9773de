"""The GPU inventory through the fake backend every test uses (the real NVML backend: tests/test_nvml.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from yolosafe import gpus


def test_fake_sizes():
    inv = gpus.read_inventory({gpus.FAKE_ENV: "2x24GB,1x80GB"})
    assert inv.backend == "fake" and inv.ids == (0, 1, 2)
    assert [g.total_mib for g in inv.gpus] == [24576, 24576, 81920]
    assert inv.gpus[0].free_mib == 24576 and inv.problem is None


def test_fake_json_with_processes(tmp_path):
    spec = {"driver": "550.54.15", "cuda": "12.4",
            "gpus": [{"name": "A100", "total_mib": 40960, "used_mib": 13000,
                      "processes": [{"pid": 4242, "used_mib": 13000}]}]}
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(spec))
    for value in (json.dumps(spec), f"@{path}"):
        inv = gpus.read_inventory({gpus.FAKE_ENV: value})
        gpu = inv.gpus[0]
        assert (inv.driver, inv.cuda, gpu.name, gpu.used_mib, gpu.free_mib) == ("550.54.15", "12.4", "A100", 13000,
                                                                                27960)
        assert gpu.processes == (gpus.GPUProcess(4242, 13000),)


def test_fake_none_is_a_machine_without_driver():
    inv = gpus.read_inventory({gpus.FAKE_ENV: "none"})
    assert inv.gpus == () and "no NVIDIA driver" in inv.problem


def test_fake_phase_memory_follows_phase_file(tmp_path):
    phase_file = tmp_path / "phase.json"
    spec = json.dumps({"gpus": [{"total_mib": 10000, "used_mib": 500, "phase_mib": {"train": 3000, "val": 7000}}]})
    backend = gpus.FakeBackend(spec, {gpus.PHASE_FILE_ENV: str(phase_file)})
    assert backend.read_memory(0).used_mib == 500
    phase_file.write_text(json.dumps({"phase": "val", "pid": os.getpid()}))
    reading = backend.read_memory(0)
    assert reading.used_mib == 7500 and gpus.GPUProcess(os.getpid(), 7000) in reading.processes
    with pytest.raises(gpus.GPUReadError):
        backend.read_memory(1)


def test_fake_phase_memory_is_per_rank_gpu_and_ends_with_its_process(tmp_path):
    """Each rank's phase memory lands on its own GPU only, and a process that has exited holds none."""
    base = tmp_path / "phase.json"
    spec = json.dumps({"gpus": [{"total_mib": 10000, "phase_mib": {"train": 3000}}] * 2})
    backend = gpus.FakeBackend(spec, {gpus.PHASE_FILE_ENV: str(base)})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gpus.fake_phase_file(base, 1).write_text(json.dumps({"phase": "train", "pid": os.getpid()}))
    assert [backend.read_memory(i).used_mib for i in (0, 1)] == [0, 3000]
    gpus.fake_phase_file(base, 1).write_text(json.dumps({"phase": "train", "pid": int(dead.stdout)}))
    assert backend.read_memory(1).used_mib == 0 and backend.read_memory(1).processes == ()


def test_fake_mig_slice_is_read_as_the_slice_with_the_ranks_memory_on_it(tmp_path):
    """The watch's reading of a MIG device: the slice's total and used memory plus the phase memory of the rank on
    it, never the parent GPU's 80 GB; a driver hiding processes lists none; blocking collectives are a layout word."""
    phase_file = tmp_path / "phase.json"
    spec = json.dumps({"hidden_pids": True, "collectives": "blocking", "gpus": [
        {"total_mib": 81920, "used_mib": 30000, "phase_mib": {"train": 3000},
         "mig": [{"uuid": "MIG-a", "total_mib": 40192, "used_mib": 30000}, {"uuid": "MIG-b", "total_mib": 9984}]}]})
    backend = gpus.FakeBackend(spec, {gpus.PHASE_FILE_ENV: str(phase_file)})
    phase_file.write_text(json.dumps({"phase": "train", "pid": os.getpid()}))
    slice_b = backend.read_memory(0, "MIG-b")
    assert (slice_b.total_mib, slice_b.used_mib, slice_b.processes) == (9984, 3000, ())
    assert backend.read_memory(0).total_mib == 81920
    with pytest.raises(gpus.GPUReadError):
        backend.read_memory(0, "MIG-elsewhere")
    assert gpus.blocking_collectives({gpus.FAKE_ENV: spec}) and not gpus.blocking_collectives({gpus.FAKE_ENV: "2x8GB"})
    with pytest.raises(gpus.FakeGpusError, match="collectives"):
        gpus.FakeBackend(json.dumps({"collectives": "nccl", "gpus": []}))


@pytest.mark.parametrize("spec", ["4x", "lots", "{not json"])
def test_bad_fake_spec(spec):
    with pytest.raises(gpus.FakeGpusError):
        gpus.open_backend({gpus.FAKE_ENV: spec}).inventory()


def test_cuda_visible_devices_restricts_in_nvml_numbering():
    inv = gpus.read_inventory({gpus.FAKE_ENV: "4x24GB"})
    assert gpus.visible_ids(inv, None) == (0, 1, 2, 3)
    assert gpus.visible_ids(inv, "2,3") == (2, 3)
    assert gpus.visible_ids(inv, "GPU-fake-0001,0") == (1, 0)  # UUIDs too
    assert gpus.visible_ids(inv, "1,9,2") == (1,)  # like CUDA: the list ends at the first unknown entry
    assert gpus.visible_ids(inv, "") == ()
