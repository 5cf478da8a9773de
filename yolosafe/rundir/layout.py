"""One run directory, as an object: every path of a run, for the node that asks.

A :class:`RunDir` is the directory plus the node whose files it names (0 on one machine): node 0 keeps the plain
names, node R > 0 gets ``-nodeR`` in its own files (:func:`yolosafe.rundir.files.node_file`), and the files every
node shares (checkpoints, Ultralytics' results, failure records by global rank, the multi-node marker) have one
name. Modules ask it for a path instead of spelling a file name or passing ``(run_dir, node)`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from yolosafe.rundir import files


@dataclass(frozen=True)
class RunDir:
    """The files of the run in ``path`` that node ``node`` reads and writes."""

    path: Path
    node: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def on_node(self, node: int) -> RunDir:
        """The same run directory, as node ``node`` names its files."""
        return RunDir(self.path, node)

    def own(self, name: str) -> Path:
        """This node's copy of a per-node file (``train.log`` -> ``train-node1.log`` on node 1)."""
        return self.path / files.node_file(name, self.node)

    # this node's own files
    @property
    def story(self) -> Path:
        return self.own(files.STORY)

    @property
    def log(self) -> Path:
        return self.own(files.LOG)

    @property
    def events(self) -> Path:
        return self.own(files.EVENTS)

    @property
    def memory_csv(self) -> Path:
        return self.own(files.MEMORY_CSV)

    @property
    def memory_summary(self) -> Path:
        return self.own(files.MEMORY_SUMMARY)

    @property
    def memory_plot(self) -> Path:
        return self.own(files.MEMORY_PLOT)

    @property
    def fake_phase(self) -> Path:
        return self.own(files.FAKE_PHASE)

    def spec(self, attempt: int) -> Path:
        return files.spec_path(self.path, attempt, self.node)

    def ranks_log_dir(self, attempt: int) -> Path:
        return files.ranks_log_dir(self.path, attempt, self.node)

    # files every node shares
    @property
    def final_metrics(self) -> Path:
        return self.path / files.FINAL_METRICS

    @property
    def injected(self) -> Path:
        return self.path / files.INJECTED

    @property
    def nodes_marker(self) -> Path:
        return self.path / files.NODES_MARKER

    @property
    def weights(self) -> Path:
        return files.weights_dir(self.path)

    @property
    def last_checkpoint(self) -> Path:
        return files.last_checkpoint(self.path)

    @property
    def best_checkpoint(self) -> Path:
        return files.best_checkpoint(self.path)

    def kept_checkpoint(self, attempt: int) -> Path:
        """``weights/last-before-attemptN.pt``: the checkpoint attempt N resumed from, kept."""
        return self.weights / f"last-before-attempt{attempt}.pt"

    def worker(self, attempt: int) -> Path:
        return files.worker_path(self.path, attempt)

    def failure(self, attempt: int, rank: int) -> Path:
        return files.failure_path(self.path, attempt, rank)

    def node_state(self, node: int) -> Path:
        return files.node_state_path(self.path, node)

    def node_end(self, attempt: int, node: int) -> Path:
        return files.node_end_path(self.path, attempt, node)

    # the lock of this node
    def holder(self) -> str | None:
        return files.holder(self.path, self.node)

    def lock(self) -> int:
        return files.lock(self.path, self.node)

    def is_run(self) -> bool:
        """Whether a yolosafe run lives here (node 0's story)."""
        return (self.path / files.STORY).is_file()
