"""The real GPUs' other faces, simulated at the lowest layer: every real out-of-memory form recovered by the retry
loop over real CPU ranks (fake GPUs), raised as the exception type a GPU raises with its real text."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, run_dir_of, story


@pytest.mark.slow
@pytest.mark.parametrize("error", ["accelerator", "nccl", "cudnn"])
def test_the_retry_loop_recovers_each_real_oom_form_on_two_ranks(run_cli, tmp_path, error):
    env = {"YOLOSAFE_FAKE_GPUS": "2x24GB", "YOLOSAFE_INJECT_OOM": f"phase=train,epoch=0,rank=1,error={error}"}
    result = run_cli("train", "--gpus", "0,1", "--epochs", "1", *TINY, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = story(run_dir_of(tmp_path))["attempts"]
    assert (first["outcome"], first["phase"], first["rank"], first["gpu"]) == ("oom", "train", 1, 1)
    assert second["outcome"] == "completed" and second["per_gpu_batch"] == 2
