"""Multi-node training rehearsed on one machine: two "nodes" are two ``yolosafe train`` processes in one project
(the shared storage), each with two fake GPUs (two real CPU ranks over gloo), joined by torchrun's static rendezvous
on 127.0.0.1. Unit tests for the pure parts: the batch over nodes, SLURM, the injection spec, the file names, the
agreement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import YOLOSAFE, alive, cli_env, story, wait_until
from yolosafe import oom
from yolosafe.planning import nodes
from yolosafe.planning import trainplan as plan
from yolosafe.readers import report
from yolosafe.rundir import files as rundir
from yolosafe.rundir.layout import RunDir
from yolosafe.rundir.records import Failure, load_failures, save_failure
from yolosafe.supervisor import launchcmd as launch
from yolosafe.supervisor import watch
from yolosafe.supervisor.multinode import agree, cluster

TWO = {"YOLOSAFE_FAKE_GPUS": "2x24GB"}
SLURM = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
DRILL = ["--gpus", "0,1", "--imgsz", "64", "--batch", "16", "--effective-batch", "32", "workers=0", "plots=False",
         "--name", "two", "--rdzv-timeout", "60"]


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- the plan over nodes --------------------------------------------------------------------------------------------


def test_batch_is_the_total_over_every_gpu_of_every_node():
    p = plan.build_plan(model="yolov8n.yaml", data="d.yaml", gpus=(0, 1), batch=16, effective_batch=32, nnodes=2)
    assert (p.world_size, p.local_world_size, p.per_gpu_batch, p.accumulate) == (4, 2, 4, 2)
    assert p.train_kwargs()["batch"] == 16  # Ultralytics divides by WORLD_SIZE (4) in every rank
    halved = p.halved()
    assert (halved.batch, halved.per_gpu_batch, halved.accumulate, halved.effective_batch) == (8, 2, 4, 32)
    with pytest.raises(plan.PlanError, match="not split evenly over 2 nodes x 2 GPUs; use a multiple of 4: 4 or 8"):
        plan.build_plan(model="m.yaml", data="d.yaml", gpus=(0, 1), batch=6, nnodes=2)
    assert nodes.Nodes(2, 1, "h:1").world_size(2) == 4 and nodes.Nodes(2, 1, "h:1").first_rank(2) == 2


def test_each_attempt_has_its_own_port_and_the_run_its_own_name():
    where = nodes.resolve(2, 1, "node0:29500", "job7", {})
    assert [nodes.for_attempt(where, n).endpoint for n in (1, 2, 16, 17)] == [
        "node0:29500", "node0:29501", "node0:29515", "node0:29500"]
    assert nodes.run_name("train", False, where) == "train-job7" and nodes.run_name("x", True, where) == "x"
    with pytest.raises(nodes.NodesError, match="give --name or --rdzv-id"):
        nodes.run_name("train", False, nodes.resolve(2, 1, "node0:29500", None, {}))
    with pytest.raises(nodes.NodesError, match="below 65520"):
        nodes.resolve(2, 0, "node0:65530", None, {})


def test_injection_names_a_node_and_its_local_rank_or_a_global_rank():
    on_node = oom.parse_injection("phase=train,epoch=1,node=1,rank=0")
    assert on_node.matches("train", 1, 0, 2, (1, 0)) and not on_node.matches("train", 1, 0, 0, (0, 0))
    assert oom.parse_injection("rank=2").matches("train", 0, 0, 2, (1, 0))
    oom.check_injection("node=1,rank=1", 4, 2)
    with pytest.raises(ValueError, match="node=2 does not exist: this run has nodes 0-1"):
        oom.check_injection("node=2", 4, 2)
    with pytest.raises(ValueError, match="rank=2 does not exist: this run has ranks 0-1 on each node"):
        oom.check_injection("node=1,rank=2", 4, 2)
    with pytest.raises(ValueError, match="rank=4 does not exist: this run has ranks 0-3"):
        oom.check_injection("rank=4", 4, 2)


def test_each_node_writes_files_of_its_own(tmp_path):
    assert [rundir.node_file(n, 1) for n in (rundir.STORY, rundir.LOG, rundir.EVENTS, rundir.MEMORY_CSV, rundir.LOCK)] \
        == ["yolosafe-node1.json", "train-node1.log", "events-node1.jsonl", "memory-node1.csv", ".lock-node1"]
    assert rundir.node_file(rundir.LOG, 0) == rundir.LOG
    assert rundir.spec_path(tmp_path, 3, 2).name == "spec-3-node2.json"
    assert rundir.ranks_log_dir(tmp_path, 3, 1) == tmp_path / "ranks" / "node1" / "attempt-3"
    assert rundir.ranks_log_dir(tmp_path, 3) == tmp_path / "ranks" / "attempt-3"
    for node in (0, 2, 1):
        (tmp_path / rundir.node_file(rundir.STORY, node)).write_text("{}")
    assert rundir.node_ranks(tmp_path) == [0, 1, 2]
    rundir.lock(tmp_path, 1)  # one supervisor per node: node 1's lock leaves node 0's free
    assert rundir.holder(tmp_path, 1) == str(os.getpid()) and rundir.holder(tmp_path, 0) is None


# --- the agreement ----------------------------------------------------------------------------------------------------


def end(node: int, code: int = 0, records: tuple[dict, ...] = (), **fields) -> dict:
    return {"node": node, "exit_code": code, "records": list(records), "log_tail": "", "gpus": [0, 1], **fields}


GLOO = {"oom": False, "error": "RuntimeError", "message": "Connection closed by peer", "phase": "train", "epoch": 1}


def record(**fields):
    """A failure record as a node's end record carries it: written by the production type."""
    return Failure.new(**fields).to_dict()


def test_every_node_derives_the_same_outcome_from_the_end_records():
    oom_record = record(oom=True, phase="train", epoch=1, rank=2, gpu=0, t=5.0, message="CUDA out of")
    ends = [end(0, 1, (record(**GLOO, rank=0, t=6.0), record(**GLOO, rank=1, t=6.0))),
            end(1, 1, (oom_record, record(signal="SIGTERM", rank=3, t=5.0)))]
    failure = agree.decide(ends, 2)
    assert (failure.outcome, failure.phase, failure.epoch, failure.rank, failure.node, failure.gpu) == (
        "oom", "train", 1, 2, 1, 0)
    assert agree.decide(list(reversed(ends)), 2).rank == 2  # the records decide, not which node reads them
    assert agree.decide([end(0), end(1)], 2).outcome == "completed"
    stopped = agree.decide([end(0, 143, stopped_for="node 1 ..."), end(1, 1, (record(**GLOO, rank=2),))], 2)
    assert (stopped.outcome, stopped.rank, stopped.node) == ("failed", 2, 1)
    assert agree.decide([end(0, 1), end(1, 130, interrupted="SIGINT")], 2).message == "SIGINT on node 1"
    gone = agree.decide([end(0, 1), {"node": 1, "gone": "node 1 stopped reporting (30 s without a heartbeat)"}], 2)
    assert gone.outcome == "failed" and gone.message.startswith("node 1 stopped reporting")
    ended = {"node": 1, "gone": "node 1's yolosafe ended (interrupted)", "stopped": "SIGINT on node 1"}
    assert (agree.decide([end(0, 1), ended], 2).outcome, agree.decide([end(0, 1), ended], 2).message) == (
        "interrupted", "SIGINT on node 1")


def test_a_node_stops_its_own_ranks_when_another_nodes_attempt_failed(tmp_path, monkeypatch):
    """Where the surviving ranks would hang (NCCL after a peer died), their supervisor stops them after the grace;
    a peer that finished well stops nothing."""
    from yolosafe.proc import ProcessTree

    monkeypatch.setattr(agree, "PEER_GRACE_S", 0.5)
    said: list[str] = []
    multi = agree.MultiNode(RunDir(tmp_path), nodes.Nodes(2, 0, "127.0.0.1:29500"), (0, 1), said.append, "s")
    ranks = subprocess.Popen(["sleep", "60"])
    try:
        rundir.write_json(rundir.node_end_path(tmp_path, 1, 1), {"node": 1, "exit_code": 0})
        assert multi._peer_problem(1, multi.peers()) is None  # node 1 finished well: nothing to stop
        rundir.write_json(rundir.node_end_path(tmp_path, 2, 1), {"node": 1, "exit_code": 1})
        started = time.monotonic()
        multi.watch(2, None)(ProcessTree(ranks.pid).start())
        assert ranks.wait(timeout=10) == -signal.SIGTERM and time.monotonic() - started >= 0.5
        assert multi.stopped_for == "node 1's attempt 2 ended (exit status 1)"
        assert said[-1] == "node 1's attempt 2 ended (exit status 1): stopping this node's ranks"
    finally:
        ranks.kill()
        multi.beat.stop(state="done")


@pytest.mark.slow  # Ultralytics in a child process, seconds a case
def test_a_node_that_never_sees_node_0s_marker_is_not_on_shared_storage(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "HEARTBEAT_S", 0.1)
    where = nodes.Nodes(2, 1, "127.0.0.1:29500", None, "flags", timeout=1)
    said = []
    started = time.monotonic()
    with pytest.raises(cluster.ClusterError, match="storage every node shares"):
        cluster.join(RunDir(tmp_path / "run", 1), where, {"batch": 16, "gpus": [0, 1]}, 1, said.append)
    assert time.monotonic() - started < 3 and "waiting for node 0's run directory" in said[0]
    run = tmp_path / "run"
    cluster.create(RunDir(run), nodes.Nodes(2, 0, "127.0.0.1:29500", None, "flags"), {"batch": 16, "gpus": [0, 1]})
    with pytest.raises(cluster.ClusterError, match="no run directory from node 0"):  # a marker, but nobody alive
        cluster.join(RunDir(run, 1), where, {"batch": 16, "gpus": [0, 1]}, 1, said.append)
    beat = cluster.Heartbeat(RunDir(run.resolve(), 0), {"session": "earlier"})
    beat.start(state="joined")  # a heartbeat, but of another session than the marker's
    with pytest.raises(cluster.ClusterError, match="no run directory from node 0"):
        cluster.join(RunDir(run, 1), where, {"batch": 16, "gpus": [0, 1]}, 1, said.append)
    beat.stop(state="done")
    beat = cluster.Heartbeat(RunDir(run.resolve(), 0), {"session": cluster.read(run / rundir.NODES_MARKER)["session"]})
    beat.start(state="joined")  # node 0 alive: its heartbeat moves
    where = nodes.Nodes(2, 1, "127.0.0.1:29500", None, "flags", timeout=10)
    with pytest.raises(cluster.ClusterError, match=r"plan differs from node 0's: batch 32 \(node 0: 16\)"):
        cluster.join(RunDir(run, 1), where, {"batch": 32, "gpus": [0, 1]}, 1, said.append)
    with pytest.raises(cluster.ClusterError, match="node 0 goes on with attempt 1, node 1 with attempt 3"):
        cluster.join(RunDir(run, 1), where, {"batch": 16, "gpus": [0, 1]}, 3, said.append)
    joined = cluster.join(RunDir(run, 1), where, {"batch": 16, "gpus": [0, 1]}, 1, said.append)
    assert joined == RunDir(run.resolve(), 1)
    beat.stop(state="done")
    with pytest.raises(cluster.ClusterError, match="belongs to another multi-node run"):
        cluster.join(RunDir(run, 1), nodes.Nodes(2, 1, "10.0.0.1:29500", None, "flags", timeout=1), {}, 1, said.append)
    with pytest.raises(cluster.ClusterError, match="exists: a multi-node run starts in a new directory"):
        cluster.create(RunDir(run), nodes.Nodes(2, 0, "127.0.0.1:29500"), {})


def test_report_merges_every_node_each_with_its_own_gpus(tmp_path):
    """Node 0 on GPUs 0,1 and node 1 on GPUs 2,3 of its machine; node 1's rank 3 peaks in validation and dies of an
    OOM there: both land on node 1's GPU 3, nothing on node 0's GPUs."""
    t0 = 1_700_000_000.0
    for node, gpus in ((0, [0, 1]), (1, [2, 3])):
        rundir.write_json(tmp_path / rundir.node_file(rundir.STORY, node), {"plan": {"gpus": gpus, "nnodes": 2}})
        for rank in (2 * node, 2 * node + 1):
            for t, name, phase in ((1, "train_start", "train"), (5, "train_end", "train"), (6, "val_start", "val")):
                rundir.append_jsonl(tmp_path / rundir.node_file(rundir.EVENTS, node), {
                    "t": t0 + t, "event": name, "phase": phase, "epoch": 0, "rank": rank, "gpu": rank % 2,
                    "attempt": 1})
        with open(tmp_path / rundir.node_file(rundir.MEMORY_CSV, node), "w") as fh:
            fh.write(",".join(watch.COLUMNS) + "\n")
            for second in range(10):
                for i, gpu in enumerate(gpus):
                    used = 20000 if (node, i, second >= 6) == (1, 1, True) else 5000
                    fh.write(f"{t0 + second},1,{gpu},24576,{used},{used},0,,\n")
    save_failure(tmp_path, Failure.new(t=t0 + 8, oom=True, attempt=1, phase="val", epoch=0, rank=3, gpu=1))
    summary = report.write(tmp_path)
    node1 = summary["nodes"]["1"]
    assert set(summary["gpus"]) == {"0", "1"} and set(node1["gpus"]) == {"2", "3"}
    assert node1["gpus"]["3"]["phases"]["val"]["peak_used_mib"] == 20000
    assert summary["gpus"]["1"]["peak_used_mib"] == 5000 and summary["ooms"] == []
    assert [(o["rank"], o["gpu"]) for o in node1["ooms"]] == [(3, 3)]
    lines = report.table(summary)
    assert lines[0] == "node 0:" and "node 1:" in lines and "19.5 GiB 81% e1" in lines[-1]
    assert (tmp_path / rundir.node_file(rundir.MEMORY_PLOT, 1)).is_file()
    assert json.loads((tmp_path / rundir.MEMORY_SUMMARY).read_text()) == summary
    assert report.write(RunDir(tmp_path, 1)) == json.loads(
        (tmp_path / rundir.node_file(rundir.MEMORY_SUMMARY, 1)).read_text())


# --- the command line -------------------------------------------------------------------------------------------------


def test_dry_run_of_node_1_under_slurm(run_cli, tmp_path):
    result = run_cli("train", "--gpus", "0,1", "--batch", "16", "--dry-run", env={**TWO, **SLURM})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("2 nodes x 2 GPUs = 4 ranks; this is node 1 (global ranks 2-3); rendezvous gpu07:32956",
                 "16 total = 4 per GPU", "runs/detect/train-123456 (not created",
                 "-m yolosafe.training.launcher --nproc-per-node 2 --nnodes 2 --node-rank 1 --rdzv-backend static "
                 "--rdzv-endpoint gpu07:32956 --rdzv-id 123456 --rdzv-conf timeout=300",
                 "runs/detect/train-123456/ranks/node1/attempt-1", "runs/detect/train-123456/spec-1-node1.json"):
        assert text in out, out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--batch", "auto"], ["--batch auto with 2 nodes"]),
        (["--gpus", "cpu", "--name", "x"], ["trains on GPUs", "YOLOSAFE_FAKE_GPUS"]),
        ([], ["give --name or --rdzv-id"]),
        (["--batch", "6", "--name", "x", "--gpus", "0,1"], ["over 2 nodes x 2 GPUs"]),
        (["--name", "x", "--rdzv-timeout", "0"], ["--rdzv-timeout 0"]),
    ],
)
def test_multi_node_usage_errors_are_one_line(run_cli, tmp_path, args, words):
    base = ["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:29500"]
    one_line_error(run_cli("train", *base, *args, env=TWO), *words)
    assert not (tmp_path / "runs").exists()


def test_node_1_without_node_0s_run_directory_ends_in_one_line(run_cli, tmp_path):
    result = run_cli("train", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:29500", "--name",
                     "alone", "--rdzv-timeout", "1", "--gpus", "0,1", env=TWO)
    assert result.returncode == 2 and "storage every node shares" in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("yolosafe: error: node 1: no run directory from node 0")
    assert not (tmp_path / "runs" / "detect" / "alone").exists()


# --- drills: two nodes, two CPU ranks each ----------------------------------------------------------------------------


@pytest.fixture
def two_nodes(tmp_path: Path, shared_cache: Path):
    """``start(*args, env=...)``: both nodes of one run, each in its own session (as on two machines)."""
    started: list[subprocess.Popen[str]] = []
    port = launch.free_port()

    def start(*args: str, env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
        for node in (0, 1):
            argv = [YOLOSAFE, "train", *args, "--nnodes", "2", "--node-rank", str(node), "--rdzv-endpoint",
                    f"127.0.0.1:{port}"]
            started.append(subprocess.Popen(argv, cwd=tmp_path, env=cli_env(shared_cache, {**TWO, **(env or {})}),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                            start_new_session=True))
        return started[-2:]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()


def train_starts(run: Path, attempt: int) -> dict[int, tuple[int, int, int]]:
    """``{rank: (batch, epoch, pid)}`` from every node's own events file."""
    found = {}
    for name in (rundir.EVENTS, rundir.node_file(rundir.EVENTS, 1)):
        path = run / name
        for line in path.read_text().splitlines() if path.is_file() else []:
            e = json.loads(line)
            if e["attempt"] == attempt and e["event"] == "train_start":
                found[e["rank"]] = (e["batch"], e["epoch"], e["pid"])
    return found


DECIDED = ("outcome", "phase", "epoch", "rank", "node", "next", "batch", "per_gpu_batch", "nbs", "accumulate",
           "resumed_from")


@pytest.mark.slow
def test_oom_on_node_1_relaunches_both_nodes_with_half_the_batch(two_nodes, run_cli, tmp_path):
    started = time.monotonic()
    procs = two_nodes(*DRILL, "--epochs", "2", env={"YOLOSAFE_INJECT_OOM": "phase=train,epoch=1,node=1,rank=0"})
    errs = [p.communicate(timeout=300)[1] for p in procs]
    wall = time.monotonic() - started
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    run = tmp_path / "runs" / "detect" / "two"
    for err in errs:
        assert "OOM in train at epoch 2/2 on node 1, rank 2, GPU 0 (batch 4/GPU" in err, err[-2000:]
        assert "retry 1/3: batch 16 -> 8 (4 -> 2 per GPU), accumulate 2 -> 4, effective batch 32" in err
    mine, theirs = story(run), json.loads((run / rundir.node_file(rundir.STORY, 1)).read_text())
    assert [a["outcome"] for a in mine["attempts"]] == ["oom", "completed"] and mine["outcome"] == "completed"
    for a, b in zip(mine["attempts"], theirs["attempts"], strict=True):  # every node decided the same
        assert {k: a.get(k) for k in DECIDED} == {k: b.get(k) for k in DECIDED}
    first, second = mine["attempts"]
    assert (first["rank"], first["node"], second["per_gpu_batch"], second["nbs"]) == (2, 1, 2, 32)
    assert second["resumed_from"].endswith("last-before-attempt2.pt") and second["resumed_from_epoch"] == 0
    # every rank's own events: four processes on two nodes, all with half the per-GPU batch from epoch 2 on
    assert {r: b for r, (b, _, _) in train_starts(run, 1).items()} == {0: 4, 1: 4, 2: 4, 3: 4}
    ran = train_starts(run, 2)
    assert {r: (b, e) for r, (b, e, _) in ran.items()} == {r: (2, 1) for r in range(4)}
    assert len({pid for _, _, pid in ran.values()}) == 4
    on_node_1 = [json.loads(line) for line in (run / rundir.node_file(rundir.EVENTS, 1)).read_text().splitlines()]
    assert {(e["rank"], e["gpu"]) for e in on_node_1} == {(2, 0), (3, 1)}  # torchrun's global RANK, its LOCAL_RANK
    failures = {r.rank: r for r in load_failures(run, 1)}
    assert failures[2].oom and not any(failures[r].oom for r in failures if r != 2)
    assert (run / rundir.INJECTED).read_text() == "1"
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert int(float(rows[-1].split(",")[0])) == 2 and "memory/node1_gpu1_val_reserved_mib" in rows[0]
    report = run_cli("report", str(run))
    assert report.returncode == 0 and "node 0:" in report.stdout and "node 1:" in report.stdout, report.stdout
    assert set(json.loads((run / rundir.MEMORY_SUMMARY).read_text())["nodes"]) == {"1"}
    print(f"two-node drill: {wall:.1f} s")


@pytest.mark.slow
def test_ctrl_c_on_one_node_ends_both_and_both_resume(two_nodes, tmp_path):
    one_gpu_each = ["--gpus", "0", "--imgsz", "64", "--batch", "8", "--effective-batch", "16", "workers=0",
                    "plots=False", "--name", "two", "--rdzv-timeout", "60"]  # one rank per node is enough here
    procs = two_nodes(*one_gpu_each, "--epochs", "2")
    run = tmp_path / "runs" / "detect" / "two"
    def in_epoch_2() -> bool:  # every rank started epoch 2: epoch 1's checkpoint is there to resume from
        ran = train_starts(run, 1)
        return len(ran) == 2 and {e for _, e, _ in ran.values()} == {1} and (run / "weights" / "last.pt").is_file()

    wait_until(in_epoch_2, procs[1], "epoch 2 on every rank", timeout=240)
    pids = {c.pid for p in procs for c in psutil.Process(p.pid).children(recursive=True)} | {p.pid for p in procs}
    stopped = time.monotonic()
    os.kill(procs[1].pid, signal.SIGINT)  # Ctrl-C on node 1
    errs = [p.communicate(timeout=60)[1] for p in procs]
    while alive(pids):
        assert time.monotonic() < stopped + 30, f"alive 30 s after Ctrl-C: {alive(pids)}"
        time.sleep(0.1)
    gone = time.monotonic() - stopped
    assert [p.returncode for p in procs] == [130, 130], errs
    assert "stopped by SIGINT on node 1; resume with: yolosafe train --resume" in errs[0], errs[0][-2000:]
    assert "stopped by SIGINT; resume with: yolosafe train --resume" in errs[1] and "--node-rank 1" in errs[1]
    for node in (0, 1):
        assert json.loads((run / rundir.node_file(rundir.STORY, node)).read_text())["outcome"] == "interrupted"
    print(f"Ctrl-C to all processes gone: {gone:.1f} s")

    procs = two_nodes("--resume", str(run), "--rdzv-timeout", "60")  # what the hint says, on both nodes
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    for node in (0, 1):
        attempts = json.loads((run / rundir.node_file(rundir.STORY, node)).read_text())["attempts"]
        assert [a["outcome"] for a in attempts] == ["interrupted", "completed"]
        assert attempts[1]["resumed_from_epoch"] == 0
    assert {r: e for r, (_, e, _) in train_starts(run, 2).items()} == {r: 1 for r in range(2)}
