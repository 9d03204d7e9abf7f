"""Signal notices: record only, chain the previous handler, main thread only, restore."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import spotckpt
from spotckpt._notices._board import LIFELINE_ENV, LifelineSource, NoticeBoard, SignalSource


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_handler_records_notice_with_deadline_and_chains() -> None:
    calls: list[int] = []
    prev = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))
    try:
        clock = FakeClock()
        board = NoticeBoard(clock)
        src = SignalSource(board, (int(signal.SIGUSR1),), grace_seconds=30)
        assert src.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert board.wait(5)
        n = board.notice
        assert n is not None and n.source == "SIGUSR1"
        assert n.received_at == 1000.0 and n.deadline == 1030.0
        clock.t = 1012.5
        assert n.seconds_left(clock) == 17.5
        assert calls == [signal.SIGUSR1]  # the previous handler still ran
        src.restore()
        assert signal.getsignal(signal.SIGUSR1) is not src._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, prev)


def test_earliest_deadline_wins() -> None:
    clock = FakeClock()
    board = NoticeBoard(clock)
    board.post("SIGTERM", 30)
    board.post("ec2", 120)
    assert board.notice.source == "SIGTERM"
    board.post("docker", 5)
    assert board.notice.source == "docker" and board.notice.deadline == 1005.0


def test_install_off_main_thread_does_nothing() -> None:
    board = NoticeBoard()
    src = SignalSource(board, (int(signal.SIGTERM),), 30)
    before = signal.getsignal(signal.SIGTERM)
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(src.install()))
    t.start()
    t.join()
    assert out == [False] and signal.getsignal(signal.SIGTERM) is before


def test_checkpointer_restores_handlers_on_close(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with spotckpt.Checkpointer({"x": 1}, local_dir=tmp_path, remote=None):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_notice_stops_loop_after_saving_and_exits_143(tmp_path: Path) -> None:
    state = {"n": 0}
    seen: list[int] = []
    try:
        with spotckpt.Checkpointer(state, local_dir=tmp_path, remote=None, every_steps=1000) as ckpt:
            for step in ckpt.steps(100):
                seen.append(step)
                state["n"] = step + 1
                if step == 6:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step
    except SystemExit as e:
        assert e.code == 143
    else:
        raise AssertionError("no SystemExit(143)")
    assert seen == list(range(7))  # step 6 finished, nothing after it
    state2 = {"n": -1}
    with spotckpt.Checkpointer(state2, local_dir=tmp_path, remote=None) as ckpt:
        assert ckpt.restored_step == 7 and state2["n"] == 7


def test_stale_handler_after_close_acts_like_the_original() -> None:
    """A framework that re-installs our handler after we closed must not make the process
    ignore the signal: the stale handler defers to the handler that was there before."""
    calls: list[int] = []
    prev = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        board = NoticeBoard()
        src = SignalSource(board, (int(signal.SIGUSR2),), 30)
        src.install()
        src.restore()
        signal.signal(signal.SIGUSR2, src._handle)  # what a framework's teardown may do
        os.kill(os.getpid(), signal.SIGUSR2)
        assert calls == [signal.SIGUSR2] and board.notice is None
    finally:
        signal.signal(signal.SIGUSR2, prev)


def test_stale_handler_with_default_original_terminates(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import os, signal, time\n"
        "from spotckpt._notices import LIFELINE_ENV, LifelineSource, NoticeBoard, SignalSource\n"
        "src = SignalSource(NoticeBoard(), (int(signal.SIGTERM),), 30); src.install(); src.restore()\n"
        "signal.signal(signal.SIGTERM, src._handle)\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('survived')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == -signal.SIGTERM and "survived" not in p.stdout


def test_sigint_as_a_notice_does_not_chain_to_keyboard_interrupt() -> None:
    """SIGINT configured as a notice (as `spotckpt run` configures its child) is a notice,
    not a KeyboardInterrupt in the middle of the interruption save."""
    # Python's own SIGINT handler, whatever the suite inherited: a shell starts background
    # jobs with SIGINT ignored, and Python then keeps SIG_IGN (a `make test &` failed here).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_as_a_notice()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _sigint_as_a_notice() -> None:
    board = NoticeBoard()
    src = SignalSource(board, (int(signal.SIGTERM), int(signal.SIGINT)), 30)
    src.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert board.wait(5) and board.notice.source == "SIGINT"
    finally:
        src.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_lifeline_posts_a_notice_when_the_write_end_closes() -> None:
    r, w = os.pipe()
    try:
        board = NoticeBoard()
        env = {LIFELINE_ENV: f"{r}:{os.fstat(r).st_ino}"}
        src = LifelineSource.from_env(board, 12.0, env)
        assert src is not None
        src.start()
        assert not board.wait(0.2)                   # the supervisor is alive: nothing
        os.close(w)                                  # the supervisor dies (the kernel closes it)
        w = -1
        assert board.wait(5)
        assert board.notice.source == "supervisor-gone"
        src.stop()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_lifeline_from_env_refuses_an_fd_that_is_not_the_pipe(tmp_path: Path) -> None:
    r, w = os.pipe()
    f = os.open(tmp_path / "x", os.O_CREAT | os.O_RDWR)
    try:
        ino = os.fstat(r).st_ino
        board = NoticeBoard()
        assert LifelineSource.from_env(board, 1, {LIFELINE_ENV: f"{f}:{ino}"}) is None   # a file
        assert LifelineSource.from_env(board, 1, {LIFELINE_ENV: f"{w}:{ino + 1}"}) is None  # other pipe
        assert LifelineSource.from_env(board, 1, {LIFELINE_ENV: "junk"}) is None
        assert LifelineSource.from_env(board, 1, {}) is None
        src = LifelineSource.from_env(board, 1, {LIFELINE_ENV: f"{r}:{ino}"})
        assert src is not None
        src.stop()                                   # never started: closes its own fds only
    finally:
        for fd in (r, w, f):
            os.close(fd)
