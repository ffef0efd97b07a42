"""Atomic checkpoints: SIGKILL mid-save leaves only complete ones, auto-resume matches an uninterrupted run,
rotation keeps the newest and the best."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finechat.errors import ConfigError
from finechat.train import checkpoints
from finechat.train.recipe import run_training
from finechat.train.train_config import TrainConfig


def fake_checkpoint(out: Path, step: int, history: list[dict]) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    (folder / "finechat_run.json").write_text("{}")
    return folder


def test_rotation_never_removes_the_newest_or_the_best(tmp_path):
    history = [{"step": 10, "eval_loss": 2.0}, {"step": 20, "eval_loss": 1.0}, {"step": 30, "eval_loss": 1.5},
               {"step": 40, "eval_loss": 1.7}]
    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step, [e for e in history if e["step"] <= step])
    assert checkpoints.best_checkpoint(tmp_path).name == "checkpoint-20"
    checkpoints.rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-40"]
    checkpoints.rotate_checkpoints(tmp_path, 1)  # the limit cannot go below newest + best
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-40"]


def test_incomplete_folders_are_ignored_and_cleaned(tmp_path):
    fake_checkpoint(tmp_path, 5, [])
    (tmp_path / "checkpoint-9").mkdir()  # e.g. written by a tool that saves in place and was killed
    (tmp_path / ".saving" / "checkpoint-10").mkdir(parents=True)
    assert checkpoints.latest_checkpoint(tmp_path).name == "checkpoint-5"
    checkpoints.clean_incomplete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    rows = [{"instruction": f"Say the number {i} in words.", "input": "", "output": f"It is number {i}."}
            for i in range(24)]
    path.write_text(json.dumps(rows))
    return path


def settings(tiny_model_dir, data_file, out, **kw):
    s = dict(model=str(tiny_model_dir), data=[str(data_file)], output_dir=str(out), max_steps=8, save_steps=2,
             logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, report_to=["none"], seed=7,
             lora_target=["q_proj", "v_proj"], save_total_limit=2, template="alpaca")
    s.update(kw)
    return s


def test_sigkill_mid_save_then_auto_resume_matches_an_uninterrupted_run(tiny_model_dir, data_file, tmp_path):
    reference = run_training(TrainConfig(**settings(tiny_model_dir, data_file, tmp_path / "ref")))
    ref_losses = {e["step"]: e["loss"] for e in reference.log_history if "loss" in e}

    out = tmp_path / "killed"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings(tiny_model_dir, data_file, out)))
    proc = subprocess.Popen([sys.executable, "-m", "finechat", "train", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        # kill -9 while the second save is being written (its staging folder exists)
        while not ((out / "checkpoint-2").is_dir() and (out / ".saving").exists()):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    # only complete checkpoints are visible
    for folder in out.glob("checkpoint-*"):
        assert checkpoints.is_complete(folder), sorted(p.name for p in folder.iterdir())
    assert checkpoints.latest_checkpoint(out) is not None

    # a plain rerun refuses to train over the checkpoints; auto resumes from the newest complete one
    with pytest.raises(ConfigError, match="resume_from_checkpoint=auto"):
        run_training(TrainConfig(**settings(tiny_model_dir, data_file, out)))
    resumed = run_training(TrainConfig(**settings(tiny_model_dir, data_file, out, resume_from_checkpoint="auto")))
    assert resumed.resumed_from is not None
    assert not (out / ".saving").exists()
    losses = {e["step"]: e["loss"] for e in resumed.log_history if "loss" in e}
    assert losses[8] == pytest.approx(ref_losses[8], rel=1e-3, abs=1e-3)
    assert resumed.global_step == 8
    # save_total_limit 2 kept the newest two (no eval: the newest is also "best")
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
