"""What real GPUs do that a CPU does not, simulated at the lowest layer: every real out-of-memory form recovered by
the retry loop over real CPU ranks (fake GPUs), raised as the exception type a GPU raises with its real text; a
resume that finds the run's GPUs by UUID; a container's PID namespace."""

from __future__ import annotations

import csv
import json
import os
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TINY, run_dir_of, story
from yolosafe import gpus
from yolosafe.rundir import records

OFFLINE = Path(__file__).parent / "offline"  # its sitecustomize refuses (and logs) every use of the network
# Two fake GPUs as a container sees them: NVML's pids are the host's, none a process here (the ranks' phase memory
# is listed under such pids too).
CONTAINER = json.dumps({"host_pids": True, "gpus": [{"total_mib": 24576, "phase_mib": {"train": 3000, "val": 4000}}
                                                    for _ in range(2)]})


@pytest.mark.slow
def test_the_retry_loop_recovers_each_real_oom_form_on_two_ranks_in_a_container(run_cli, tmp_path):
    """Rank 1 raises each real exception type with its real text in turn (CUDA's own, NCCL's, cuDNN's out of memory),
    one per attempt; each attempt is an OOM, the batch halves and the fourth completes. The run's memory is listed
    under host pids: the split between this run and others is unknown, never "others". The machine is offline
    (tests/offline/sitecustomize.py in every process): rank 0 of each attempt reaches the AMP check as on a GPU, and
    no process of the run ever looks up a host or connects beyond the loopback."""
    forms = {"accelerator": "AcceleratorError", "nccl": "DistBackendError", "cudnn": "RuntimeError"}
    netlog = tmp_path / "network.log"
    env = {"YOLOSAFE_FAKE_GPUS": CONTAINER,
           "YOLOSAFE_INJECT_OOM": f"phase=train,epoch=0,rank=1,times=3,error={'+'.join(forms)}",
           "PYTHONPATH": os.pathsep.join([str(OFFLINE), os.environ.get("PYTHONPATH", "")]),
           "YOLOSAFE_TEST_NETLOG": str(netlog)}
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", "--watch-interval", "0.02", *TINY, "--batch", "16",
                     env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    assert not netlog.exists(), netlog.read_text()[:3000]
    assert (run / "train.log").read_text().count("checks skipped: offline") == 4  # rank 0, each attempt
    s = story(run)
    *ooms, last = s["attempts"]
    assert [(a["outcome"], a["phase"], a["rank"], a["gpu"]) for a in ooms] == [("oom", "train", 1, 1)] * 3
    assert [a["per_gpu_batch"] for a in s["attempts"]] == [8, 4, 2, 1] and last["outcome"] == "completed"
    raised = {f.attempt: f.error for f in records.load_failures(run) if f.rank == 1}
    assert [raised[n] for n in (1, 2, 3)] == list(forms.values())  # the real types, read back as the policy reads them
    assert s["memory_watch"]["split"].startswith("unknown: NVML names the GPUs' processes by pids of another")
    assert result.stderr.count("pids of another PID namespace") == 1 and "exclude" not in result.stderr
    with open(run / "memory.csv") as fh:
        held = [r for r in csv.DictReader(fh) if float(r["used_mib"]) > 0]  # the ranks' memory, under host pids
    assert held and all(r["ours_mib"] == r["others_mib"] == "" for r in held)
    assert max(float(r["used_mib"]) for r in held) >= 3000


def test_no_process_is_judged_by_a_pid_of_another_namespace():
    from yolosafe.readers import holders
    from yolosafe.supervisor.attribution import split

    host = gpus.HOST_PID_OFFSET + os.getpid()  # the pid NVML gives this very process from a container
    foreign = gpus.GPU(0, "x", "GPU-x", 24576, 5000, 0, (gpus.GPUProcess(host, 5000), gpus.GPUProcess(host + 1, 1)))
    judged = holders.judge_gpus((foreign,))
    assert {(h.kind, h.action) for h in judged} == {("another pid namespace", holders.NEVER)}
    here = gpus.GPU(1, "x", "GPU-y", 24576, 5000, 0, (gpus.GPUProcess(os.getpid(), 5000),))
    assert holders.judge_gpus((here,))[0].kind == "this shell"
    reading = gpus.MemoryReading(0, 24576, 5000, foreign.processes)
    assert split(reading, {os.getpid()}) == (None, None)  # never "others hold it all"
    assert split(reading, {os.getpid()}, absent_is_foreign=False) == (0.0, 5001.0)


def test_the_namespace_is_decided_by_evidence_not_by_one_reading():
    """A reading that looks foreign once (a phase read a moment before its memory appears, a process that exited
    while NVML listed it) decides nothing; the run's own pid proves the namespace for good; only readings that keep
    looking foreign, or do so until sampling ends, make the split unknown, said once."""
    from yolosafe.supervisor.attribution import FOREIGN_ROUNDS, Namespace

    here, gone = os.getpid(), gpus.HOST_PID_OFFSET + os.getpid()
    lonely = gpus.MemoryReading(0, 24576, 5000, (gpus.GPUProcess(gone, 5000),))
    shared = gpus.MemoryReading(0, 24576, 8000, (gpus.GPUProcess(gone, 5000), gpus.GPUProcess(here, 3000)))
    said: list[str] = []
    ns = Namespace()
    assert ns.split(lonely, {here}, True, said.append) == (None, None) and not ns.foreign
    assert ns.split(shared, {here}, True, said.append) == (3000.0, 5000.0) and ns.ours
    for _ in range(2 * FOREIGN_ROUNDS):
        assert ns.split(lonely, {here}, True, said.append) == (0.0, 5000.0)  # proven: the absent pid is others'
    ns.settle(said.append)
    assert not ns.foreign and said == []

    container = Namespace()
    for _ in range(FOREIGN_ROUNDS - 1):
        container.split(lonely, {here}, True, said.append)
    assert not container.foreign and said == []
    assert container.split(lonely, {here}, True, said.append) == (None, None) and container.foreign
    assert container.split(shared, {here}, True, said.append) == (None, None)  # decided once per run
    container.settle(said.append)
    assert len(said) == 1 and "another PID namespace" in said[0]

    short = Namespace()
    short.split(lonely, {here}, True, said.append)
    short.settle(said.append)  # sampling ended with foreign-looking readings and no proof
    assert short.foreign and len(said) == 2


def _layout(uuids: list[str]) -> str:
    return json.dumps({"gpus": [{"total_mib": 24576, "uuid": u} for u in uuids]})


def _stopped_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uuids: list[str], planned: tuple[int, ...]) -> Path:
    """A run stopped on GPUs ``planned`` of a machine whose GPUs have ``uuids``: its story and a checkpoint."""
    from yolosafe.planning.trainplan import build_plan
    from yolosafe.rundir import records

    run = tmp_path / "runs" / "detect" / "train"
    (run / "weights").mkdir(parents=True)
    with zipfile.ZipFile(run / "weights" / "last.pt", "w") as archive:
        archive.writestr("last/data.pkl", b"\x80\x02cultralytics.nn.tasks\nDetectionModel\n.")  # names the model
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


class _Releasing:
    """A backend whose GPU 0 lists pid 111 (a previous attempt's rank) for its first ``reads`` reads."""

    name = "releasing"

    def __init__(self, reads: int) -> None:
        self.left, self.calls = reads, 0

    def read_memory(self, index: int, mig: str | None = None) -> gpus.MemoryReading:
        self.calls += 1
        self.left -= 1
        held = (gpus.GPUProcess(111, 900.0),) if self.left >= 0 else ()
        return gpus.MemoryReading(index, 24576, 900.0 if held else 0.0, (*held, gpus.GPUProcess(4242, 10.0)))

    def close(self) -> None:
        pass


def test_a_relaunch_waits_bounded_until_the_previous_attempts_pids_left_the_gpus(tmp_path):
    from yolosafe.supervisor.watch import MemoryWatch, wait_released

    backend = _Releasing(reads=3)
    assert wait_released(backend, [0], {111, 112}, timeout=5, poll=0.01) == set() and backend.calls == 4
    assert wait_released(_Releasing(reads=10**6), [0], {111}, timeout=0.05, poll=0.01) == {111}
    said: list[str] = []
    watch = MemoryWatch(tmp_path, [0], 0.1, 0.9, lambda: _Releasing(reads=10**6), said.append)
    watch.attempt_pids, watch.namespace.ours = {111}, True  # NVML listed the run's own pids: wait on them
    watch.wait_released(timeout=0.05)
    assert said == ["the previous attempt's processes (pids 111) still hold GPU memory after 0.05 s; starting the "
                    "next attempt anyway"]


class _Container:
    """A container's GPU 0: NVML lists the previous attempt's rank by a host pid, which nothing here has, and its
    9000 MiB go away after ``reads`` reads; another tenant's 2000 MiB stay."""

    name = "container"

    def __init__(self, reads: int) -> None:
        self.left, self.calls = reads, 0

    def read_memory(self, index: int, mig: str | None = None) -> gpus.MemoryReading:
        self.calls += 1
        self.left -= 1
        rank = (gpus.GPUProcess(gpus.HOST_PID_OFFSET + 111, 9000.0),) if self.left >= 0 else ()
        return gpus.MemoryReading(index, 24576, 2000.0 + (9000.0 if rank else 0.0),
                                  (*rank, gpus.GPUProcess(gpus.HOST_PID_OFFSET + 4242, 2000.0)))

    def close(self) -> None:
        pass


def test_in_a_container_the_relaunch_waits_on_used_memory_not_on_pids(tmp_path):
    """NVML's pids never match the run's in a container: the relaunch waits until used memory is back at the
    attempt's floor (other processes' memory, the least the watch saw), bounded, one line if it stays up."""
    from yolosafe.supervisor.watch import MemoryWatch, wait_memory_released

    backend = _Container(reads=3)
    assert wait_memory_released(backend, {0: 2000.0}, timeout=5, poll=0.01) == {} and backend.calls == 4
    assert wait_memory_released(_Container(reads=10**6), {0: 2000.0}, timeout=0.05, poll=0.01) == {0: 9000.0}
    said: list[str] = []
    watch = MemoryWatch(tmp_path, [0], 0.1, 0.9, lambda: _Container(reads=10**6), said.append)
    watch.attempt_pids, watch.floors = {111}, {0: 2000.0}  # the ranks' own pids: never listed by NVML
    watch.wait_released(timeout=0.05)
    assert said == ["the GPUs still hold more than before the previous attempt after 0.05 s (GPU 0 8.8 GiB); "
                    "starting the next attempt anyway"]
    released = _Container(reads=2)
    watch = MemoryWatch(tmp_path, [0], 0.1, 0.9, lambda: released, said.append)
    watch.attempt_pids, watch.floors = {111}, {0: 2000.0}
    watch.wait_released(timeout=5)
    assert released.calls == 3 and len(said) == 1


def test_the_rank_environment_names_gpus_by_uuid_in_pci_order_always():
    from yolosafe.planning.trainplan import build_plan
    from yolosafe.supervisor.child import launch_device, training_env

    env = training_env({"CUDA_DEVICE_ORDER": "FASTEST_FIRST", "PATH": "/bin"}, {})
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # an inherited order would number other GPUs than NVML
    p = build_plan(model="m.yaml", data="d.yaml", gpus=(3, 1), batch=16)
    layout = {gpus.FAKE_ENV: "4x24GB"}
    assert launch_device(p, False, layout) == ("0,1", "GPU-fake-0003,GPU-fake-0001")
    scheduler = {**layout, "CUDA_VISIBLE_DEVICES": "GPU-fake-0001,GPU-fake-0003"}
    assert launch_device(p, False, scheduler) == ("0,1", "GPU-fake-0003,GPU-fake-0001")


def test_doctor_reads_uuids_like_train():
    from yolosafe.readers.doctor import diagnose

    env = {gpus.FAKE_ENV: "4x24GB", "CUDA_VISIBLE_DEVICES": "GPU-fake-0002,GPU-fake-0003"}
    found = diagnose(project="/nonexistent", env=env)
    assert found.environment.visible_gpus == [2, 3]
    assert not [c for c in found.verdict if "hides every GPU" in c.finding]


# Two fake GPUs whose ranks have NCCL's collectives under Ultralytics' TORCH_NCCL_BLOCKING_WAIT=1: the peer of a failed
# rank waits in its collective until torchrun's teardown SIGTERMs it, and writes no record of its own.
BLOCKING = json.dumps({"collectives": "blocking", "gpus": [{"total_mib": 24576} for _ in range(2)]})


@pytest.mark.slow
def test_under_blocking_collectives_a_rank_1_failure_is_rank_1s_oom_or_not(run_cli, tmp_path):
    """One training: rank 1 runs out of memory (attempt 1, retried at half the batch), then fails with cuDNN's bare
    internal error, no allocation code and no allocator's message: not an OOM (attempt 2, not retried). Rank 0
    waits in its collective each time until torchrun SIGTERMs it; each end is reported as rank 1's, with the advice
    of its kind, never "rank 0 was killed by SIGTERM"."""
    env = {"YOLOSAFE_FAKE_GPUS": BLOCKING,
           "YOLOSAFE_INJECT_OOM": "phase=train,epoch=0,rank=1,times=2,error=oom+cudnn-internal"}
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", *TINY, "--batch", "16", env=env)
    assert result.returncode != 0, result.stderr[-3000:]
    run = run_dir_of(tmp_path)
    s = story(run)
    assert [(a["outcome"], a["rank"]) for a in s["attempts"]] == [("oom", 1), ("failed", 1)], s["attempts"]
    assert [a["per_gpu_batch"] for a in s["attempts"]] == [8, 4]
    peers = [f for f in records.load_failures(run) if f.rank == 0]
    assert [(f.attempt, f.by, f.signal) for f in peers] == [(1, "launcher", "SIGTERM"), (2, "launcher", "SIGTERM")]
    own = {f.attempt: f for f in records.load_failures(run) if f.rank == 1}
    assert own[1].oom and own[2].error == "RuntimeError" and not own[2].oom
    assert own[2].message.startswith("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
    said = "\n".join(line for line in result.stderr.splitlines() if line.startswith("yolosafe"))
    assert "killed by SIGTERM" not in said and "rank 1" in said, said
    assert "CUDNN_STATUS_INTERNAL_ERROR" in said, said


def test_torchrun_stops_the_survivors_of_a_failed_rank_after_its_own_30_s_not_the_shutdown_timeout():
    """After a rank fails (no restarts left) torch's agent stops the others with ``_stop_workers`` →
    ``_shutdown()`` at its default SIGTERM-to-SIGKILL wait, 30 s; ``--shutdown-timeout`` (yolosafe's 5 s) is only
    passed when the launcher is signalled and at its exit. A NCCL peer that ignores SIGTERM lives 30 s more."""
    import inspect

    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    from yolosafe.supervisor import launchcmd

    assert inspect.signature(LocalElasticAgent._shutdown).parameters["timeout"].default == 30
    stop = " ".join(inspect.getsource(LocalElasticAgent._stop_workers).split())
    assert stop.endswith("self._shutdown()")
    invoke = " ".join(inspect.getsource(SimpleElasticAgent._invoke_run).split())
    assert "else: self._stop_workers(self._worker_group) self._worker_group.state = WorkerState.FAILED" in invoke
    run = " ".join(inspect.getsource(SimpleElasticAgent.run).split())
    assert run.count("timeout=self._shutdown_timeout") == 2 and "except SignalException" in run
    assert launchcmd.SHUTDOWN_TIMEOUT_S < 30
