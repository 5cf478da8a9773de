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
