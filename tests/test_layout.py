"""RunDir names every file of a run for the node that asks, the same names rundir.files defines."""

from __future__ import annotations

import os
from pathlib import Path

from yolosafe.rundir import files
from yolosafe.rundir.layout import RunDir


def test_node_0_keeps_the_plain_names_other_nodes_their_own():
    run = RunDir(Path("/r"))
    assert (run.story, run.log, run.events, run.memory_csv) == tuple(
        Path("/r") / n for n in (files.STORY, files.LOG, files.EVENTS, files.MEMORY_CSV))
    node1 = run.on_node(1)
    assert (node1.story.name, node1.log.name, node1.events.name) == ("yolosafe-node1.json", "train-node1.log",
                                                                      "events-node1.jsonl")
    assert node1.spec(3) == files.spec_path(Path("/r"), 3, 1) and node1.ranks_log_dir(2).parts[-2:] == ("node1",
                                                                                                      "attempt-2")


def test_shared_files_have_one_name_on_every_node():
    for node in (0, 1, 2):
        run = RunDir("/r", node)
        assert run.last_checkpoint == Path("/r/weights/last.pt") and run.best_checkpoint == Path("/r/weights/best.pt")
        assert run.failure(2, 5) == Path("/r/failure-2-rank5.json") and run.final_metrics == Path("/r/" +
                                                                                                  files.FINAL_METRICS)
        assert run.kept_checkpoint(3) == Path("/r/weights/last-before-attempt3.pt")
        assert run.node_end(1, 1) == Path("/r/attempt-1-node1.json")


def test_a_run_directory_finds_its_nodes_locks_specs_and_kept_files(tmp_path):
    run = RunDir.of(tmp_path)
    assert RunDir.of(run) is run and run == RunDir(tmp_path, 0)
    (tmp_path / files.STORY).write_text("{}")
    (tmp_path / files.node_file(files.STORY, 2)).write_text("{}")
    assert [n.node for n in run.nodes()] == [0, 2] and run.nodes()[1].story == run.on_node(2).story
    fd = run.on_node(1).lock()  # node 1's lock file only: node 0 never locked here
    try:
        assert [n.node for n in run.locked_nodes()] == [1] and run.on_node(1).holder() is not None
    finally:
        os.close(fd)
    assert run.copies(files.LOG) == [tmp_path / files.LOG]
    assert run.is_spec(run.on_node(1).spec(3)) and run.is_spec(run.spec(1))
    assert not run.is_spec(tmp_path / "other" / "spec-1.json") and not run.is_spec(run.worker(1))
    assert (run.unvalidated, run.args, run.results_csv) == (tmp_path / "weights" / "unvalidated.pt",
                                                            tmp_path / "args.yaml", tmp_path / "results.csv")
    run.weights.mkdir()
    for attempt in (2, 5):
        run.kept_checkpoint(attempt).write_bytes(b"")
    assert sorted(run.kept_attempts()) == [2, 5] and len(run.checkpoints()) == 2
    recovered = run.recovered_failure(1, 3, 2)
    assert recovered == tmp_path / "failure-1-rank3-recovered2.json"
    recovered.write_text("{}")
    run.failure(1, 3).write_text("{}")
    assert run.recovered_failures() == [recovered] == run.recovered_failures(1, 3)
    assert sorted(run.failures(1)) == sorted([run.failure(1, 3), recovered]) and run.failures(2) == []
