"""Step checkpoints inside the epoch and the resume from that iteration.

The arithmetic over the real samplers (torch's DistributedSampler and BatchSampler, Ultralytics' loader), then
drills with the real trainer: a training OOM injected in the middle of epoch 2 (of 3), with a step checkpoint every
3 iterations, on a training set of 21 images (odd: uneven shards over 2 ranks), over 2 CPU ranks; a SIGTERM
mid-epoch (a preemption) then --resume, in one process. The relaunch must train only the rest of that epoch: from
the ranks' own events, each sample of the epoch is trained once over both attempts, per rank; results.csv has each
epoch once.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import tinysets
from tests.conftest import YOLOSAFE, cli_env, story, wait_until
from yolosafe.planning import saveevery
from yolosafe.training import stepckpt

TRAIN_IMAGES = 21  # odd: 2 ranks get uneven shards (DistributedSampler pads one index)
DRILL = ["--epochs", "3", "--imgsz", "64", "--batch", "4", "--effective-batch", "8", "--save-every", "3it",
         "workers=0", "plots=False", "--model", "yolov8n.yaml"]


@pytest.mark.parametrize(("word", "expected"), [
    ("10m", saveevery.SaveEvery(seconds=600.0)), ("90s", saveevery.SaveEvery(seconds=90.0)),
    ("500it", saveevery.SaveEvery(iterations=500)), ("0", saveevery.SaveEvery()),
    ("auto", saveevery.SaveEvery(auto=True)),
    (None, saveevery.SaveEvery(auto=True)), ("1.5h", saveevery.SaveEvery(seconds=5400.0)),
])
def test_save_every_words(word, expected):
    assert saveevery.parse(word) == expected


@pytest.mark.parametrize("word", ["10", "it", "-3it", "2.5it", "0it5", "ten minutes"])
def test_save_every_refuses_other_words(word):
    with pytest.raises(saveevery.SaveEveryError):
        saveevery.parse(word)


def test_auto_keeps_the_cost_under_one_percent():
    auto = saveevery.parse("auto")
    assert auto.interval_s(None) == saveevery.AUTO_FLOOR_S
    for save_s in (0.1, 3.0, 12.0, 60.0):
        assert save_s / auto.interval_s(save_s) < 0.01


@given(trained=st.floats(0, 1e6), save=st.one_of(st.none(), st.floats(0, 1e4)),
       word=st.sampled_from(["auto", "10m", "500it", "0", "1h"]))
def test_the_trained_state_before_validation_is_kept_where_it_is_worth_its_save(trained, save, word):
    """auto: kept while no save is timed, then only where the save costs at most AUTO_SHARE of the training since
    the newest checkpoint (what it would spare a relaunch); an interval the user chose, or 0: before every
    validation."""
    every = saveevery.parse(word)
    kept = every.keeps_unvalidated(trained, save)
    if word != "auto":
        assert kept
    else:
        assert kept == (save is None or save <= saveevery.AUTO_SHARE * trained)
        if save is not None and kept:  # what the save costs, against the training it keeps
            assert save <= 0.005 * trained


def test_bad_save_every_is_one_line_before_any_run(run_cli, tmp_path):
    result = run_cli("train", "--save-every", "often", "--epochs", "1")
    assert result.returncode == 2 and "--save-every 'often'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def _loader(images: int, batch: int, sampler) -> tuple:
    """Ultralytics' own train loader (build_dataloader: InfiniteDataLoader over _RepeatSampler over BatchSampler)
    with ``sampler`` as its train sampler, recorded the way a rank's trainer records it."""
    from ultralytics.data import build

    loader = build.build_dataloader(list(range(images)), batch, 0, shuffle=True, rank=-1, device="cpu")
    recording = stepckpt.RecordingSampler(sampler)
    loader.batch_sampler.sampler.sampler = recording  # where StepCheckpoints._install_recording puts it
    return loader, recording


@settings(max_examples=120, deadline=None)
@given(images=st.integers(2, 60), world=st.integers(1, 4), batch=st.integers(1, 9), halve=st.booleans(),
       epoch=st.integers(0, 5), data=st.data())
def test_skip_over_the_real_samplers_and_loader(images, world, batch, halve, epoch, data):
    """Each rank's epoch (torch's DistributedSampler, Ultralytics' loader), cut after the iterations done and drawn
    again at the new batch through the skipping loader: the epoch keeps the loader's length, each sample of the
    rank's order is trained once, the skipped iterations load nothing, and the next epoch is the sampler's own."""
    from torch.utils.data import DistributedSampler

    new_batch = max(batch // 2, 1) if halve else batch
    for rank in range(world):
        sampler = DistributedSampler(range(images), num_replicas=world, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(epoch)
        first, recorded = _loader(images, batch, sampler)
        nb = len(first)
        done = data.draw(st.integers(1, nb - 1)) if nb > 1 else 0
        batches = iter(first)
        trained = [int(i) for _ in range(done) for i in next(batches)]  # attempt 1, up to its step checkpoint
        order = recorded.draws[-1] if recorded.draws else list(sampler)  # nothing drawn yet: the epoch's order
        assert trained == order[:len(trained)]
        again, recording = _loader(images, new_batch, sampler)  # attempt 2, at its batch
        recording.given = order[len(trained):]
        skip = stepckpt.skipped_iterations(len(order), len(trained), again.batch_size)
        sentinel = stepckpt.Skipped()
        epoch_batches = list(stepckpt.SkippingLoader(again, skip, sentinel, lambda: None))
        assert len(epoch_batches) == len(again) and epoch_batches[:skip] == [sentinel] * skip
        trained += [int(i) for b in epoch_batches[skip:] for i in b]
        assert trained == order  # each sample of the rank's epoch once, in the sampler's order
        sampler.set_epoch(epoch + 1)
        expected = list(sampler)
        assert [int(i) for _ in range(len(again)) for i in next(again.iterator)] == expected  # the next epoch


@settings(max_examples=60, deadline=None)
@given(shard=st.integers(1, 400), batch=st.integers(1, 16), new_batch=st.integers(1, 16), data=st.data())
def test_the_supervisors_words_count_as_the_ranks_skip(tmp_path_factory, shard, batch, new_batch, data):
    """The supervisor (no torch) says where the next attempt continues with the arithmetic the ranks skip by, and
    ``of`` is the length of the real BatchSampler of the rank's shard at the new batch."""
    from torch.utils.data import BatchSampler

    from yolosafe.rundir import steps

    of = math.ceil(shard / batch)
    done = data.draw(st.integers(1, of - 1)) if of > 1 else 0
    done_samples = min(done * batch, shard)
    step = _saved_run(tmp_path_factory.mktemp("w"), iteration=done, of=of, world=2, shard=shard,
                      done_samples=done_samples)
    point = steps.resume_point(step.parent.parent, step, 2, new_batch)
    assert point["of"] == len(BatchSampler(range(shard), new_batch, drop_last=False))
    assert point["iteration"] == stepckpt.skipped_iterations(shard, done_samples, new_batch)


def test_rescaled_accumulation_state():
    assert stepckpt._rescale(40, 3, 12, 12, 5, 5) == 40  # the same batch: the same iteration
    # batch halved: 12 -> 24 iterations per epoch; 2 iterations since the last step at 12 are 4 at 24
    assert stepckpt._rescale(38, 3, 12, 24, 10, 5) == 3 * 24 + 10 - 1 - 4


def _saved_run(tmp_path: Path, **saved) -> Path:
    from yolosafe.rundir import files

    (tmp_path / "weights").mkdir()
    step = tmp_path / "weights" / files.STEP
    step.write_bytes(b"")
    files.append_jsonl(tmp_path / "events.jsonl", {"event": "step_saved", "rank": 0, "attempt": 1, "t": 1.0,
                                                   "epoch": 6, **saved})
    return step


def test_where_a_resume_continues_in_the_next_attempts_iterations(tmp_path):
    """A save at 812 of 1849 iterations at batch 8 (14789 samples per rank, 6496 done): at batch 8 the same
    place, at batch 4 the same samples done; on another number of ranks, the epoch restarts, said in one line."""
    from yolosafe.rundir import steps

    step = _saved_run(tmp_path, iteration=812, of=1849, world=4, shard=14789, done_samples=812 * 8)
    same = steps.resume_point(tmp_path, step, 4, 8)
    assert steps.words(same) == "from epoch 7, iteration 813 of 1849"
    halved = steps.resume_point(tmp_path, step, 4, 4)
    assert (halved["iteration"], halved["of"]) == (3698 - math.ceil((14789 - 6496) / 4), 3698)
    assert steps.words(steps.resume_point(tmp_path, step)) == "from epoch 7, iteration 813 of 1849"
    other = steps.words(steps.resume_point(tmp_path, step, 2, 8), 2)
    assert "\n" not in other and "saved by 4 ranks at iteration 812 of 1849" in other
    assert "epoch 7 restarts from its first iteration" in other
    assert steps.resume_point(tmp_path, tmp_path / "weights" / "last.pt", 4, 8) is None


# --- drills with the real trainer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("odd")
    tinysets.split(root / "images" / "train", root / "labels" / "train", TRAIN_IMAGES, "detect", 3)
    tinysets.split(root / "images" / "val", root / "labels" / "val", 4, "detect", 4)
    return tinysets.data_yaml(root / "data.yaml", {"path": str(root), "train": "images/train", "val": "images/val",
                                                  "nc": 1, "names": {0: "thing"}}, "detect")


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def wait_for_the_step_checkpoint_of_epoch_2(run: Path, proc) -> None:
    def saved() -> bool:
        return (run / "events.jsonl").is_file() and any(
            e["event"] == "step_saved" and e["epoch"] == 1 for e in _events(run))

    wait_until(saved, proc, "the step checkpoint of epoch 2", 300)


def trained(run: Path, epoch: int) -> dict[int, dict[int, list[int]]]:
    """``{rank: {attempt: [sample indices trained in epoch, in order]}}``, from the ranks' own events."""
    found: dict[int, dict[int, list[int]]] = {}
    for e in _events(run):
        if e["event"] == "batch_trained" and e["epoch"] == epoch:
            found.setdefault(e["rank"], {}).setdefault(e["attempt"], []).extend(e["samples"])
    return found


def epochs_in_results(run: Path) -> list[int]:
    with (run / "results.csv").open() as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f, skipinitialspace=True)]


def assert_whole_epoch_losses(run: Path, resumed: dict) -> None:
    """results.csv's train losses of the resumed epoch are the running mean of the whole epoch (rank 0's, as
    Ultralytics logs them): the saved iterations stand for the ``skip`` iterations of the new batch, each at their
    mean, then each iteration trained after the resume (from the ranks' own events, each batch's loss items)."""
    batches = [e for e in _events(run) if e["event"] == "batch_trained" and e["epoch"] == resumed["epoch"]
               and e["rank"] in (-1, 0)]
    before = [e["losses"] for e in batches if e["attempt"] == resumed["attempt"] - 1]
    after = [e["losses"] for e in batches if e["attempt"] == resumed["attempt"]]
    skip, nb = resumed["iteration"], resumed["of"]
    assert skip + len(after) == nb
    with (run / "results.csv").open() as f:
        rows = csv.DictReader(f, skipinitialspace=True)
        row = next(r for r in rows if int(float(r["epoch"])) == resumed["epoch"] + 1)
    for name in before[0]:
        mean = sum(b[name] for b in before) / len(before)
        expected = (mean * skip + sum(a[name] for a in after)) / nb
        assert float(row[f"train/{name}"]) == pytest.approx(expected, abs=2e-5), name


def assert_only_the_rest(run: Path, ranks: int, shard: int) -> dict[int, dict[int, list[int]]]:
    epoch2 = trained(run, 1)
    assert sorted(epoch2) == ([-1] if ranks == 1 else list(range(ranks)))
    for rank, attempts in epoch2.items():
        assert sorted(attempts) == [1, 2], attempts
        both = attempts[1] + attempts[2]
        assert len(both) == shard and max(Counter(both).values()) == 1, (rank, attempts)  # each sample once
    covered = {i for attempts in epoch2.values() for samples in attempts.values() for i in samples}
    assert covered == set(range(TRAIN_IMAGES))
    resumed = [e for e in _events(run) if e["event"] == "step_resume"]
    assert [(e["attempt"], e["epoch"], e["saved_iteration"], e["iteration"], e["of"]) for e in resumed] == [
        (2, 1, 3, 6, 11)]
    assert epochs_in_results(run) == [1, 2, 3]  # each epoch once
    assert_whole_epoch_losses(run, resumed[0])
    s = story(run)
    assert s["outcome"] == "completed"
    # the relaunch at half the batch: the 3 of 6 iterations saved are 6 of 11 (the rank's own step_resume says so)
    assert s["attempts"][1]["resumed_at"] == {"epoch": 1, "iteration": 6, "of": 11,
                                              "saved": {"iteration": 3, "of": 6, "world": ranks}}
    redone = s["attempts"][1]["redone"]
    assert redone["epoch"] == 1 and redone["iterations"] == 0  # the OOM hit the iteration right after the save
    assert not (run / "weights" / "step.pt").exists()  # removed once the epoch's last.pt was written
    return epoch2


@pytest.mark.slow
def test_oom_mid_epoch_relaunch_trains_only_the_rest_two_ranks(run_cli, tmp_path, odd_data):
    env = {"YOLOSAFE_FAKE_GPUS": "2x24GB", "YOLOSAFE_INJECT_OOM": "phase=train,epoch=1,iteration=3,rank=1",
           stepckpt.RECORD_SAMPLES_ENV: "1"}
    result = run_cli("train", "--data", str(odd_data), "--gpus", "0,1", *DRILL, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "detect" / "train"
    assert "step.pt from epoch 2, iteration 7 of 11" in result.stderr  # the relaunch line: where it continues
    epoch2 = assert_only_the_rest(run, 2, math.ceil(TRAIN_IMAGES / 2))
    assert all(len(a[1]) == 3 * 2 for a in epoch2.values())  # 3 iterations at 2 per rank before the OOM


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_a_step_checkpoint_and_resume_continues_there(tmp_path, shared_cache, odd_data):
    """A preemption: SIGTERM in the middle of epoch 2 (right after its step checkpoint at iteration 3). The rank
    writes a step checkpoint at its next step boundary, the run stops resumable; the same command again (a requeued
    job: ``--resume auto --name job``) continues from that iteration, said in its terminal line; each sample of the
    epoch trained once over both attempts, nothing redone."""
    import subprocess

    env = cli_env(shared_cache, {stepckpt.RECORD_SAMPLES_ENV: "1"})
    job = [YOLOSAFE, "train", "--resume", "auto", "--name", "job", "--data", str(odd_data), *DRILL]  # a job's line
    proc = subprocess.Popen(job, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run = tmp_path / "runs" / "detect" / "job"

    wait_for_the_step_checkpoint_of_epoch_2(run, proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "stopped by SIGTERM" in err, err[-2000:]
    preempted = [e for e in _events(run) if e["event"] == "step_saved" and e.get("preempted")]
    assert len(preempted) == 1 and (run / "weights" / "step.pt").is_file(), err[-2000:]
    assert not (run / ".preempt").exists()
    epoch, at = preempted[0]["epoch"], preempted[0]["iteration"]
    resumed = subprocess.run(job, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # requeued
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step.pt from epoch {epoch + 1}, iteration {at + 1} of 6" in resumed.stderr
    attempts = trained(run, epoch)[-1]
    assert sorted(attempts) == [1, 2] and len(attempts[1]) == at * 4  # the stop lost nothing trained
    both = attempts[1] + attempts[2]
    assert sorted(both) == list(range(TRAIN_IMAGES))  # each sample once
    assert epochs_in_results(run) == [1, 2, 3]


@pytest.mark.slow
def test_resume_on_another_number_of_gpus_restarts_the_epoch(tmp_path, shared_cache, odd_data):
    """A step checkpoint written by one rank (a stop mid-epoch 2 on fake GPU 0), resumed on 2: which samples each
    rank has left cannot be known, so epoch 2 restarts from last.pt, said in the resume's one line; the ranks train
    all of it, results.csv has each epoch once."""
    import subprocess

    env = cli_env(shared_cache, {stepckpt.RECORD_SAMPLES_ENV: "1", "YOLOSAFE_FAKE_GPUS": "2x24GB"})
    proc = subprocess.Popen([YOLOSAFE, "train", "--data", str(odd_data), "--gpus", "0", *DRILL], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = tmp_path / "runs" / "detect" / "train"

    wait_for_the_step_checkpoint_of_epoch_2(run, proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and (run / "weights" / "step.pt").is_file(), err[-2000:]
    epoch = [e for e in _events(run) if e["event"] == "step_saved"][-1]["epoch"]
    resumed = subprocess.run([YOLOSAFE, "train", "--resume", str(run), "--gpus", "0,1"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if "restarts from its first iteration" in line]
    assert len(said) == 1 and f"epoch {epoch + 1} restarts" in said[0] and "saved by 1 rank at" in said[0], said
    restarts = [e for e in _events(run) if e["event"] == "step_restart"]
    assert [(e["attempt"], e["saved_world"], e["world"]) for e in restarts] == [(2, 1, 2)]
    again = trained(run, epoch)
    assert list(again[-1]) == [1]  # the stopped attempt: one process
    assert {i for rank in (0, 1) for i in again[rank][2]} == set(range(TRAIN_IMAGES))  # the whole epoch again
    assert all(len(again[rank][2]) == math.ceil(TRAIN_IMAGES / 2) for rank in (0, 1))
    assert epochs_in_results(run) == [1, 2, 3]


@pytest.mark.slow
def test_sigkill_of_the_supervisor_mid_epoch_then_resume_continues_from_the_step_checkpoint(tmp_path, shared_cache,
                                                                                             odd_data):
    """The supervisor SIGKILLed in the middle of epoch 2 (nobody is left to ask for a save): the worker ends by
    itself, and ``--resume`` continues from the newest step checkpoint: only what was trained after it is redone,
    each sample of the epoch trained once counting the saved iterations, results.csv has each epoch once."""
    import subprocess

    from tests import drills

    env = cli_env(shared_cache, {stepckpt.RECORD_SAMPLES_ENV: "1"})
    proc = subprocess.Popen([YOLOSAFE, "train", "--data", str(odd_data), *DRILL], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run = tmp_path / "runs" / "detect" / "train"

    wait_for_the_step_checkpoint_of_epoch_2(run, proc)
    worker = json.loads((run / "worker-1.json").read_text())["pid"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    drills.wait_gone(worker)  # its parent is gone: it ends by itself
    last = [e for e in _events(run) if e["event"] == "step_saved"][-1]
    resumed = subprocess.run([YOLOSAFE, "train", "--resume", str(run)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step.pt from epoch {last['epoch'] + 1}, iteration {last['iteration'] + 1} of 6" in resumed.stderr
    attempts = trained(run, last["epoch"])[-1]
    kept = attempts[1][:last["iteration"] * 4]  # what the step checkpoint holds; the rest of attempt 1 is redone
    assert sorted(kept + attempts[2]) == list(range(TRAIN_IMAGES))
    assert story(run)["attempts"][0]["outcome"] == "abandoned" and story(run)["outcome"] == "completed"
    assert epochs_in_results(run) == [1, 2, 3]


def test_a_step_checkpoint_of_epoch_1_on_another_number_of_ranks_trains_from_the_first_epoch(tmp_path):
    """No last.pt yet for the epoch to restart from: the resume trains from the start (the supervisor's choice,
    from the ranks' step_saved event), on the same number of ranks it continues, and after an epoch it restarts."""
    from types import SimpleNamespace

    from yolosafe.planning import resume
    from yolosafe.rundir.layout import RunDir

    run = RunDir(tmp_path / "run")
    run.weights.mkdir(parents=True)
    run.step_checkpoint.write_bytes(b"")
    saved = {"event": "step_saved", "attempt": 1, "rank": -1, "epoch": 0, "iteration": 3, "of": 6,
             "done_samples": 12, "shard": 21, "world": 1, "t": 1.0}
    run.events.write_text(json.dumps(saved) + "\n")
    two, one = SimpleNamespace(world_size=2, per_gpu_batch=2), SimpleNamespace(world_size=1, per_gpu_batch=4)
    assert resume._restarts_without_an_epoch(run, run.step_checkpoint, two)
    assert not resume._restarts_without_an_epoch(run, run.step_checkpoint, one)
    run.last_checkpoint.write_bytes(b"")
    assert not resume._restarts_without_an_epoch(run, run.step_checkpoint, two)
