"""The interactive terminal chat, driven through a real pseudo-terminal."""

import os
import pty
import select
import signal
import subprocess
import sys
import time


def _read_until(fd, needle: bytes, timeout: float = 60.0) -> bytes:
    buf = b""
    end = time.time() + timeout
    while needle not in buf:
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {needle!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(tiny_model_dir):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "finechat", "chat", "--model", str(tiny_model_dir), "--greedy",
         "--max-new-tokens", "50000"],
        stdin=follower, stdout=follower, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    os.close(follower)
    try:
        _read_until(leader, b"You: ")
        os.write(leader, b"hello\n")
        _read_until(leader, b"Assistant: ")
        _read_until(leader, b"8")  # the tiny model's first streamed characters
        os.killpg(proc.pid, signal.SIGINT)
        out = _read_until(leader, b"You: ", timeout=30)
        assert b"[stopped]" in out
        assert proc.poll() is None  # still running: Ctrl-C stopped only the answer
        os.write(leader, b"clear\n")
        _read_until(leader, b"history cleared")
        os.write(leader, b"exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_ctrl_d_quits(tiny_model_dir):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "finechat", "chat", "--model", str(tiny_model_dir)],
        stdin=follower, stdout=follower, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    os.close(follower)
    try:
        _read_until(leader, b"You: ")
        os.write(leader, b"\x04")  # Ctrl-D at an empty prompt: end of input
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
