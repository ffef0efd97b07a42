"""Bad training input is refused before the model loads; resumed runs keep an honest log."""

from __future__ import annotations

import json

import pytest

from finechat.cli import main as cli
from finechat.config import resolve_config
from finechat.errors import ConfigError
from finechat.train.train_config import TrainConfig
from finechat.train.trainer_setup import make_callback, truncate_log


@pytest.mark.parametrize("steps", [-5, 0, -2])
def test_negative_or_zero_max_steps_is_refused(steps):
    with pytest.raises(ConfigError, match="max_steps must be > 0"):
        resolve_config(TrainConfig, overrides=[f"max_steps={steps}", "data=x.json"])


def test_max_steps_minus_one_means_epochs():
    assert resolve_config(TrainConfig, overrides=["max_steps=-1", "data=x.json"]).max_steps == -1


def test_null_unsets_an_optional_file():
    cfg = resolve_config(TrainConfig, overrides=["val_file=null", "predict_file=None", "data=x.json"])
    assert cfg.val_file is None and cfg.predict_file is None


def test_bad_max_steps_exits_2_before_loading(capsys):
    assert cli(["train", "data=x.json", "model=/no/such/model", "max_steps=-5"]) == 2
    err = capsys.readouterr().err
    assert "max_steps must be > 0" in err and "model path not found" not in err


def test_estimate_on_a_stages_recipe_prints_each_stage(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}] * 4))
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(json.dumps({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"), "continue_from": "merged",
        "defaults": {"max_steps": 2, "template": "alpaca"},
        "stages": [{"name": "one", "data": [str(data)]}, {"name": "two", "data": [str(data)], "method": "full"}],
    }))
    assert cli(["train", str(recipe), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "stage one:" in out and "stage two:" in out
    assert out.count("estimated peak") == 2 and "(100.00%)" in out  # stage two trains every parameter
    assert not (tmp_path / "out").exists()


def test_resumed_log_drops_the_steps_after_the_checkpoint(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    assert truncate_log(log, 4) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert truncate_log(log, 4) == 0


def test_a_run_started_afresh_drops_an_earlier_attempts_log(tmp_path):
    """A run stopped before its first checkpoint and started again (resume_from_checkpoint=auto finds none)
    begins at step 0: the earlier attempt's lines go, so the loss curve is the new run's alone."""
    from types import SimpleNamespace

    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n", encoding="utf-8")
    callback = make_callback(TrainConfig(output_dir=str(tmp_path), data=["x.json"]), has_eval=False)
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=0), None)
    assert log.read_text(encoding="utf-8") == ""
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)), encoding="utf-8")
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=2), None)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
