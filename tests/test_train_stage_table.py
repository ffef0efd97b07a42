"""The table of training stages: one complete record per stage, and the config's choices match it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from finechat.config import resolve_config
from finechat.errors import ConfigError
from finechat.train.stage_table import STAGES, Stage, check_supported, get_stage, stage_names
from finechat.train.train_config import GROUPS, TrainConfig

PARTS = ("read", "rows", "prepare", "trainer", "settings", "check", "sequences", "estimate_length")


def test_every_stage_the_config_accepts_has_one_record_and_no_record_is_unreachable():
    assert set(stage_names()) == set(STAGES)
    assert len(STAGES) == 8
    for name, stage in STAGES.items():
        assert stage.name == name


@pytest.mark.parametrize("name", list(STAGES))
def test_a_record_has_every_part(name):
    stage = STAGES[name]
    assert isinstance(stage, Stage)
    for part in PARTS:
        assert callable(getattr(stage, part)), part
    assert stage.summary
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(stage.uses) <= fields, set(stage.uses) - fields
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in stage.metrics.items())
    cfg = TrainConfig(stage=name, num_generations=2, per_device_train_batch_size=2)
    assert isinstance(stage.settings(cfg), dict)
    assert stage.sequences(cfg) >= 1
    assert stage.rows([]) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.name = "other"  # type: ignore[misc]


def test_records_say_what_differs():
    cfg = TrainConfig(num_generations=3, per_device_train_batch_size=3)
    assert [STAGES[n].sequences(cfg) for n in ("sft", "pretrain", "dpo", "kto", "rm", "grpo")] == [1, 1, 2, 1, 2, 3]
    assert [n for n, s in STAGES.items() if s.trl is None] == ["sft", "pretrain"]
    assert [n for n, s in STAGES.items() if not s.policy] == ["rm"]
    assert [n for n, s in STAGES.items() if not s.eval_in_training] == ["grpo"]
    assert STAGES["dpo"].settings(TrainConfig(stage="dpo", sft_weight=0.5))["loss_weights"] == [1.0, 0.5]
    assert STAGES["sft"].settings(cfg) == {}


def test_an_unknown_stage_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        get_stage("ppo")
    assert "'ppo'" in str(e.value) and all(name in str(e.value) for name in STAGES)
    with pytest.raises(ConfigError, match="stage") as e:
        resolve_config(TrainConfig, overrides=["stage=ppo"])
    assert "dpo" in str(e.value)


def test_unsupported_models_and_settings_are_refused_by_the_record():
    chatglm = SimpleNamespace(config=SimpleNamespace(model_type="chatglm"))
    with pytest.raises(ConfigError, match="stage rm does not work with the native ChatGLM-6B.*dpo, orpo, simpo, kto"):
        check_supported(STAGES["rm"], TrainConfig(stage="rm"), chatglm)
    check_supported(STAGES["dpo"], TrainConfig(stage="dpo"), chatglm)
    check_supported(STAGES["sft"], TrainConfig(method="ptuning", sft_weight=1.0), chatglm)
    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    with pytest.raises(ConfigError, match="sft_weight"):
        check_supported(STAGES["kto"], TrainConfig(stage="kto", sft_weight=1.0), llama)
    with pytest.raises(ConfigError, match="ptuning"):
        check_supported(STAGES["dpo"], TrainConfig(stage="dpo", method="ptuning"), llama)
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        check_supported(STAGES["grpo"], TrainConfig(stage="grpo", per_device_train_batch_size=3), llama)


def test_the_config_is_six_named_groups_with_flat_keys():
    assert list(GROUPS) == ["model", "data", "method", "stage", "optimisation", "output"]
    names = [f.name for group in GROUPS.values() for f in dataclasses.fields(group)]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    cfg = resolve_config(TrainConfig, base={"stage": "dpo", "learning_rate": 1e-3},
                         overrides=["lora_rank=4", "output_dir=out"])
    assert cfg.group("stage")["stage"] == "dpo" and cfg.group("optimisation")["learning_rate"] == 1e-3
    assert cfg.group("method")["lora_rank"] == 4 and cfg.group("output")["output_dir"] == "out"
    with pytest.raises(ConfigError, match="lora_rnak"):
        resolve_config(TrainConfig, overrides=["lora_rnak=4"])


def test_the_config_module_imports_without_torch():
    code = ("import sys, finechat.train.train_config as c, typing; "
            "print(typing.get_args(typing.get_type_hints(c.TrainConfig)['stage'])); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'grpo'" in out.stdout
