"""The allocator string yolosafe gives the training child: defaults, merging, precedence and validation."""

from __future__ import annotations

import pytest

from yolosafe.planning.allocator import DEFAULTS, ENV_VARS, AllocConfError, apply, merge, parse, render

CUDA_VAR, GENERIC_VAR = ENV_VARS
BRACKETS = "roundup_power2_divisions:[256:1,512:2,1024:4,>:8],expandable_segments:True"


def test_defaults_only() -> None:
    assert merge({}, None) == DEFAULTS == {"expandable_segments": "True"}
    assert parse("  ", "--alloc-conf") == {}


def test_user_env_is_kept_and_wins_over_defaults() -> None:
    env = {CUDA_VAR: "expandable_segments:False,max_split_size_mb:128"}
    assert merge(env, None) == {"expandable_segments": "False", "max_split_size_mb": "128"}


def test_override_wins_over_env_and_defaults() -> None:
    env = {CUDA_VAR: "expandable_segments:False,max_split_size_mb:128"}
    merged = merge(env, "max_split_size_mb:256,garbage_collection_threshold:0.8")
    assert merged == {"expandable_segments": "False", "max_split_size_mb": "256", "garbage_collection_threshold": "0.8"}


def test_generic_var_beats_cuda_var() -> None:
    env = {CUDA_VAR: "max_split_size_mb:128,garbage_collection_threshold:0.5", GENERIC_VAR: "max_split_size_mb:64"}
    merged = merge(env, None)
    assert merged["max_split_size_mb"] == "64"
    assert merged["garbage_collection_threshold"] == "0.5"


def test_apply_sets_both_vars_and_leaves_input_alone() -> None:
    env = {"PATH": "/usr/bin", CUDA_VAR: "max_split_size_mb:128"}
    before = dict(env)
    child = apply(env, "expandable_segments:false")
    assert env == before
    assert child["PATH"] == "/usr/bin"
    assert child[CUDA_VAR] == child[GENERIC_VAR] == "expandable_segments:False,max_split_size_mb:128"


def test_bracket_form_round_trips() -> None:
    options = parse(BRACKETS, "--alloc-conf")
    assert options == {"roundup_power2_divisions": "[256:1,512:2,1024:4,>:8]", "expandable_segments": "True"}
    assert render(options) == BRACKETS
    spaced = " roundup_power2_divisions : [ 256 : 1 , > : 8 ] "
    assert render(parse(spaced, "x")) == "roundup_power2_divisions:[256:1,>:8]"


def test_boolean_is_canonicalised() -> None:
    assert parse("expandable_segments:true", "--alloc-conf") == {"expandable_segments": "True"}


@pytest.mark.parametrize(
    "conf",
    [
        "expandable_segments:maybe",
        "garbage",
        "max_split_size_mb:10",
        "max_split_size_mb:abc",
        "garbage_collection_threshold:1.5",
        "unknown_key:1",
        "expandable_segments:True,expandable_segments:False",
        "roundup_power2_divisions:3",
        "roundup_power2_divisions:[256:1",
    ],
)
@pytest.mark.parametrize("source", ["--alloc-conf", CUDA_VAR])
def test_bad_strings_raise_one_line_naming_the_source(conf: str, source: str) -> None:
    with pytest.raises(AllocConfError) as caught:
        parse(conf, source)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{source}: ")


def test_bad_env_var_is_blamed_by_name() -> None:
    with pytest.raises(AllocConfError, match=f"^{GENERIC_VAR}: "):
        merge({CUDA_VAR: "expandable_segments:True", GENERIC_VAR: "max_split_size_mb:10"}, None)


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(AllocConfError, match="did you mean 'expandable_segments'"):
        parse("expandable_segment:True", "--alloc-conf")


# Values around every limit of c10's parser, its number reading (std::stoull / std::stod of a prefix, a minus sign
# wrapping around) and its tokenizer (whitespace dropped, empty items).
TORCH_CASES = [f"{key}:{value}" for key, values in {
    "max_split_size_mb": ["19", "20", "21", "-1", "+30", "1e3", "30.5", "30abc", "0x20", "abc", "18446744073709551616"],
    "max_non_split_rounding_mb": ["19", "20", "0", "-1"],
    "large_segment_size_mb": ["10", "11", "0", "-1"],
    "garbage_collection_threshold": ["0", "0.5", "1", ".5", "5e-1", "-0.5", "0.5abc", "0x0.8p0", "inf", "nan", "x"],
    "per_process_memory_fraction": ["0", "0.0", "0.5", "1", "1.5", "-0.1", "+0.5", "1e-1", "nan"],
    "roundup_power2_divisions": ["1", "2", "3", "0", "-1", "[256:1,512:2,>:8]", "[256:0]", "[3:1]", "[]", "[0:1]",
                                 "[256:1,300:2]", "[ 256 : 1 ]", "[>:8,256:1]", "[256:-1]"],
    "expandable_segments": ["True", "False", "1", "True extra"],
    "pinned_num_register_threads": ["1", "3", "128", "256", "0", "-1"],
    "pinned_reserve_segment_size_mb": ["0", "1", "-1"],
    "pinned_max_cached_size_mb": ["0", "5"],
    "pinned_max_round_threshold_mb": ["0", "5"],
    **{flag: ["True", "False"] for flag in ("release_lock_on_cudamalloc", "release_lock_on_hipmalloc",
                                            "pinned_use_cuda_host_register", "pinned_use_hip_host_register",
                                            "pinned_use_background_threads", "pinned_free_catch_all",
                                            "graph_capture_record_stream_reuse", "throw_on_cudamalloc_oom")},
    "backend": ["native"],  # cudaMallocAsync only before the allocator starts: not in one process's differential
}.items() for value in values] + ["", " ", ",", "expandable_segments:True,", ",expandable_segments:True",
                                  "expandable_segments:True,,max_split_size_mb:30", "expandable_segments: True",
                                  "garbage", "unknown_key:1", "expandable_segments"]


def test_accepts_exactly_what_torchs_own_parser_accepts() -> None:
    """Differential against c10's parser (``torch._C._accelerator_setAllocatorSettings``, no GPU needed): each case
    is accepted by both or refused by both, and what yolosafe writes torch reads as given. Two deliberate
    differences: booleans in any case are corrected to True/False, and a key given twice is refused (torch keeps the
    last silently)."""
    import torch

    def torch_accepts(conf: str) -> bool:
        try:
            torch._C._accelerator_setAllocatorSettings(conf)
        except (ValueError, RuntimeError, IndexError):  # c10's errors as Python sees them (stoull: IndexError)
            return False
        return True

    before = torch._C._accelerator_getAllocatorSettings()
    try:
        differ = []
        for conf in TORCH_CASES:
            try:
                ours = render(parse(conf, "--alloc-conf"))
            except AllocConfError:
                ours = None
            if (ours is not None) != torch_accepts(conf) or (ours is not None and not torch_accepts(ours)):
                differ.append((conf, ours))
        assert not differ
        assert torch_accepts("expandable_segments:True,expandable_segments:False")  # the deliberate differences
        assert not torch_accepts("expandable_segments:true")
    finally:
        torch._C._accelerator_setAllocatorSettings(before)


def test_torch_reads_one_variable_whole_and_doctor_reads_it_so(tmp_path) -> None:
    """torch 2.14 at startup: PYTORCH_CUDA_ALLOC_CONF whenever set (even empty), else PYTORCH_ALLOC_CONF; never a
    key-by-key merge. Checked in a fresh process (torch reads the environment once)."""
    import os
    import subprocess
    import sys

    from yolosafe.planning.allocator import torch_reads
    from yolosafe.readers.doctor.diagnosis import environment

    both = {CUDA_VAR: "garbage_collection_threshold:0.5", GENERIC_VAR: "expandable_segments:True"}
    code = "import torch; print(torch._C._accelerator_getAllocatorSettings())"
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS} | both
    read = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert read.stdout.strip() == both[CUDA_VAR] and torch_reads(both) == CUDA_VAR
    assert torch_reads({GENERIC_VAR: "x"}) == GENERIC_VAR and torch_reads({CUDA_VAR: "", GENERIC_VAR: "x"}) == CUDA_VAR
    seen = environment(both, [])
    assert seen.expandable_segments == "unset"  # the generic variable's True is not what torch runs with
    assert "torch ignores it while PYTORCH_CUDA_ALLOC_CONF is set" in (seen.allocator[1].note or "")
