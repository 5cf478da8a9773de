"""One run directory, as an object: every path of a run, for the node that asks.

A :class:`RunDir` is the directory plus the node whose files it names (0 on one machine): node 0 keeps the plain
names, node R > 0 gets ``-nodeR`` in its own files (:func:`yolosafe.rundir.files.node_file`), and the files every
node shares (checkpoints, Ultralytics' results, failure records by global rank, the multi-node marker) have one
name. Modules outside :mod:`yolosafe.rundir` take one ``RunDir`` for a run and ask it for a path: none spells a run
file's name or passes a directory and a node apart. Entry points that users call with a path build it once there
(:meth:`RunDir.of`: a plain path is node 0's view).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from yolosafe.rundir import files

_KEPT = re.compile(r"last-before-attempt(\d+)\.pt$")


@dataclass(frozen=True)
class RunDir:
    """The files of the run in ``path`` that node ``node`` reads and writes."""

    path: Path
    node: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, where: RunDir | str | os.PathLike[str]) -> RunDir:
        """``where`` itself when it is a RunDir, else node 0's view of the directory at that path."""
        return where if isinstance(where, RunDir) else cls(Path(where))

    def on_node(self, node: int) -> RunDir:
        """The same run directory, as node ``node`` names its files."""
        return RunDir(self.path, node)

    def nodes(self) -> list[RunDir]:
        """Every node that kept a story here, each as it names its files ([node 0] on one machine)."""
        return [self.on_node(n) for n in files.node_ranks(self.path)]

    def copies(self, name: str) -> list[Path]:
        """A per-node file of every node: node 0's ``name`` and each ``-nodeR`` variant present."""
        stem, dot, suffix = name.rpartition(".")
        pattern = f"{name}-node*" if not stem or not dot else f"{stem}-node*.{suffix}"
        return [self.path / name, *sorted(self.path.glob(pattern))]

    def locked_nodes(self) -> list[RunDir]:
        """The nodes that have a lock file here (held or not)."""
        found = []
        for path in self.copies(files.LOCK):
            digits = "0" if path.name == files.LOCK else path.name.rpartition("-node")[2]
            if (digits.isascii() and digits.isdecimal()) and path.is_file():
                found.append(self.on_node(int(digits)))
        return found

    def is_spec(self, path: Path) -> bool:
        """Whether ``path`` is a run spec of this run, of any node and attempt."""
        return bool(files.SPEC_NAME.search(path.name)) and os.path.realpath(path.parent) == os.path.realpath(self.path)

    def resolve(self) -> RunDir:
        return RunDir(self.path.resolve(), self.node)

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

    def heartbeat(self, attempt: int, rank: int) -> Path:
        """Rank ``rank``'s heartbeat file (a rank of this node)."""
        return files.heartbeat_path(self.path, attempt, rank, self.node)

    def heartbeats(self, attempt: int) -> list[Path]:
        """The heartbeat files of this node's ranks in ``attempt``."""
        return sorted(self.heartbeat(attempt, 0).parent.glob("rank-*"))

    def hang(self, attempt: int) -> Path:
        """``hang-N.json``: the hang this node's watch found in attempt N."""
        return files.hang_path(self.path, attempt, self.node)

    def hangs(self) -> list[Path]:
        """Every hang record of every node and attempt."""
        return sorted(self.path.glob("hang-*.json"))

    # files every node shares
    @property
    def final_metrics(self) -> Path:
        return self.path / files.FINAL_METRICS

    @property
    def story_of_run(self) -> Path:
        """Node 0's story: the run's attempts, whichever node asks."""
        return self.path / files.STORY

    @property
    def damaged_story(self) -> Path:
        """Where a damaged story is kept aside when the run is resumed without it."""
        return self.path / f"{files.STORY}.damaged"

    @property
    def args(self) -> Path:
        """Ultralytics' ``args.yaml``: the training's own arguments."""
        return self.path / files.ARGS

    @property
    def results_csv(self) -> Path:
        return self.path / files.RESULTS_CSV

    @property
    def injected(self) -> Path:
        return self.path / files.INJECTED

    @property
    def injected_hang(self) -> Path:
        return self.path / files.INJECTED_HANG

    def stack(self, attempt: int, rank: int, native: bool = False) -> Path:
        """Rank ``rank``'s stack dump of attempt ``attempt`` (global rank: one name on every node)."""
        return files.stack_path(self.path, attempt, rank, native)

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

    @property
    def unvalidated(self) -> Path:
        """``weights/unvalidated.pt``: an epoch trained, not yet validated."""
        return self.weights / files.UNVALIDATED

    def checkpoints(self) -> list[Path]:
        """Every ``*.pt`` file in ``weights/``."""
        return [p for p in self.weights.glob("*.pt") if p.is_file()]

    def kept_checkpoint(self, attempt: int) -> Path:
        """``weights/last-before-attemptN.pt``: the checkpoint attempt N resumed from, kept."""
        return self.weights / f"last-before-attempt{attempt}.pt"

    def kept_attempts(self) -> list[int]:
        """The attempts whose starting checkpoint is kept in ``weights/`` (:meth:`kept_checkpoint`)."""
        return [int(m[1]) for p in self.weights.glob("last-before-attempt*.pt") if (m := _KEPT.search(p.name))]

    def worker(self, attempt: int) -> Path:
        return files.worker_path(self.path, attempt)

    def failure(self, attempt: int, rank: int) -> Path:
        return files.failure_path(self.path, attempt, rank)

    def failures(self, attempt: int | None = None) -> list[Path]:
        """The failure records of one attempt, or of all, unordered (those of OOMs recovered in place too)."""
        return list(self.path.glob(f"failure-{'*' if attempt is None else attempt}-rank*.json"))

    def recovered_failures(self, attempt: int | None = None, rank: int | None = None) -> list[Path]:
        """The records of OOMs a rank recovered from in place (``failure-N-rankR-recoveredK.json``)."""
        a, r = "*" if attempt is None else attempt, "*" if rank is None else max(rank, 0)
        return list(self.path.glob(f"failure-{a}-rank{r}-recovered*.json"))

    def recovered_failure(self, attempt: int, rank: int, count: int) -> Path:
        """The ``count``-th record of an OOM rank ``rank`` recovered from in place in attempt ``attempt``."""
        failure = self.failure(attempt, rank)
        return failure.with_name(f"{failure.stem}-recovered{count}.json")

    def node_state(self, node: int) -> Path:
        return files.node_state_path(self.path, node)

    def node_end(self, attempt: int, node: int) -> Path:
        return files.node_end_path(self.path, attempt, node)

    # the lock of this node
    def holder(self) -> str | None:
        return files.holder(self.path, self.node)

    def lock(self) -> int:
        return files.lock(self.path, self.node)

    def unlock(self) -> None:
        files.unlock(self.path, self.node)

    def mark_if_orphaned(self, locked_here: bool = False) -> bool:
        return files.mark_if_orphaned(self.path, self.node, locked_here)

    def is_run(self) -> bool:
        """Whether a yolosafe run lives here (node 0's story)."""
        return (self.path / files.STORY).is_file()
