"""``finechat train`` checks every record of its data files before the model loads (finechat.train.preflight).

The model path in these runs does not exist: an error that names it would mean the model was loaded (tried)
before the data was read; the bad record's ``file:line: field`` alone, exit code 3, means it was not.
"""

from __future__ import annotations

import json

import pytest

from finechat.cli import main as cli

FAR = 5000  # the bad record's line


def _jsonl(path, good, bad, lines=FAR + 10):
    path.write_text("".join(json.dumps(bad if i == FAR else good(i)) + "\n" for i in range(1, lines + 1)))
    return path


def _train(tmp_path, capsys, data, *extra):
    code = cli(["train", f"model={tmp_path / 'no-model'}", f"data=[{data}]", f"output_dir={tmp_path / 'out'}",
                "max_steps=1", *extra])
    return code, capsys.readouterr().err.strip()


def test_a_bad_record_far_down_fails_before_the_model_loads(tmp_path, capsys):
    data = _jsonl(tmp_path / "alpaca.jsonl", lambda i: {"instruction": f"Count to {i}.", "input": "", "output": "1"},
                  {"instruction": "Count to three.", "input": ""})
    code, err = _train(tmp_path, capsys, data)
    assert code == 3 and len(err.splitlines()) == 1, err
    assert f"{data}:{FAR}: output:" in err and "no-model" not in err


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_records_are_checked_too(tmp_path, capsys, stage):
    data = _jsonl(tmp_path / "pairs.jsonl", lambda i: {"instruction": f"q{i}", "chosen": "yes", "rejected": "no"},
                  {"instruction": "q", "chosen": "yes", "rejected": ["not", "text"]})
    code, err = _train(tmp_path, capsys, data, f"stage={stage}", "per_device_train_batch_size=2")
    assert code == 3 and len(err.splitlines()) == 1, err
    assert f"{data}:{FAR}: rejected:" in err and "no-model" not in err


@pytest.mark.parametrize("setting", ["streaming=true", "on_bad_record=skip"])
def test_no_full_pass_where_the_run_streams_or_skips(tmp_path, capsys, setting):
    """``streaming: true`` reads the data once, as it trains, and ``skip`` lists what it skips: no pass first, so
    here the missing model is what stops the run."""
    data = _jsonl(tmp_path / "alpaca.jsonl", lambda i: {"instruction": f"q{i}", "output": "a"}, {"instruction": "q"})
    code, err = _train(tmp_path, capsys, data, setting)
    assert code != 0 and "no-model" in err and f":{FAR}:" not in err


def test_a_multi_stage_recipe_checks_every_stage_before_the_first_loads(tmp_path, capsys):
    import yaml

    good = _jsonl(tmp_path / "good.jsonl", lambda i: {"instruction": f"q{i}", "output": "a"}, {"instruction": "q",
                                                                                                "output": "b"}, 20)
    bad = _jsonl(tmp_path / "bad.jsonl", lambda i: {"instruction": f"q{i}", "output": "a"}, {"instruction": "q"})
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tmp_path / "no-model"), "output_dir": str(tmp_path / "run"), "continue_from": "adapter",
        "defaults": {"method": "lora", "max_steps": 1}, "stages": [{"name": "first", "data": [str(good)]},
                                                                   {"name": "second", "data": [str(bad)]}]}))
    code = cli(["train", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1, err
    assert f"{bad}:{FAR}: output:" in err and "no-model" not in err
    assert not (tmp_path / "run" / "01-first").exists()  # the first stage never started
