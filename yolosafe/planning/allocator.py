"""The CUDA caching-allocator settings that yolosafe hands to the training child process.

PyTorch reads ``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF`` once, when it initialises CUDA, so the value has to
be in the child's environment before it starts; changing it afterwards does nothing. yolosafe turns on
``expandable_segments`` by default because it cuts fragmentation, the usual cause of an OOM with gigabytes
"reserved but unallocated". A user's own settings are kept and win key by key.

Every string is validated here, with the rules of c10's allocator config parser, so a typo fails at once with one
clear line naming where it came from, instead of as a C++ assertion deep inside the child after the dataset loaded.
This module does not import torch: the CLI must start fast.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

from yolosafe.errors import UsageError

# Torch reads both names, but which one wins differs between versions (and between its generic and CUDA parsers),
# so apply() sets both to the same value.
ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
DEFAULTS: Mapping[str, str] = MappingProxyType({"expandable_segments": "True"})
OVERRIDE_SOURCE = "--alloc-conf"

_DIGITS = re.compile(r"\d+")
_DECIMAL = re.compile(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class AllocConfError(UsageError):
    """A malformed or invalid allocator string; str(e) is one line: the source, what is wrong and what is allowed."""


def _boolean(value: str) -> str | None:
    # torch accepts only 'True'/'False'; canonicalising is what makes a user's 'true' work.
    return value.capitalize() if value.lower() in ("true", "false") else None


def _integer(minimum: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return str(int(value)) if _DIGITS.fullmatch(value) and int(value) >= minimum else None

    return check


def _fraction(*, allow_one: bool) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if not _DECIMAL.fullmatch(value):
            return None
        number = float(value)
        return str(number) if 0 < number < 1 or (allow_one and number == 1) else None

    return check


def _power_of_two(value: str, *, maximum: int | None = None, allow_zero: bool = False) -> str | None:
    if not _DIGITS.fullmatch(value):
        return None
    number = int(value)
    if (number == 0 and allow_zero) or (number > 0 and number & (number - 1) == 0):
        return str(number) if maximum is None or number <= maximum else None
    return None


def _register_threads(value: str) -> str | None:
    return _power_of_two(value, maximum=128)


def _roundup(value: str) -> str | None:
    """One power-of-two division count, or '[size:div,...]' per size interval (size in MB, '>' for the rest)."""
    if not (value.startswith("[") and value.endswith("]")):
        return _power_of_two(value)
    entries = []
    for entry in value[1:-1].split(","):
        size, sep, div = (part.strip() for part in entry.partition(":"))
        size = size if size == ">" else _power_of_two(size)
        div = _power_of_two(div, allow_zero=True)  # torch: 0 turns rounding off for that interval
        if not sep or size is None or div is None:
            return None
        entries.append(f"{size}:{div}")
    return "[" + ",".join(entries) + "]"


def _backend(value: str) -> str | None:
    return value if value in ("native", "cudaMallocAsync") else None


_BOOL = (_boolean, "True or False (any case)")
# key -> (check returning the canonical value or None, what is allowed). Keys and limits are those of c10's parser.
_KEYS: Mapping[str, tuple[Callable[[str], str | None], str]] = MappingProxyType({
    "backend": (_backend, "'native' or 'cudaMallocAsync'"),
    "expandable_segments": _BOOL,
    "max_split_size_mb": (_integer(21), "an integer > 20 (MB)"),
    "max_non_split_rounding_mb": (_integer(21), "an integer > 20 (MB)"),
    "garbage_collection_threshold": (_fraction(allow_one=False), "a number strictly between 0 and 1"),
    "roundup_power2_divisions": (
        _roundup,
        "a power of two, or a list like [256:1,512:2,>:8] of size:divisions, size a power of two (MB) or '>',"
        " divisions a power of two or 0 (no rounding)",
    ),
    "per_process_memory_fraction": (_fraction(allow_one=True), "a number > 0 and <= 1"),
    "release_lock_on_cudamalloc": _BOOL,
    "graph_capture_record_stream_reuse": _BOOL,
    "throw_on_cudamalloc_oom": _BOOL,
    "large_segment_size_mb": (_integer(11), "an integer > 10 (MB)"),
    "pinned_use_cuda_host_register": _BOOL,
    "pinned_use_background_threads": _BOOL,
    "pinned_num_register_threads": (_register_threads, "a power of two <= 128"),
    "pinned_reserve_segment_size_mb": (_integer(1), "a positive integer (MB)"),
    "pinned_max_cached_size_mb": (_integer(0), "a non-negative integer (MB)"),
    "pinned_max_round_threshold_mb": (_integer(0), "a non-negative integer (MB)"),
    "pinned_free_catch_all": _BOOL,
})


def _split_items(conf: str, source: str) -> list[str]:
    """Split on the commas between items, not on those inside roundup_power2_divisions' [...] list."""
    items, start, depth = [], 0, 0
    for i, char in enumerate(conf):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise AllocConfError(f"{source}: unbalanced or nested brackets in {conf!r}; use one level of [...]")
        if char == "," and depth == 0:
            items.append(conf[start:i])
            start = i + 1
    if depth:
        raise AllocConfError(f"{source}: unbalanced brackets in {conf!r}; every '[' needs a closing ']'")
    items.append(conf[start:])
    return [item.strip() for item in items if item.strip()]


def parse(conf: str, source: str) -> dict[str, str]:
    """Validate 'key:value,key:value' and return its canonical values in order; raise AllocConfError on any fault."""
    options: dict[str, str] = {}
    for item in _split_items(conf, source):
        key, sep, raw = (part.strip() for part in item.partition(":"))
        if not sep:
            raise AllocConfError(f"{source}: {item!r} is not key:value; write items like 'expandable_segments:True'")
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(_KEYS)}"
            raise AllocConfError(f"{source}: unknown allocator key {key!r}; {hint}")
        if key in options:
            raise AllocConfError(f"{source}: {key!r} is given twice; give each key once")
        check, allowed = _KEYS[key]
        value = check(raw)
        if value is None:
            raise AllocConfError(f"{source}: bad value {raw!r} for {key!r}; allowed: {allowed}")
        options[key] = value
    return options


def render(options: dict[str, str]) -> str:
    """The 'key:value,key:value' string torch parses."""
    return ",".join(f"{key}:{value}" for key, value in options.items())


def merge(env: Mapping[str, str], override: str | None) -> dict[str, str]:
    """DEFAULTS < PYTORCH_CUDA_ALLOC_CONF < PYTORCH_ALLOC_CONF < --alloc-conf, key by key, each validated."""
    options = dict(DEFAULTS)
    for name in ENV_VARS:
        if name in env:
            options.update(parse(env[name], name))
    if override is not None:
        options.update(parse(override, OVERRIDE_SOURCE))
    return options


def apply(env: Mapping[str, str], override: str | None) -> dict[str, str]:
    """A copy of env for the child, with both ENV_VARS set to the merged value so old and new torch agree."""
    child = dict(env)
    value = render(merge(env, override))
    for name in ENV_VARS:
        child[name] = value
    return child
