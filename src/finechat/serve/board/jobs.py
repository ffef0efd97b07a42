"""The board's jobs (train runs, evaluations, exports): a queue of ``finechat`` child processes whose state lives
in their own folders, so a board restart or a browser reload finds every job where it was.

Each job is a folder in the workspace (a run's ``output_dir``, ``evals/NAME``, ``exports/NAME``) holding
``board_job.json`` (the argument list, attempt, pid), ``board.log`` and, once the process ended,
``board_exit.json`` (written by :mod:`finechat.serve.board.runner`). The state is read from these files:

queued (waiting for a free slot) -> running (its runner process is alive) -> finished | failed | stopped.

A scheduler thread starts queued jobs ``max_running`` at a time, oldest first. Stop sends SIGTERM to the
job's process group; resume queues the same run again with ``resume_from_checkpoint=auto``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from finechat.config import load_yaml
from finechat.errors import FinechatError
from finechat.files import atomic_file, read_json, write_json_atomic
from finechat.serve.board.runner import EXIT_FILE, JOB_FILE, LOG_FILE
from finechat.serve.board.workspace import Workspace
from finechat.serve.schemas import ApiError
from finechat.train.checkpoints import list_checkpoints

TRAIN_LOG, TRAIN_RESULTS, TRAIN_YAML = "train_log.jsonl", "train_results.json", "board_train.yaml"
# tqdm's progress line, as the Trainer prints it: " 3/4 [00:10<00:03, 3.2s/it]"
PROGRESS_RE = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
DONE = ("finished", "failed", "stopped")


class Jobs:
    """The workspace's jobs: create, start (through the queue), stop, resume, and their state from disk."""

    def __init__(self, ws: Workspace, max_running: int = 1, poll_seconds: float = 0.5):
        self.ws, self.max_running, self.poll_seconds = ws, max_running, poll_seconds
        self._jobs_lock = threading.RLock()
        self._children: dict[str, subprocess.Popen] = {}  # job id -> runner started by this board
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the scheduler --------------------------------------------------------------------------------
    def start_scheduler(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="finechat-board-jobs", daemon=True)
            self._thread.start()

    def stop_scheduler(self) -> None:
        """Stop scheduling (the board is shutting down); running jobs go on and are found again later."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001  one bad job folder must not stop the queue
                print(f"finechat board: scheduler: {type(e).__name__}: {e}", file=sys.stderr)
            self._stop.wait(self.poll_seconds)

    def tick(self) -> None:
        """Reap ended runners, then start queued jobs while there is a free slot."""
        with self._jobs_lock:
            for job_id, child in list(self._children.items()):
                if child.poll() is not None:
                    del self._children[job_id]
            jobs = self.list()
            running = sum(1 for j in jobs if j["state"] == "running")
            for job in sorted((j for j in jobs if j["state"] == "queued"), key=lambda j: j["queued_at"]):
                if running >= self.max_running:
                    break
                self._launch(job["id"])
                running += 1

    # -- jobs -----------------------------------------------------------------------------------------
    def folder(self, job_id: str, param: str = "run") -> Path:
        path = self.ws.resolve(job_id, param)
        if not (path / JOB_FILE).is_file():
            raise ApiError(404, f"{param}: no job {job_id!r} in the workspace", param=param, code="not_found")
        return path

    def create(self, kind: str, folder: Path, argv: list[str], title: str, param: str,
               extra: dict | None = None, files: dict[str, str] | None = None) -> dict:
        """Queue a new job in ``folder``; a folder already used by a job, or holding files, is a 409 naming
        ``param``."""
        with self._jobs_lock:
            if (folder / JOB_FILE).is_file():
                state = self.state(folder)["state"]
                raise ApiError(409, f"{param}: {self.ws.relative(folder)} is already used by a {state} job; choose "
                                    "another folder" + (" or resume that run" if kind == "train" else ""),
                               param=param, code="already_used")
            if folder.exists() and any(folder.iterdir()):
                raise ApiError(409, f"{param}: {self.ws.relative(folder)} already holds files; choose another "
                                    "folder", param=param, code="already_used")
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in (files or {}).items():
                with atomic_file(folder / name) as fh:
                    fh.write(text)
            job = {"id": self.ws.relative(folder), "kind": kind, "title": title, "argv": argv, "attempt": 1,
                   "status": "queued", "created": time.time(), "queued_at": time.time(), "pid": None,
                   "extra": extra or {}}
            write_json_atomic(folder / JOB_FILE, job)
        self.tick()
        return self.state(folder)

    def _launch(self, job_id: str) -> None:
        folder = self.ws.resolve(job_id, "run")
        job = read_json(folder / JOB_FILE)
        runner = [sys.executable, "-m", "finechat.serve.board.runner", str(folder), str(job["attempt"])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [_src_root(), os.environ.get("PYTHONPATH")]
                                                          if p)}
        child = subprocess.Popen(runner, cwd=self.ws.root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        self._children[job_id] = child
        job.update(status="running", pid=child.pid, started=time.time())
        write_json_atomic(folder / JOB_FILE, job)

    def stop(self, job_id: str) -> dict:
        """Stop a running job (SIGTERM to its process group) or take a queued one off the queue."""
        with self._jobs_lock:
            folder = self.folder(job_id)
            state = self.state(folder)
            if state["state"] == "queued":
                write_json_atomic(folder / EXIT_FILE, {"attempt": state["attempt"], "returncode": None,
                                                       "stopped": True, "ended": time.time()})
            elif state["state"] == "running":
                try:
                    os.killpg(state["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass
            else:
                raise ApiError(409, f"run: {job_id} is {state['state']}; only a queued or running job can be "
                                    "stopped", param="run", code="not_running")
        return self.wait_state(folder, lambda s: s["state"] != "running", timeout=10)

    def resume(self, job_id: str) -> dict:
        """Queue a stopped or failed training run again, continuing from its newest checkpoint."""
        with self._jobs_lock:
            folder = self.folder(job_id)
            state = self.state(folder)
            if state["kind"] != "train":
                raise ApiError(409, f"run: {job_id} is a {state['kind']} job; only training runs resume", param="run",
                               code="not_resumable")
            if state["state"] not in ("stopped", "failed"):
                raise ApiError(409, f"run: {job_id} is {state['state']}; only a stopped or failed run resumes",
                               param="run", code="not_resumable")
            job = read_json(folder / JOB_FILE)
            argv = [a for a in job["argv"] if not a.startswith("resume_from_checkpoint=")]
            job.update(argv=argv + ["resume_from_checkpoint=auto"], attempt=job["attempt"] + 1, status="queued",
                       queued_at=time.time(), pid=None)
            write_json_atomic(folder / JOB_FILE, job)
        self.tick()
        return self.state(folder)

    def list(self) -> list[dict]:
        """Every job in the workspace (a job folder is found by its ``board_job.json``), newest first."""
        found = []
        for pattern in (f"*/{JOB_FILE}", f"*/*/{JOB_FILE}", f"*/*/*/{JOB_FILE}"):
            for path in self.ws.root.glob(pattern):
                try:
                    found.append(self.state(path.parent))
                except (OSError, ValueError, KeyError, FinechatError):
                    continue  # a job file cut short or edited by hand: left out, the rest still listed
        return sorted(found, key=lambda j: -j["created"])

    def state(self, folder: Path) -> dict:
        """A job's record and its state, read from its folder."""
        job = read_json(folder / JOB_FILE)
        ended = _read_exit(folder, job["attempt"])
        if ended is not None:
            state = "stopped" if ended["stopped"] else "finished" if ended["returncode"] == 0 else "failed"
        elif job["status"] == "queued":
            state = "queued"
        elif _alive(job.get("pid"), folder):
            state = "running"
        else:
            state = "failed"  # its runner is gone without a record (killed with the machine, kill -9)
        out = {k: job.get(k) for k in ("id", "kind", "title", "argv", "attempt", "created", "queued_at", "pid",
                                        "started")}
        out.update(state=state, returncode=ended and ended["returncode"], ended=ended and ended["ended"],
                   command="finechat " + " ".join(job["argv"]), extra=job.get("extra", {}))
        return out

    def detail(self, job_id: str) -> dict:
        """A job's state with its progress, loss points, checkpoints and the end of its log."""
        folder = self.folder(job_id)
        out = self.state(folder)
        log_tail = _tail(folder / LOG_FILE, 16_000)
        out["log"] = log_tail[-6000:]
        out["progress"] = _progress(log_tail)
        if out["kind"] == "train":
            out["points"] = _points(folder / TRAIN_LOG)
            out["checkpoints"] = [self.ws.relative(p) for p in list_checkpoints(folder)]
            if (folder / TRAIN_YAML).is_file():
                out["config"] = load_yaml(folder / TRAIN_YAML)  # "load its settings" into the form
            if (folder / TRAIN_RESULTS).is_file() and out["state"] == "finished":
                out["results"] = read_json(folder / TRAIN_RESULTS)
            if out["progress"] is None and out["points"]["train"]:
                out["progress"] = {"step": out["points"]["train"][-1][0], "total": None, "elapsed": None, "eta": None}
        return out

    def wait_state(self, folder: Path, done: Any, timeout: float) -> dict:
        deadline = time.time() + timeout
        state = self.state(folder)
        while not done(state) and time.time() < deadline:
            time.sleep(0.1)
            self.tick()
            state = self.state(folder)
        return state


def _src_root() -> str:
    """The folder holding this ``finechat`` package, so the runner imports the same code the board runs."""
    return str(Path(__file__).resolve().parents[3])


def _read_exit(folder: Path, attempt: int) -> dict | None:
    path = folder / EXIT_FILE
    if not path.is_file():
        return None
    try:
        ended = read_json(path)
    except (OSError, ValueError, FinechatError):
        return None
    return ended if ended.get("attempt") == attempt else None


def _alive(pid: int | None, folder: Path) -> bool:
    """Whether ``pid`` is a live runner of this job (a reused pid running something else is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return str(folder).encode() in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _tail(path: Path, size: int) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - size))
        return fh.read().decode("utf-8", errors="replace")


def _progress(log_tail: str) -> dict | None:
    """The last progress line of the log: step, total, elapsed and ETA (as tqdm printed them)."""
    matches = PROGRESS_RE.findall(log_tail.split("=== attempt")[-1])
    if not matches:
        return None
    step, total, elapsed, eta = matches[-1]
    return {"step": int(step), "total": int(total), "elapsed": elapsed, "eta": eta}


def _points(path: Path) -> dict:
    """Train and eval loss by step from the run's ``train_log.jsonl`` (written at every logging step)."""
    train, evals = [], []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a stop
            if "loss" in entry:
                train.append([entry.get("step", 0), entry["loss"]])
            if "eval_loss" in entry:
                evals.append([entry.get("step", 0), entry["eval_loss"]])
    return {"train": train, "eval": evals}
