"""Multi-stage recipes: three stages chain, mix general data, score forgetting, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml
from eval_helpers import PAIRS, write_alpaca

from finechat.cli import main as cli

GENERAL = [("Hello, how are you today?", "I am fine, thank you."),
           ("What is the capital of France?", "The capital of France is Paris.")]


def write_config(tmp_path, model_dir, domain_steps=3, continue_from="merged", method="lora"):
    general = write_alpaca(tmp_path / "general.jsonl", GENERAL)
    domain = write_alpaca(tmp_path / "domain.jsonl", PAIRS[:2])
    dialog = write_alpaca(tmp_path / "dialog.jsonl", PAIRS[2:])
    cfg = {
        "model": str(model_dir), "output_dir": str(tmp_path / "run"), "continue_from": continue_from,
        "defaults": {"method": method, "max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 2,
                     "cutoff_len": 64, "learning_rate": 1e-2, "logging_steps": 1, "report_to": ["none"],
                     "datasets": ["finechat-samples"], "do_eval": False},
        "eval_general": {"data": str(general), "max_new_tokens": 6},
        "stages": [
            {"name": "general", "data": [str(general)]},
            {"name": "domain", "data": [str(domain)], "max_steps": domain_steps, "save_steps": 1,
             "mix": {"data": [str(general)], "ratio": 0.5}},
            {"name": "dialog", "data": [str(dialog)]},
        ],
    }
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_adapter_continued_through_stages(tiny_model_dir, tmp_path):
    path = write_config(tmp_path, tiny_model_dir, continue_from="adapter")
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("eval_general")
    cfg["stages"] = cfg["stages"][::2]  # two stages are enough here
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    stages = json.loads((tmp_path / "run" / "stages_summary.json").read_text())["stages"]
    assert len(stages) == 2
    assert stages[1]["started_from"] == {"model": str(tiny_model_dir), "adapter": stages[0]["checkpoint"]}
    assert not (tmp_path / "run" / "01-general" / "merged").exists()


def test_bad_stage_configs_are_refused_before_training(tiny_model_dir, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model_dir)
    cfg = yaml.safe_load(path.read_text())
    cfg["stages"][2]["max_stepz"] = 3
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[2] (dialog)" in err and "max_stepz" in err
    assert not (tmp_path / "run" / "01-general").exists()
    cfg["stages"][2].pop("max_stepz")
    cfg["stages"][0]["method"] = "ptuning"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_three_stages_killed_mid_stage_resume_and_report(tiny_model_dir, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model_dir, domain_steps=30)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finechat", "train", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stage2 = tmp_path / "run" / "02-domain" / "train"
    deadline = time.time() + 300
    while time.time() < deadline and not list(stage2.glob("checkpoint-[2-9]*")):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 in the middle of stage 2
    proc.wait()
    state = json.loads((tmp_path / "run" / "stages_state.json").read_text())
    assert list(state["stages"]) == ["general"], "stage 2 should have been interrupted"
    first = json.loads((tmp_path / "run" / "01-general" / "train" / "train_results.json").read_text())

    assert cli(["train", str(path)]) == 0
    shown = capsys.readouterr().out
    for name in ("1. general", "2. domain", "3. dialog", "base (before)", "general bleu-4", "finechat-samples"):
        assert name in shown
    summary = json.loads((tmp_path / "run" / "stages_summary.json").read_text())
    stages = summary["stages"]
    assert [s["index"] for s in stages] == [1, 2, 3]
    domain = stages[1]
    assert domain["resumed_from"] and "checkpoint-" in domain["resumed_from"]
    assert domain["steps"] == 30
    # Stage 1 was not trained again.
    assert json.loads((tmp_path / "run" / "01-general" / "train" / "train_results.json").read_text()) == first
    # Each stage starts from the previous stage's merged model.
    assert stages[0]["started_from"]["model"] == str(tiny_model_dir)
    assert stages[1]["started_from"]["model"].endswith("01-general/merged")
    assert stages[2]["started_from"]["model"].endswith("02-domain/merged")
    assert (tmp_path / "run" / "01-general" / "merged" / "model.safetensors").is_file()
    assert all("final_loss" in s["metrics"] and "general" in s for s in stages)
    assert domain["mix"]["domain_examples"] == 2 and domain["mix"]["general_examples"] == 2
    assert summary["general_before"]["n"] == 2
    assert summary["licenses"]["datasets"][0]["name"] == "finechat-samples"
    # Finished: a second run skips every stage.
    assert cli(["train", str(path)]) == 0
    assert "already done" in capsys.readouterr().err


def test_general_check_on_lm_eval_tasks_before_and_after(tiny_model_dir, tmp_path, capsys):
    """eval_general: {tasks: [...]} scores the base and each stage on lm-evaluation-harness tasks."""
    import pytest

    pytest.importorskip("lm_eval")
    task = os.path.join(os.path.dirname(__file__), "..", "data", "tasks", "finechat_mc", "finechat_mc_en.yaml")
    path = write_config(tmp_path, tiny_model_dir)
    cfg = yaml.safe_load(path.read_text())
    cfg["eval_general"] = {"tasks": [str(tmp_path / "missing.yaml")], "limit": 4, "batch_size": 4}
    cfg["stages"] = cfg["stages"][:1]
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 2  # a task that cannot load is refused before training
    assert "missing.yaml" in capsys.readouterr().err and not (tmp_path / "run" / "01-general").exists()
    cfg["eval_general"]["tasks"] = [task]
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "stages_summary.json").read_text())
    before, after = summary["general_before"], summary["stages"][0]["general"]
    assert 0 <= before["finechat_mc_en acc"] <= 1 and 0 <= after["finechat_mc_en acc"] <= 1
    assert "general finechat_mc_en acc" in (tmp_path / "run" / "stages_summary.md").read_text()
    assert (tmp_path / "run" / "01-general" / "general_eval" / "lm_eval_results.json").is_file()
