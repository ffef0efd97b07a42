import dataclasses

import pytest

from finechat.config import field, resolve_config
from finechat.errors import ConfigError


@dataclasses.dataclass
class Lora:
    r: int = field(8, help="rank")
    target_modules: list[str] = field([], help="modules")


@dataclasses.dataclass
class Cfg:
    model: str = field("default")
    learning_rate: float = field(1e-4)
    fp16: bool = field(False)
    seed: int | None = field(None)
    lora: Lora = dataclasses.field(default_factory=Lora)


def test_precedence_defaults_file_flags_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: a\nlearning_rate: 2e-2\nlora:\n  r: 4\n")
    cfg = resolve_config(Cfg, f, {"model": "b"}, ["lora.r=16", "fp16=true", "lora.target_modules=q_proj,v_proj"])
    assert cfg.model == "b"
    assert cfg.learning_rate == pytest.approx(0.02)
    assert cfg.lora.r == 16 and cfg.fp16 is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.seed is None


def test_unknown_key_in_file_names_file_and_valid_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lerning_rate: 1\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(Cfg, f)
    assert str(f) in str(e.value) and "learning_rate" in str(e.value) and "lora.r" in str(e.value)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="lora.r"):
        resolve_config(Cfg, overrides=["lora.r=abc"])
    with pytest.raises(ConfigError, match="fp16"):
        resolve_config(Cfg, overrides=["fp16=maybe"])


def test_unknown_nested_key():
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'"):
        resolve_config(Cfg, overrides=["lora.rank=3"])


def test_invalid_yaml_names_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        resolve_config(Cfg, f)


def test_a_mistyped_key_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'lerning_rate'; did you mean 'learning_rate'\?"):
        resolve_config(Cfg, overrides=["lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rr'; did you mean 'lora.r'\?"):
        resolve_config(Cfg, overrides=["lora.rr=3"])
    with pytest.raises(ConfigError) as e:
        resolve_config(Cfg, overrides=["something=1"])
    assert "did you mean" not in str(e.value)


def test_train_config_suggests_max_steps():
    from finechat.train.train_config import TrainConfig

    with pytest.raises(ConfigError, match=r"did you mean 'max_steps'\?"):
        resolve_config(TrainConfig, overrides=["max_step=3"])
