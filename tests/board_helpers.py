"""A board on 127.0.0.1 over a fresh workspace holding a tiny model and a sample file, for the board's tests."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
from serve_helpers import LiveServer

from finechat.serve.board.board_app import BoardSettings, create_board_app

# Batches of 8 x 8 micro-batches: a step of the tiny model takes seconds, so a test can stop a run mid-way.
SLOW_STEPS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 8, "logging_steps": 1,
              "save_steps": 1, "report_to": ["none"]}


def sample_rows(n: int = 64) -> list[dict]:
    return [{"instruction": f"Question {i}: what is {i} plus {i}? Explain in a few words.", "input": "",
             "output": f"The answer is {2 * i}. " * 6} for i in range(n)]


class Board:
    """A live board (real uvicorn on 127.0.0.1) and an HTTP client for it."""

    def __init__(self, root: Path, api_key: str | None = None, model_dir: Path | None = None):
        self.root = root
        self.workspace = root / "ws"
        models = self.workspace / "models"
        models.mkdir(parents=True, exist_ok=True)
        if model_dir is not None and not (models / "tiny").exists():
            shutil.copytree(model_dir, models / "tiny")
        self.api_key = api_key
        self.start()

    def start(self) -> None:
        recipes = self.root / "recipes"
        recipes.mkdir(exist_ok=True)
        (recipes / "tiny-lora.yaml").write_text("model: models/tiny\nmethod: lora\nlora_rank: 4\nmax_steps: 4\n",
                                                encoding="utf-8")
        self.server = LiveServer(create_board_app(self.workspace, BoardSettings(api_key=self.api_key,
                                                                               recipes=str(recipes))))
        self.url = self.server.url
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.http.close()
        self.server.stop()

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json=body)

    def job(self, job_id: str) -> dict:
        r = self.http.get("/api/job", params={"id": job_id})
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, condition, timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if condition(job):
                return job
            time.sleep(0.2)
        raise AssertionError(f"{job_id}: condition not met in {timeout}s; last state {job['state']}:\n{job['log']}")

    def stop_all(self) -> None:
        """End every job this test left running (their process groups), so nothing outlives the test."""
        for job in self.http.get("/api/jobs").json()["jobs"]:
            if job["state"] in ("running", "queued"):
                self.post("/api/jobs/stop", {"run": job["id"]})


def upload_sample(board: Board, name: str = "sample.json", rows: list | None = None, text: str | None = None) -> str:
    content = text if text is not None else json.dumps(rows or sample_rows(), ensure_ascii=False, indent=1)
    r = board.post("/api/upload", {"name": name, "content": content})
    assert r.status_code == 200, r.text
    return r.json()["path"]
