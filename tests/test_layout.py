"""RunDir names every file of a run for the node that asks, the same names rundir.files defines."""

from __future__ import annotations

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
