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

# Torch 2.14 reads one of the two names, PYTORCH_CUDA_ALLOC_CONF whenever it is set (even empty), else
# PYTORCH_ALLOC_CONF, whole, never key by key (torch_reads); other versions differ, so apply() sets both alike.
ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
DEFAULTS: Mapping[str, str] = MappingProxyType({"expandable_segments": "True"})
OVERRIDE_SOURCE = "--alloc-conf"

# c10's tokenizer drops whitespace inside a value; its numbers are C++ std::stoull / std::stod of the value: a
# prefix is read, the rest ignored ("30abc" is 30), a minus sign wraps an unsigned number around 2**64.
_UNSIGNED = re.compile(r"[+-]?\d+")
_DOUBLE = re.compile(r"[+-]?(0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)([pP][+-]?\d+)?"
                     r"|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf(inity)?|nan)", re.IGNORECASE)
_ULL = 2**64


class AllocConfError(UsageError):
    """A malformed or invalid allocator string; str(e) is one line: the source, what is wrong and what is allowed."""


def _stoull(value: str) -> tuple[int, str] | None:
    """``std::stoull(value)`` as c10 reads it, and the text it read; None where it throws."""
    match = _UNSIGNED.match(value)
    if not match:
        return None
    number = int(match[0])
    if abs(number) >= _ULL:
        return None
    return number % _ULL, match[0]


def _stod(value: str) -> tuple[float, str] | None:
    """``std::stod(value)`` (decimal, hexadecimal, inf, nan), and the text it read; None where it throws."""
    match = _DOUBLE.match(value)
    if not match:
        return None
    text = match[0]
    unsigned = text.lstrip("+-")
    number = float.fromhex(text) if unsigned[:2].lower() == "0x" else float(text)
    return number, text


def _boolean(value: str) -> str | None:
    # torch accepts only 'True'/'False'; canonicalising is what makes a user's 'true' work.
    return value.capitalize() if value.lower() in ("true", "false") else None


def _integer(minimum: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        read = _stoull(value)
        return read[1] if read and read[0] >= minimum else None

    return check


def _fraction(*, allow_zero: bool, allow_one: bool) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        read = _stod(value)
        if read is None:
            return None
        number = read[0]
        low = number >= 0 if allow_zero else number > 0
        high = number <= 1 if allow_one else number < 1
        return read[1] if low and high else None

    return check


def _power_of_two(value: str, *, maximum: int | None = None, allow_zero: bool = False) -> str | None:
    read = _stoull(value)
    if read is None:
        return None
    number = read[0]
    if (number == 0 and allow_zero) or (number > 0 and number & (number - 1) == 0):
        return read[1] if maximum is None or number <= maximum else None
    return None


def _register_threads(value: str) -> str | None:
    return _power_of_two(value, maximum=128)


def _roundup(value: str) -> str | None:
    """One power-of-two division count, or '[size:div,...]' per size interval (size in MB, '>' for the rest)."""
    if not (value.startswith("[") and value.endswith("]")):
        return _power_of_two(value)
    entries = []
    for entry in filter(None, value[1:-1].split(",")):
        size, sep, div = entry.partition(":")
        size = size if size == ">" else _power_of_two(size)
        div = _power_of_two(div, allow_zero=True)  # torch: 0 turns rounding off for that interval
        if not sep or size is None or div is None:
            return None
        entries.append(f"{size}:{div}")
    return "[" + ",".join(entries) + "]"


def _backend(value: str) -> str | None:
    return value if value in ("native", "cudaMallocAsync") else None


_BOOL = (_boolean, "True or False (any case)")
# key -> (check returning the canonical value or None, what is allowed). Keys and limits are those of c10's parser
# (tests/test_allocator.py checks them against torch's own, which runs without a GPU).
_KEYS: Mapping[str, tuple[Callable[[str], str | None], str]] = MappingProxyType({
    "backend": (_backend, "'native' or 'cudaMallocAsync'"),
    "expandable_segments": _BOOL,
    "max_split_size_mb": (_integer(20), "an integer >= 20 (MB)"),
    "max_non_split_rounding_mb": (_integer(20), "an integer >= 20 (MB)"),
    "garbage_collection_threshold": (_fraction(allow_zero=False, allow_one=False), "a number strictly between 0 and 1"),
    "roundup_power2_divisions": (
        _roundup,
        "a power of two, or a list like [256:1,512:2,>:8] of size:divisions, size a power of two (MB) or '>',"
        " divisions a power of two or 0 (no rounding)",
    ),
    "per_process_memory_fraction": (_fraction(allow_zero=True, allow_one=True), "a number from 0 to 1"),
    "release_lock_on_cudamalloc": _BOOL,
    "release_lock_on_hipmalloc": _BOOL,
    "graph_capture_record_stream_reuse": _BOOL,
    "throw_on_cudamalloc_oom": _BOOL,
    "large_segment_size_mb": (_integer(11), "an integer > 10 (MB)"),
    "pinned_use_cuda_host_register": _BOOL,
    "pinned_use_hip_host_register": _BOOL,
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
    if any(not item.strip() for item in items[:-1]):  # c10 reads a ',' where a key belongs as an unknown key
        raise AllocConfError(f"{source}: an empty item in {conf!r}; separate items with one comma")
    return [item.strip() for item in items if item.strip()]


def parse(conf: str, source: str) -> dict[str, str]:
    """Validate 'key:value,key:value' and return its canonical values in order; raise AllocConfError on any fault."""
    options: dict[str, str] = {}
    for item in _split_items(conf, source):
        key, sep, raw = ("".join(part.split()) for part in item.partition(":"))  # c10 drops whitespace
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


def torch_reads(env: Mapping[str, str]) -> str | None:
    """The variable torch reads of ``env``: the first of :data:`ENV_VARS` that is set; None when neither is."""
    return next((name for name in ENV_VARS if name in env), None)


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
