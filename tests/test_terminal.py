"""What the terminal shows of a rank launcher's output: rank 0's stream as if it ran alone, yolosafe's own lines,
nothing else; however the pipe cuts the output into chunks."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest

from yolosafe import oom
from yolosafe.supervisor.terminal import ANSI, RankStream, TracebackFilter, ended_short

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


CONTROL = re.compile(r"(\n|\r|\x1b\[K)")


def screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: ``\r`` goes back to the line's start, ``ESC[K`` clears the rest of
    the line, other colour codes show nothing."""
    rows: list[list[str]] = [[]]
    col = 0
    for part in CONTROL.split(text):
        if part == "\n":
            rows.append([])
            col = 0
        elif part == "\r":
            col = 0
        elif part == "\x1b[K":
            del rows[-1][col:]
        elif part:
            part = ANSI.sub("", part)
            rows[-1][col:col + len(part)] = part
            col += len(part)
    return ["".join(row) for row in rows]


def dead_bars(text: str) -> list[str]:
    """The progress bars the terminal keeps short of their total."""
    return [line for line in screen(text) if ended_short(line)]


def cut_validation(capfd) -> str:
    """A real Ultralytics bar over 4 batches, an OOM at the first, the bar cut short: what the process wrote."""
    from ultralytics.utils.tqdm import TQDM

    from yolosafe.training import cutbars

    def validate() -> None:
        bar = TQDM(range(4), desc="                 Class     Images", total=4)
        for _ in bar:
            raise RuntimeError("CUDA out of memory. Tried to allocate 300.00 MiB [injected by yolosafe]")

    capfd.readouterr()
    try:
        validate()
    except RuntimeError as exc:
        assert cutbars.cut_short(exc) == 1
    out, err = capfd.readouterr()
    assert not err
    return out


def test_a_bar_an_oom_cut_short_is_marked_and_the_terminal_takes_it_off(capfd):
    out = cut_validation(capfd)
    *frames, mark, end = out.split("\n")
    assert re.search(r"Class     Images: 0% \S+ 0/4", "\n".join(frames)) and not end  # Ultralytics closed it, short
    assert mark == f"{oom.BAR_CUT_SHORT}Class Images at 0/4", out
    retry = "yolosafe: OOM in validation at epoch 1/1: val batch 8 -> 4, validated again in place\n"
    again = "\r\x1b[K                 Class     Images: 100% ━━━━ 4/4 1.2it/s 0.5s\n"
    raw = f"Epoch 1/1\n{out}{retry}{again}done\n".encode()
    for size in (1, 3, 7, len(raw)):  # however the pipe cuts it
        shown = io.BytesIO()
        stream = TracebackFilter(shown)
        for start in range(0, len(raw), size):
            stream.write(raw[start:start + size])
        stream.end()
        text = shown.getvalue().decode()
        assert screen(text) == ["Epoch 1/1", retry.strip(), again.strip("\r\x1b[K\n"), "done", ""], text
        assert oom.BAR_CUT_SHORT not in text and not dead_bars(text)
    assert dead_bars(out)  # what a dead bar is, to the check


def test_a_bar_that_ends_short_otherwise_stays():
    """A bar stopped short without the mark (a time limit, Ctrl-C) keeps its line; the next line starts below it."""
    for after in (b"yolosafe: worker stopped by SIGINT\n", b""):
        shown = io.BytesIO()
        stream = TracebackFilter(shown)
        stream.write(b"\r\x1b[K  1/2  0G  1.1: 25% \xe2\x94\x81 1/4 1.0s\n" + after)
        stream.end()
        assert screen(shown.getvalue().decode()) == ["  1/2  0G  1.1: 25% ━ 1/4 1.0s", after.decode().strip(), ""][
            : 3 if after else 2]


def test_a_bar_still_open_is_closed_by_the_mark():
    shown = io.BytesIO()
    stream = RankStream(TracebackFilter(shown))
    stream.write(b"[rank0]: \r[rank0]: \x1b[K  Class: 40% \xe2\x94\x81 2/5[rank0]: \r[rank0]: "
                 + oom.BAR_CUT_SHORT.encode() + b"Class at 2/5\n[rank0]: next\n")
    stream.end()
    assert screen(shown.getvalue().decode()) == ["next", ""]


def test_a_line_that_only_begins_like_the_mark_is_shown():
    shown = io.BytesIO()
    stream = TracebackFilter(shown)
    for piece in (b"progress", b" bar ", b"done\n"):
        stream.write(piece)
    assert shown.getvalue() == b"progress bar done\n"


def test_an_attempts_end_leaves_no_line_open():
    """A rank stopped mid-bar (the launcher stopped it after another rank's OOM): its bar goes, and any other
    unfinished line is ended, so the supervisor's next line starts a line of its own."""
    bar = b"\r\x1b[K  1/2  0G  1.1: 25% \xe2\x94\x81 1/4"
    for partial, kept in ((bar, []), (b"Ultralytics 8.4", ["Ultralytics 8.4"])):
        shown = io.BytesIO()
        stream = TracebackFilter(shown)
        stream.write(b"Epoch 1/2\n" + partial)
        stream.end()
        assert screen(shown.getvalue().decode() + "yolosafe: OOM\n") == ["Epoch 1/2", *kept, "yolosafe: OOM", ""]
