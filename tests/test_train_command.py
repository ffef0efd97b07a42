"""`finechat train CONFIG.yaml key=value`: estimate, licences, pretraining, TensorBoard, and torchrun (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finechat.cli import main as cli
from finechat.train.config import TrainConfig
from finechat.train.recipe import run_training


@pytest.fixture(scope="module")
def config_file(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cmd")
    data = folder / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
                                for i in range(1, 17)]))
    cfg = {"model": str(tiny_model_dir), "data": [str(data)], "max_steps": 4, "save_steps": 2, "logging_steps": 1,
           "per_device_train_batch_size": 2, "learning_rate": 0.01, "lora_dropout": 0.0, "template": "alpaca",
           "lora_target": ["q_proj", "v_proj"], "seed": 3, "output_dir": str(folder / "out")}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_estimate_prints_parameters_and_memory_without_training(config_file, capsys):
    assert cli(["train", str(config_file), "--estimate", "per_device_train_batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "batch 8" in out and "trainable parameters" in out and "estimated peak" in out
    assert not Path(yaml.safe_load(config_file.read_text())["output_dir"]).exists()
    assert cli(["train", str(config_file), "--estimate", "method=full"]) == 0
    full = capsys.readouterr().out
    assert "(100.00%)" in full


def test_flags_and_unknown_keys(config_file, capsys):
    assert cli(["train", str(config_file), "--estimate", "--lora_rank", "4", "--learning-rate", "1e-3"]) == 0
    assert cli(["train", str(config_file), "lora_rnak=4"]) == 2
    assert "unknown config key 'lora_rnak'" in capsys.readouterr().err


def test_commercial_refuses_non_commercial_data(config_file, capsys):
    code = cli(["train", str(config_file), "commercial=true", "datasets=[alpaca]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "alpaca" in err and "CC BY-NC 4.0" in err


def test_pretrain_stage_on_plain_text(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog."] * 12 + [""]), encoding="utf-8")
    result = run_training(TrainConfig(
        model=str(tiny_model_dir), stage="pretrain", method="full", data=[str(corpus)], cutoff_len=64,
        max_steps=4, save_steps=4, logging_steps=1, per_device_train_batch_size=1, learning_rate=3e-3,
        val_size=2, report_to=["tensorboard"], output_dir=str(tmp_path / "pt"),
    ))
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    assert "eval_loss" in result.metrics
    assert list((tmp_path / "pt" / "runs").rglob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "pt" / "train_results.json").read_text())
    assert summary["final_checkpoint"].endswith("checkpoint-4")


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_two_processes_match_one_process_with_double_accumulation(config_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "finechat", "train", str(config_file),
                          f"output_dir={tmp_path / 'ddp'}", "ddp_backend=gloo", "report_to=[tensorboard]"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "finechat", "train", str(config_file),
                          f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    def curve(out: Path) -> list[float]:
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        return [e["loss"] for e in state["log_history"] if "loss" in e]

    assert curve(tmp_path / "ddp") == pytest.approx(curve(tmp_path / "one"), rel=1e-3)
    # only rank 0 wrote the log, the loss curve and the TensorBoard events
    log_lines = (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()
    assert len([line for line in log_lines if '"loss"' in line]) == 4
    assert len(list((tmp_path / "ddp" / "runs").rglob("events.out.tfevents.*"))) == 1
    assert (tmp_path / "ddp" / "loss_curve.png").is_file()
    run = json.loads((tmp_path / "ddp" / "checkpoint-4" / "finechat_run.json").read_text())
    assert run["world_size"] == 2
