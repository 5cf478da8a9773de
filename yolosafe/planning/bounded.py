"""Bounded reading of the files yolosafe reads itself (``--config``, the dataset registry, a data YAML, a run's
``args.yaml``): a regular file (never a FIFO that blocks, a device that never ends), at most :data:`FILE_MAX`
bytes, and YAML through a loader that refuses a document whose aliases expand it past :data:`YAML_NODES_MAX`
nodes (a billion laughs), more than :data:`YAML_ALIASES_MAX` aliases, or an alias inside its own anchor (a cycle:
``classes: &a [*a]``). Each refusal is a :class:`ReadError`, one line.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from yolosafe.errors import UsageError

FILE_MAX = 4 * 1024 * 1024  # bytes: a config, a registry or a data YAML is a few kB; a class list of 100k names fits
YAML_ALIASES_MAX = 1000  # a config reuses a block a few times, never a thousand
YAML_NODES_MAX = 200_000  # nodes of the document with every alias expanded


class ReadError(UsageError):
    """A file that yolosafe refuses to read, or YAML it refuses to load; ``str()`` is one line."""


def kind_of(mode: int) -> str | None:
    """What a file that is not a regular file is, in words; None for a regular file."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def read_bytes(path: str | Path, what: str, limit: int = FILE_MAX) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; never blocks (a FIFO is opened without waiting for a
    writer, then refused) and never reads past ``limit`` (a file that grows while it is read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ReadError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        kind = kind_of(info.st_mode)
        if kind:
            raise ReadError(f"{what} {path}: {kind}, not a file; give a YAML file")
        if info.st_size > limit:
            raise ReadError(f"{what} {path}: {info.st_size} bytes, more than the {limit} a YAML file of options "
                            "can be")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ReadError(f"{what} {path}: more than {limit} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise ReadError(f"{what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def check_file(path: str | Path, what: str, limit: int = FILE_MAX) -> None:
    """``path``, when it exists, is a regular file of at most ``limit`` bytes (a file another process reads)."""
    try:
        info = os.stat(path)
    except OSError:
        return  # missing: whoever reads it says so
    kind = kind_of(info.st_mode)
    if kind and kind != "a folder":
        raise ReadError(f"{what} {path}: {kind}, not a file")
    if not kind and info.st_size > limit:
        raise ReadError(f"{what} {path}: {info.st_size} bytes, more than the {limit} it can be")


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, counting what aliases would expand to while the document is composed (before any
    Python object exists)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.weights: dict[int, int] = {}  # node id -> its size with aliases expanded
        self.open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            self.aliases += 1
            if event.anchor in self.open_anchors:
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} inside its own anchor "
                                                  "(a cycle)", event.start_mark)
            if self.aliases > YAML_ALIASES_MAX:
                raise yaml.composer.ComposerError(None, None, f"more than {YAML_ALIASES_MAX} aliases",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        anchor = getattr(self.peek_event(), "anchor", None)
        if anchor is not None:
            self.open_anchors.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.open_anchors.discard(anchor)
        self._weigh(node)
        return node

    def _weigh(self, node: Any) -> None:
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        weight = 1 + sum(self.weights.get(id(child), 1) for child in children)
        if weight > YAML_NODES_MAX:
            raise yaml.composer.ComposerError(None, None, f"its aliases expand it past {YAML_NODES_MAX} nodes "
                                              "(a billion laughs?)", node.start_mark)
        self.weights[id(node)] = weight


def load_yaml(text: str | bytes) -> Any:
    """``yaml.safe_load`` within the bounds; a ``yaml.YAMLError`` for what it refuses."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_file(path: str | Path, what: str) -> Any:
    """A YAML file of the user's, read and loaded within the bounds, decoded as UTF-8; one line otherwise."""
    data = read_bytes(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ReadError(f"{what} {path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                        "save it as UTF-8") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise ReadError(f"{what} {path}: not valid YAML ({' '.join(str(exc).split())[:300]})") from None
