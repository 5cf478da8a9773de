"""The real NVML backend over nvidia-ml-py's own Python functions, with only the shared library faked (fake_nvml)."""

from __future__ import annotations

import json
import logging
import os
import time

import pynvml
import pytest

from tests import fake_nvml, tinysets
from tests.fake_nvml import NOT_SUPPORTED, UNKNOWN, Driver, gpu
from yolosafe import gpus
from yolosafe.cli import main as cli
from yolosafe.rundir import files as rundir
from yolosafe.supervisor import attribution, watch

ABSENT = "nvidia-ml-py has no such function"


@pytest.fixture
def nvml(monkeypatch, caplog):
    """``nvml(driver)`` serves nvidia-ml-py from that fake driver. Afterwards: no callback crashed, and yolosafe
    asked nvidia-ml-py only for functions it has (a wrong name fails here, named)."""
    monkeypatch.delenv(gpus.FAKE_ENV, raising=False)
    caplog.set_level(logging.DEBUG, logger="yolosafe.gpus")
    drivers: list[Driver | None] = []

    def use(driver: Driver | None) -> Driver | None:
        fake_nvml.install(monkeypatch, driver)
        drivers.append(driver)
        return driver

    yield use
    assert not [c for d in drivers if d for c in d.crashes]
    assert not [r.getMessage() for r in caplog.get_records("call") if ABSENT in r.getMessage()]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``yolosafe ARGS`` in this process (where the fake library is installed): exit status, stdout, stderr."""
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_patching_a_name_nvidia_ml_py_lacks_fails(monkeypatch):
    """The guard of every test here: a patch can never create a function nvidia-ml-py does not have."""
    with pytest.raises(AttributeError):
        monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeProcesses", lambda handle: [])
    assert not hasattr(pynvml, "nvmlDeviceGetComputeProcesses")


def test_a_wrong_function_name_is_a_missing_value_and_a_warning_naming_it(monkeypatch, caplog):
    fake_nvml.install(monkeypatch, Driver([gpu()]))
    backend = gpus.NvmlBackend()
    assert backend.inventory().gpus[0].valid
    with caplog.at_level(logging.WARNING, logger="yolosafe.gpus"):
        assert backend._query("nvmlDeviceGetComputeProcesses", backend._handle(0)) is None
    assert f"nvmlDeviceGetComputeProcesses: {ABSENT}" in caplog.text
    backend.close()


@pytest.mark.parametrize(("driver", "why"), [(None, "NVML Shared Library Not Found"),
                                             (Driver([gpu()], init_error=fake_nvml.DRIVER_NOT_LOADED),
                                              "Driver Not Loaded")])
def test_no_driver_is_an_inventory_without_gpus(nvml, capsys, driver, why):
    nvml(driver)
    inv = gpus.read_inventory({})
    assert (inv.backend, inv.gpus, inv.driver) == ("nvml", (), None)
    assert inv.problem == f"no NVIDIA driver (nvmlInit: {why})"
    with pytest.raises(gpus.GPUReadError, match=why):
        gpus.NvmlBackend().read_memory(0)
    code, out, err = run_cli(capsys, "gpus")
    assert (code, out) == (1, "") and err == f"no GPU: {inv.problem}; yolosafe train runs on CPU (--gpus cpu)\n"


def test_one_gpu_every_figure_through_nvidia_ml_py(nvml):
    driver = nvml(Driver([gpu(total_mib=40960, used_mib=13000, util=55,
                              processes=[(4242, 12000), (4343, 500)], graphics=[(900, 500), (4343, 500)])]))
    inv = gpus.read_inventory({})
    assert (inv.backend, inv.driver, inv.cuda, inv.problem, inv.ids) == ("nvml", "580.95.05", "13.0", None, (0,))
    g = inv.gpus[0]
    assert (g.name, g.uuid, g.total_mib, g.used_mib, g.free_mib, g.utilization, g.mig, g.valid) == (
        "NVIDIA Fake 0", "GPU-fake-nvml-0000", 40960, 13000, 27960, 55, False, True)
    assert g.processes == (gpus.GPUProcess(4242, 12000), gpus.GPUProcess(4343, 500), gpus.GPUProcess(900, 500))
    backend = gpus.NvmlBackend()
    reading = backend.read_memory(0)
    # the watch's reading: CUDA's processes are compute processes; the graphics list (an X server) is the inventory's
    assert (reading.total_mib, reading.used_mib, len(reading.processes)) == (40960, 13000, 2)
    backend.close()
    assert driver.calls["nvmlDeviceGetComputeRunningProcesses_v3"] >= 2  # nvidia-ml-py picked the newest symbol
    assert "nvmlDeviceGetComputeRunningProcesses_v2" not in driver.calls
    assert driver.calls["nvmlShutdown"] == 2


def test_four_gpus_in_nvml_order(nvml):
    nvml(Driver([gpu(i, total_mib=24576 * (1 + i % 2), used_mib=100 * i) for i in range(4)]))
    inv = gpus.read_inventory({})
    assert inv.ids == (0, 1, 2, 3) and all(g.valid for g in inv.gpus)
    assert [g.total_mib for g in inv.gpus] == [24576, 49152, 24576, 49152]
    assert [g.used_mib for g in inv.gpus] == [0, 100, 200, 300]
    assert gpus.visible_ids(inv, "GPU-fake-nvml-0003,1") == (3, 1)
    backend = gpus.NvmlBackend()
    assert [backend.read_memory(i).used_mib for i in range(4)] == [0, 100, 200, 300]
    with pytest.raises(gpus.GPUReadError, match="Invalid Argument"):
        backend.read_memory(4)
    backend.close()


def test_utilization_not_supported_is_unknown_and_logged_once(nvml, caplog):
    nvml(Driver([gpu(errors={"nvmlDeviceGetUtilizationRates": NOT_SUPPORTED})]))
    backend = gpus.NvmlBackend()
    first, second = backend.inventory(), backend.inventory()
    assert first == second and first.gpus[0].utilization is None and first.gpus[0].valid
    assert first.gpus[0].total_mib == 24576
    said = [r for r in caplog.records if "nvmlDeviceGetUtilizationRates: Not Supported" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]
    backend.close()


def test_process_lists_not_supported(nvml):
    nvml(Driver([gpu(used_mib=3000, errors={name: NOT_SUPPORTED for name in fake_nvml.PROCESS_LISTS})]))
    g = gpus.read_inventory({}).gpus[0]
    assert (g.valid, g.used_mib, g.processes) == (True, 3000, ())
    backend = gpus.NvmlBackend()
    reading = backend.read_memory(0)
    assert (reading.used_mib, reading.processes) == (3000, None)
    assert attribution.split(reading, {os.getpid()}) == (None, None)  # unknown, not "nobody"
    backend.close()


def test_used_gpu_memory_not_available(nvml):
    nvml(Driver([gpu(processes=[(os.getpid(), None), (77, 1000)])]))
    backend = gpus.NvmlBackend()
    reading = backend.read_memory(0)
    assert reading.processes == (gpus.GPUProcess(os.getpid(), None), gpus.GPUProcess(77, 1000))
    assert attribution.split(reading, {os.getpid()}) == (None, 1000)
    backend.close()


def test_more_processes_than_the_first_buffer_holds(nvml):
    """nvidia-ml-py asks for the count with an empty buffer (INSUFFICIENT_SIZE), then reads into 2n+5 entries:
    processes that start in between still fit. More than that: nvidia-ml-py gives up, that sample's processes are
    unknown, the next sample has them."""
    many, later = [(1000 + i, 10) for i in range(40)], [(5000 + i, 20) for i in range(9)]
    burst = [(6000 + i, 1) for i in range(8)]
    driver = nvml(Driver([gpu(processes=many, spawn=later), gpu(1, processes=[(1, 1)], spawn=burst)]))
    backend = gpus.NvmlBackend()
    reading = backend.read_memory(0)
    assert len(reading.processes) == 49 and gpus.GPUProcess(5008, 20) in reading.processes
    assert driver.calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 2
    assert backend.read_memory(1).processes is None  # 9 processes for 1 * 2 + 5 entries
    assert len(backend.read_memory(1).processes) == 9
    backend.close()


def test_driver_without_v3_process_functions(nvml):
    """nvidia-ml-py's unversioned process functions call only ``_v3`` and raise NVMLLibraryMismatchError on an
    older driver: yolosafe falls back to ``_v2`` and then asks ``_v2`` directly."""
    missing = {"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3"}
    driver = nvml(Driver([gpu(processes=[(4242, 1500)], graphics=[(31, 2)])], missing=missing))
    backend = gpus.NvmlBackend()
    assert backend.inventory().gpus[0].processes == (gpus.GPUProcess(4242, 1500), gpus.GPUProcess(31, 2))
    for _ in range(3):
        assert backend.read_memory(0).processes == (gpus.GPUProcess(4242, 1500),)  # the watch: compute only
    assert driver.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 8  # 4 reads x (sizing call + fill)
    assert not missing & set(driver.calls)
    backend.close()


def test_older_driver_without_newer_symbols(nvml):
    """No ``nvmlSystemGetCudaDriverVersion_v2``: the CUDA version comes from the older symbol; no
    ``nvmlDeviceGetCount_v2``: no GPU can be counted, and the inventory says why."""
    nvml(Driver([gpu()], missing={"nvmlSystemGetCudaDriverVersion_v2"}))
    assert gpus.read_inventory({}).cuda == "13.0"
    nvml(Driver([gpu()], missing={"nvmlDeviceGetCount_v2"}))
    inv = gpus.read_inventory({})
    assert (inv.gpus, inv.driver) == ((), "580.95.05")
    assert inv.problem == "NVML cannot count the GPUs (nvmlDeviceGetCount: Function Not Found)"


def test_mig_mode_on(nvml, capsys):
    """MIG: the parent GPU gives its memory but no utilisation and no per-process memory; on some drivers not even
    its memory (that GPU is then an invalid record, MIG noted)."""
    mig_procs = {"util": 0, "mig": True, "errors": {"nvmlDeviceGetUtilizationRates": NOT_SUPPORTED}}
    nvml(Driver([gpu(0, used_mib=9000, processes=[(4242, None)], **mig_procs),
                 gpu(1, mig=True, errors={name: NOT_SUPPORTED for name in
                                          ["nvmlDeviceGetMemoryInfo", *fake_nvml.PROCESS_LISTS]})]))
    first, second = gpus.read_inventory({}).gpus
    assert (first.mig, first.valid, first.used_mib, first.utilization) == (True, True, 9000, None)
    assert first.processes == (gpus.GPUProcess(4242, None),)
    assert (second.mig, second.valid, second.total_mib) == (True, False, None)
    assert second.problem == "NVML cannot read its memory (nvmlDeviceGetMemoryInfo: Not Supported)"
    code, out, _ = run_cli(capsys, "gpus")
    assert code == 0 and "MIG on; 4242" in out and "invalid: NVML cannot read its memory" in out


def test_a_gpu_whose_handle_cannot_be_read_stays_as_an_invalid_record(nvml, capsys):
    nvml(Driver([gpu(0), gpu(1, errors={"nvmlDeviceGetHandleByIndex_v2": UNKNOWN}), gpu(2, lost=True)]))
    inv = gpus.read_inventory({})
    assert inv.ids == (0, 1, 2) and [g.valid for g in inv.gpus] == [True, False, False]
    assert inv.gpus[1].problem == "NVML cannot open it (nvmlDeviceGetHandleByIndex: Unknown Error)"
    assert inv.gpus[2].problem == "NVML cannot open it (nvmlDeviceGetHandleByIndex: GPU is lost)"
    assert (inv.gpus[2].name, inv.gpus[2].total_mib, inv.gpus[2].free_mib) == (None, None, None)
    code, out, _ = run_cli(capsys, "gpus")
    assert code == 0
    lines = out.splitlines()
    assert "invalid: NVML cannot open it (nvmlDeviceGetHandleByIndex: GPU is lost)" in lines[-1]
    assert lines[-1].split()[0] == "2" and "NVIDIA Fake 0" in lines[-3]


def test_yolosafe_gpus_and_json_end_to_end(nvml, capsys):
    nvml(Driver([gpu(0, total_mib=40960, used_mib=13000, processes=[(4242, 13000)]), gpu(1, processes=[(7, None)])]))
    code, out, err = run_cli(capsys, "gpus")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "driver 580.95.05, CUDA 13.0 (nvml)"
    assert "NVIDIA Fake 0" in out and "4242:13000MiB" in out and out.splitlines()[-1].endswith("  7")
    code, out, err = run_cli(capsys, "gpus", "--json")
    data = json.loads(out)
    assert (code, data["backend"], data["driver"], data["cuda"], data["problem"]) == (0, "nvml", "580.95.05", "13.0",
                                                                                    None)
    first, second = data["gpus"]
    assert (first["free_mib"], first["processes"], first["mig"], first["problem"]) == (
        27960, [{"pid": 4242, "used_mib": 13000}], False, None)
    assert second["processes"] == [{"pid": 7, "used_mib": None}]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_gpu_lost_while_the_watch_samples(nvml, tmp_path, caplog):
    """The real MemoryWatch over NvmlBackend: GPU 1 falls off the bus mid-run; it is reported once, GPU 0 goes on
    being sampled; when GPU 0 is lost too, the watch ends cleanly, training untouched."""
    driver = nvml(Driver([gpu(0, used_mib=500, processes=[(os.getpid(), 500)]), gpu(1, used_mib=700)]))
    said: list[str] = []
    w = watch.MemoryWatch(tmp_path, [0, 1], 0.01, 0.9, gpus.NvmlBackend, said.append)
    w.start(1, lambda: {os.getpid()})
    wait_for(lambda: w.samples >= 10)
    driver.gpus[1]["lost"] = True
    wait_for(lambda: w.read_errors >= 5)
    before = w.samples
    wait_for(lambda: w.samples >= before + 5)
    assert w.alive and w.stopped is None
    driver.gpus[0]["lost"] = True
    wait_for(lambda: not w.alive)
    w.stop()
    assert said == ["memory watch: NVML read failed (GPU 1: nvmlDeviceGetMemoryInfo: GPU is lost); sampling goes on, "
                    "GPUs that keep failing are dropped", "memory watch stopped: no GPU could be read"]
    assert w.stopped == "memory watch stopped: no GPU could be read"
    lost_logs = [r for r in caplog.records if "GPU is lost" in r.getMessage()]
    # one backend, one (function, error): one line. GPU 1 may be lost between two calls of one read (the memory
    # figure read, the process list not), so one or two functions may say it, each once.
    assert {r.levelno for r in lost_logs} == {logging.WARNING} and 1 <= len(lost_logs) <= 2
    assert len({r.getMessage() for r in lost_logs}) == len(lost_logs)
    rows = (tmp_path / rundir.MEMORY_CSV).read_text().splitlines()
    gpu0 = [r for r in rows[1:] if r.split(",")[2] == "0"]
    assert len(gpu0) >= before // 2 + 5 and gpu0[0].split(",")[3:7] == ["24576.0", "500.0", "500.0", "0.0"]


def test_yolosafe_train_dry_run_over_nvml_refuses_an_invalid_gpu_in_one_line(nvml, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    data = tinysets.rooted(tmp_path / "set", "detect")  # the data is checked (by Ultralytics) before the plan
    nvml(Driver([gpu(0), gpu(1, lost=True), gpu(2, processes=[(4242, None)])]))
    code, out, err = run_cli(capsys, "train", "--dry-run", "--model", "yolov8n.yaml", "--gpus", "0,2", "--batch", "8",
                             "--data", str(data))
    assert (code, err) == (0, "") and "0,2  (2 GPUs)" in out
    code, out, err = run_cli(capsys, "train", "--dry-run", "--gpus", "0,1", "--batch", "8", "--data", str(data))
    assert (code, out) == (2, "")
    assert err == ("yolosafe: error: GPU 1: NVML cannot open it (nvmlDeviceGetHandleByIndex: GPU is lost); "
                   "choose other GPUs with --gpus (see yolosafe gpus)\n")
    assert not (tmp_path / "runs").exists()


def _data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = tmp_path / "set" / "data.yaml"
    return str(found if found.is_file() else tinysets.rooted(tmp_path / "set", "detect"))


def test_mig_devices_are_enumerated_with_their_memory_and_uuids(nvml):
    """nvmlDeviceGetMaxMigDeviceCount slots, nvmlDeviceGetMigDeviceHandleByIndex each (an empty slot is NVML's
    NOT_FOUND, skipped quietly), the MIG device's own memory and UUID through the same query helper."""
    slices = [fake_nvml.mig_device(0, 0), None, fake_nvml.mig_device(0, 2, total_mib=19968, used_mib=512)]
    driver = nvml(Driver([gpu(0, total_mib=81920, mig=True, mig_devices=slices), gpu(1)]))
    first, second = gpus.read_inventory({}).gpus
    assert [(m.uuid, m.total_mib, m.used_mib, m.mig_of) for m in first.mig_devices] == [
        (slices[0]["uuid"], 9984, 0, 0), (slices[2]["uuid"], 19968, 512, 0)]
    assert second.mig_devices == () and driver.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 3
    assert "nvmlDeviceGetMaxMigDeviceCount" not in driver.calls or first.mig


def test_a_mig_uuid_plans_for_the_slice_and_never_falls_back_to_the_cpu(nvml, capsys, tmp_path, monkeypatch):
    data = _data(tmp_path, monkeypatch)
    slices = [fake_nvml.mig_device(0, 0), fake_nvml.mig_device(0, 1, total_mib=19968)]
    nvml(Driver([gpu(0, total_mib=81920, mig=True, mig_devices=slices), gpu(1)]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", slices[1]["uuid"])
    inventory = gpus.planning_inventory(gpus.read_inventory({}), slices[1]["uuid"])
    assert (inventory.gpus[0].total_mib, inventory.gpus[0].uuid) == (19968, slices[1]["uuid"])
    code, out, err = run_cli(capsys, "train", "--dry-run", "--model", "yolov8n.yaml", "--batch", "8", "--data", data)
    assert (code, err) == (0, "") and "0  (1 GPU)" in out and "device           cpu" not in out
    assert f"CUDA_VISIBLE_DEVICES={slices[1]['uuid']} " in out
    for visible, words in ((f"{slices[0]['uuid']},{slices[1]['uuid']}", "CUDA shows one MIG device per process"),
                           ("MIG-from-another-machine", "names no GPU this process can use")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        code, out, err = run_cli(capsys, "train", "--dry-run", "--batch", "8", "--data", data)
        assert (code, out, err.count("\n")) == (2, "", 1) and words in err and "CUDA_VISIBLE_DEVICES" in err
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    code, out, err = run_cli(capsys, "train", "--dry-run", "--gpus", "0,1", "--batch", "8", "--data", data)
    assert (code, err.count("\n")) == (2, 1) and "is a MIG device" in err and "--gpus 0" in err


def test_ranks_get_gpu_uuids_and_an_inherited_index_list_counts_the_gpus_this_process_may_open(nvml, capsys,
                                                                                                  tmp_path,
                                                                                                  monkeypatch):
    data = _data(tmp_path, monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml(Driver([gpu(i) for i in range(4)]))
    code, out, err = run_cli(capsys, "train", "--dry-run", "--gpus", "3,1", "--batch", "8", "--data", data)
    assert code == 0 and "CUDA_VISIBLE_DEVICES=GPU-fake-nvml-0003,GPU-fake-nvml-0001 " in out, err
    # cgroup device limits: NVML lists GPU 0 but this process may not open it; CUDA's 0,1 are NVML's 1,2
    nvml(Driver([gpu(0, errors={"nvmlDeviceGetHandleByIndex_v2": fake_nvml.NO_PERMISSION}), gpu(1), gpu(2)]))
    inventory = gpus.read_inventory({})
    assert not inventory.gpus[0].openable and gpus.visible_ids(inventory, "0,1") == (1, 2)


def test_the_watch_samples_the_mig_slice_the_run_trains_on_never_its_whole_gpu(nvml, tmp_path):
    """GPU 0 (80 GB) in MIG mode; the run trains on its second slice (10 GB, CUDA_VISIBLE_DEVICES names it), another
    tenant fills the first. memory.csv's total is the slice's and its memory and processes are the slice's own
    (nvmlDeviceGetMigDeviceHandleByIndex, matched by UUID once, then cached); a full slice warns. The watch asks the
    compute process list only: no graphics-process call for a CUDA job."""
    from yolosafe.supervisor.child import watched_slices

    tenant = fake_nvml.mig_device(0, 0, total_mib=40192, used_mib=38000, processes=[(4242, 38000)])
    ours = fake_nvml.mig_device(0, 1, total_mib=9984, used_mib=9600, processes=[(os.getpid(), 9600)])
    driver = nvml(Driver([gpu(0, total_mib=81920, used_mib=47600, mig=True, mig_devices=[tenant, ours],
                              processes=[(4242, None), (os.getpid(), None)])]))
    slices = watched_slices((0,), {"CUDA_VISIBLE_DEVICES": ours["uuid"]})
    assert slices == {0: ours["uuid"]} and watched_slices((0,), {}) == {0: tenant["uuid"]}  # CUDA's first slice
    driver.calls.clear()
    said: list[str] = []
    w = watch.MemoryWatch(tmp_path, [0], 0.01, 0.9, gpus.NvmlBackend, said.append, slices)
    w.start(1, lambda: {os.getpid()})
    wait_for(lambda: w.samples >= 5)
    w.stop()
    rows = (tmp_path / rundir.MEMORY_CSV).read_text().splitlines()[1:]
    assert {tuple(r.split(",")[3:7]) for r in rows} == {("9984.0", "9600.0", "9600.0", "0.0")}
    assert len(said) == 1 and "GPU 0 at 96%" in said[0] and "of 9.8 GiB used" in said[0]
    assert driver.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 2  # slots 0 and 1, once: the handle is cached
    assert not [name for name in driver.calls if "Graphics" in name]
    assert driver.calls["nvmlDeviceGetMemoryInfo"] == w.samples  # one memory call per sample of the slice


def test_a_driver_that_hides_processes_gives_an_unknown_split_never_ours_0(nvml):
    """A container whose driver lists no process at all while memory is held: the split is unknown; an idle GPU's
    own few MiB with an empty list stay "ours 0, others 0"."""
    nvml(Driver([gpu(0, used_mib=9000), gpu(1, used_mib=300)]))
    backend = gpus.NvmlBackend()
    try:
        held, idle = backend.read_memory(0), backend.read_memory(1)
    finally:
        backend.close()
    assert held.processes == () and attribution.split(held, {os.getpid()}) == (None, None)
    assert attribution.split(idle, {os.getpid()}) == (0.0, 0.0)


def test_torchs_cuda_build_is_read_without_importing_torch_as_torch_says_it():
    """The supervisor's reading of torch/version.py (no torch import) against torch.version.cuda itself."""
    import subprocess
    import sys

    code = ("import sys, json; from yolosafe import gpus; print(json.dumps(gpus.torch_build())); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    import torch

    assert json.loads(out[0]) == [torch.__version__, torch.version.cuda] and out[1] == "False"


def test_a_driver_too_old_for_torchs_cuda_build_is_refused_in_one_line_naming_both(nvml, capsys, tmp_path,
                                                                                    monkeypatch):
    data = _data(tmp_path, monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpus, "torch_build", lambda: ("2.14.1+cu130", "13.0"))
    nvml(Driver([gpu(0)], driver="550.54.15", cuda=12040))
    code, out, err = run_cli(capsys, "train", "--dry-run", "--batch", "8", "--data", data)
    assert (code, out, err.count("\n")) == (2, "", 1), err
    assert "supports CUDA 12.4" in err and "torch 2.14.1+cu130 was built for CUDA 13.0" in err
    assert not (tmp_path / "runs").exists()
    code, out, err = run_cli(capsys, "train", "--dry-run", "--batch", "8", "--gpus", "cpu", "--data", data)
    assert code == 0, err  # the CPU needs no driver
    assert gpus.cuda_problem("13.2", "2.14.1", "13.0") is None and gpus.cuda_problem("12.8", "x", None) is None


@pytest.mark.parametrize("variable", ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"])
def test_gpus_asked_for_where_nvml_cannot_be_read_are_refused_never_the_cpu(nvml, capsys, tmp_path, monkeypatch,
                                                                              variable):
    """A container without the driver's utility capability: no libnvidia-ml, the scheduler gave GPU 0."""
    data = _data(tmp_path, monkeypatch)
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    nvml(None)
    code, out, err = run_cli(capsys, "train", "--dry-run", "--batch", "8", "--data", data)
    assert code == 0 and "cpu" in out  # nothing asked for GPUs: the CPU, as planned
    monkeypatch.setenv(variable, "0")
    code, out, err = run_cli(capsys, "train", "--dry-run", "--batch", "8", "--data", data)
    assert (code, out, err.count("\n")) == (2, "", 1), err
    assert f"{variable}=0 asks for GPUs" in err and "NVML" in err and "--gpus cpu" in err


def test_the_watch_overhead_benchmark_counts_three_nvml_calls_per_gpu_per_sample_and_no_graphics_list():
    """benchmarks/watch_overhead.py --nvml-calls over this faked library: one memory call and the compute list's
    sizing call and fill per GPU per sample, for 1 and 8 GPUs (240 C calls per second on 8 GPUs at 0.1 s)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "watch_overhead.py"
    spec = importlib.util.spec_from_file_location("watch_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for count in (1, 8):
        assert bench.nvml_calls(count, ticks=5) == {"nvmlDeviceGetMemoryInfo": count,
                                                   "nvmlDeviceGetComputeRunningProcesses_v3": 2 * count}
