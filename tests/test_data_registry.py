"""The licence registry: commercial-use refusals, summaries written with runs, the licences table."""

import json

import pytest

from finechat.cli import main as cli_main
from finechat.data.catalog import (
    DATASETS,
    LICENCE_FILE,
    MODELS,
    check_commercial,
    licence_summary,
    model_entry,
    write_licence_summary,
)
from finechat.errors import ConfigError

REQUIRED_DATASETS = ["alpaca", "alpaca-zh", "adgen", "dolly-15k", "coig", "belle", "moss-003-sft",
                     "moss-003-sft-plugin", "genmedgpt-5k", "healthcaremagic-100k", "icliniq", "huatuo-cmekg",
                     "redpajama-1t"]
REQUIRED_MODELS = ["chatglm-6b", "llama", "moss-moon-003", "stablelm-base-alpha", "dolly-v2", "qwen2.5", "smollm2"]


def test_registry_has_the_known_items_with_licences():
    assert set(REQUIRED_DATASETS) <= set(DATASETS) and set(REQUIRED_MODELS) <= set(MODELS)
    assert DATASETS["alpaca"].license == "CC BY-NC 4.0" and DATASETS["alpaca"].commercial is False
    assert DATASETS["dolly-15k"].license == "CC BY-SA 3.0" and DATASETS["dolly-15k"].commercial is True
    assert DATASETS["adgen"].license == "unknown" and DATASETS["adgen"].commercial is None
    for e in list(DATASETS.values()) + list(MODELS.values()):
        assert e.license and e.where and "http" not in e.where and ".co" not in e.where


def test_commercial_run_refuses_alpaca_naming_it_and_its_licence():
    with pytest.raises(ConfigError, match=r"dataset 'alpaca' \(licence: CC BY-NC 4.0, commercial use: no\)"):
        check_commercial("default", ["alpaca"], commercial=True)
    with pytest.raises(ConfigError, match=r"dataset 'adgen' \(licence: unknown"):
        check_commercial("smollm2", ["dolly-15k", "adgen"], commercial=True)
    with pytest.raises(ConfigError, match=r"model 'llama' \(licence: LLaMA non-commercial"):
        check_commercial("llama", ["dolly-15k"], commercial=True)
    check_commercial("default", ["dolly-15k", "finechat-samples"], commercial=True)
    check_commercial("llama", ["alpaca"], commercial=False)


def test_model_folder_licence_from_finechat_files(tmp_path):
    unknown = tmp_path / "some-model"
    unknown.mkdir()
    assert model_entry(str(unknown)).license == "unknown"
    with pytest.raises(ConfigError, match="some-model"):
        check_commercial(str(unknown), ["dolly-15k"], commercial=True)
    (unknown / "finechat_source.json").write_text(json.dumps({"model": "SmolLM2-135M-Instruct"}))
    assert model_entry(str(unknown)).name == "smollm2"
    # A fine-tuned output folder inherits its base model's licence.
    run = tmp_path / "run"
    summary = write_licence_summary(run, "chatglm-6b", ["adgen", "alpaca"])
    assert json.loads((run / LICENCE_FILE).read_text())["model"]["name"] == "chatglm-6b"
    assert summary["commercial_use"] is False and summary["blocked_by"] == ["chatglm-6b", "adgen", "alpaca"]
    assert model_entry(str(run)).license == "ChatGLM-6B Model License"
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / "finechat_run.json").write_text(json.dumps({"licenses": licence_summary("llama", [])}))
    assert model_entry(str(ckpt)).commercial is False and "llama" in model_entry(str(ckpt)).note


def test_summary_verdicts():
    assert licence_summary("default", ["dolly-15k"])["commercial_use"] is True
    assert licence_summary("default", ["adgen"])["commercial_use"] is None
    assert licence_summary("default", ["adgen", "belle"])["commercial_use_text"] == "no"


def test_licenses_command_prints_a_table(capsys):
    assert cli_main(["data", "licenses"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:5] == ["kind", "name", "format", "licence", "commercial"]
    assert any(line.split()[:2] == ["dataset", "alpaca"] and "CC BY-NC 4.0" in line for line in out.splitlines())
    assert cli_main(["data", "licenses", "--kind", "model", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in rows} == {"model"} and any(r["name"] == "smollm2" for r in rows)
