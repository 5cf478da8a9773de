"""What the terminal shows of a rank launcher's output: rank 0's stream as if it ran alone, yolosafe's own lines,
nothing else; however the pipe cuts the output into chunks."""

from __future__ import annotations

import io
import threading
import time

import pytest

from yolosafe.supervisor.terminal import RankStream, TracebackFilter

LAUNCHER_OUTPUT = (
    b"W1201 19:50:53.947000 11480 torch/distributed/run.py:982] *****\n"
    b"[rank0]: Ultralytics 8.4.190 CPU\n"
    b"[rank1]: [rank1]:[W1201 reducer.cpp:1529] Warning: find_unused_parameters=True\n"
    b"[rank0]: [rank0]:[W1201 reducer.cpp:1529] Warning: find_unused_parameters=True\n"
    b"[rank0]: \r[rank0]: \x1b[K  1/2  0G  1.8: 0% 0/4\r[rank0]: \x1b[K  1/2  0G  1.1: 25% 1/4"
    b"[rank1]: [rank1]: Traceback (most recent call last):\n"
    b'[rank1]: [rank1]:   File "worker.py", line 188, in <module>\n'
    b"[rank1]: [rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 300.00 MiB.\n"
    b"[rank0]: \r[rank0]: \x1b[K  1/2  0G  0.7: 50% 2/4 \xe2\x94\x81\xe2\x94\x81\n"
    b"[rank0]: [rank0]: Traceback (most recent call last):\n"
    b'[rank0]: [rank0]:   File "worker.py", line 188, in <module>\n'
    b"[rank0]: [rank0]: RuntimeError: Connection closed by peer\n"
    b"[rank0]: \n"
    b"E1201 19:51:03.095000 11480 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)\n"
    b"yolosafe.training.worker FAILED\n"
    b"------------------------------------------------------------\n"
    b"  rank      : 1 (local_rank: 1)\n"
    b"  traceback : Traceback (most recent call last):\n"
    b'    File "worker.py", line 158, in run\n'
    b"yolosafe: rank launcher stopped by SIGINT\n"
)
SHOWN = (
    b"Ultralytics 8.4.190 CPU\n"  # the DDP warning about find_unused_parameters: train.log only
    b"\r\x1b[K  1/2  0G  1.8: 0% 0/4\r\x1b[K  1/2  0G  1.1: 25% 1/4"
    b"\r\x1b[K  1/2  0G  0.7: 50% 2/4 \xe2\x94\x81\xe2\x94\x81\n"
    b"yolosafe: rank launcher stopped by SIGINT\n"
)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 100_000])
def test_rank_0_alone_whatever_the_chunks(size):
    out = io.BytesIO()
    stream = RankStream(TracebackFilter(out))
    for start in range(0, len(LAUNCHER_OUTPUT), size):
        stream.write(LAUNCHER_OUTPUT[start:start + size])
    assert out.getvalue() == SHOWN


def test_another_nodes_first_rank_is_shown_there():
    out = io.BytesIO()
    RankStream(out, shown=2).write(b"[rank0]: node 0\n[rank2]: node 1's first rank\n[rank3]: its second\n")
    assert out.getvalue() == b"node 1's first rank\n"


def test_the_launchers_tee_keeps_redraws_and_names_every_piece(tmp_path):
    """torch.distributed.run's console tee as yolosafe's launcher runs it: line ends as written, the rank's prefix at
    each line and at a piece that follows another rank's output."""
    from yolosafe.training.launcher import LineTee

    files = {rank: tmp_path / f"{rank}.log" for rank in (0, 1)}
    tee, dst, done = LineTee(), io.StringIO(), threading.Event()
    threads = [threading.Thread(target=tee.tail, args=(f"[rank{rank}]: ", str(path), dst, done, 0.005))
               for rank, path in files.items()]
    for thread in threads:
        thread.start()
    for rank, text in ((0, "bar 10%\rbar 20%"), (1, "hello\n"), (0, "\rbar 30%\n")):
        with open(files[rank], "a", newline="") as fh:
            fh.write(text)
        time.sleep(0.3)
    done.set()
    for thread in threads:
        thread.join(timeout=5)
    assert dst.getvalue() == "[rank0]: bar 10%\r[rank0]: bar 20%[rank1]: hello\n[rank0]: \r[rank0]: bar 30%\n"
    shown = io.BytesIO()
    RankStream(shown).write(dst.getvalue().encode())
    assert shown.getvalue() == b"bar 10%\rbar 20%\rbar 30%\n"


def test_ddp_warnings_and_torchrun_shutdown_lines_go_to_the_log_only():
    out = io.BytesIO()
    stream = TracebackFilter(out)
    for piece in (b"[W1201 reducer.cpp:1529] Warning: find_unused_parameters=True was specified in DDP constructor, "
                  b"but did not find any unused parameters in the forward pass. (function operator())\n",
                  b"  return Variable._execution_engine.run_backward(  # Calls into the C++ engine\n",
                  b"Epoch 1/2\n", b"\r  1/2  0G  0.7: 75% 3/4",
                  b"W1201 19:51:02.000000 11480 torch/distributed/elastic/agent/server/api.py:753] Received 2 death "
                  b"signal, shutting down workers\n",
                  b"W1201 19:51:02.100000 11480 torch/distributed/elastic/multiprocessing/api.py:1029] Sending "
                  b"process 4242 closing signal SIGTERM\n", b"done\n"):
        stream.write(piece)
    assert out.getvalue() == b"Epoch 1/2\n\r  1/2  0G  0.7: 75% 3/4\ndone\n"
