"""`finechat data convert|stats|preview|generate` run end to end on sample files and a tiny model folder."""

import json
from pathlib import Path

import pytest
from tiny import make_tokenizer

from finechat.cli import main as cli_main
from finechat.data.formats import read_conversations
from finechat.data.synthetic import generate_adgen

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """Only a tokenizer is needed: a folder with the tiny tokenizer (no weights, fast)."""
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    make_tokenizer().save_pretrained(folder)
    return folder


def test_convert_to_each_format(tmp_path, capsys):
    for fmt in ("sharegpt", "openai", "alpaca"):
        out = tmp_path / f"dolly.{fmt}.json"
        assert cli_main(["data", "convert", str(SAMPLES / "dolly.jsonl"), "--to", fmt, str(out)]) == 0
        assert "wrote 3 of 3 conversations" in capsys.readouterr().out
        assert isinstance(json.loads(out.read_text(encoding="utf-8")), list)  # .json -> one array
        assert read_conversations(out).format == fmt


def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys):
    f = tmp_path / "a.json"
    f.write_bytes((SAMPLES / "alpaca.json").read_bytes())
    assert cli_main(["data", "convert", str(f), "--to", "alpaca", str(f)]) == 2
    assert "is the input file" in capsys.readouterr().err


def test_stats_table_and_histogram(tiny_model_dir, tmp_path, capsys):
    png = tmp_path / "h.png"
    code = cli_main(["data", "stats", str(SAMPLES / "sharegpt_tools.json"), "--model", str(tiny_model_dir),
                     "--png", str(png), "--lengths", "16,64"])
    out = capsys.readouterr().out
    assert code == 0 and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    rows = dict(line.split("  ", 1) for line in out.splitlines())
    assert rows["conversations"].strip() == "2" and rows["tool turns"].strip() == "2"
    assert rows["rows over 16 tokens"].strip().startswith("2 (100.0%)")
    assert cli_main(["data", "stats", str(SAMPLES / "alpaca.json"), "--model", str(tiny_model_dir),
                     "--png", "none", "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["examples"] == 4 and numbers["tokens"]["p50"] <= numbers["tokens"]["max"]


def test_preview_marks_trained_spans(tiny_model_dir, capsys):
    code = cli_main(["data", "preview", str(SAMPLES / "openai.jsonl"), "--model", str(tiny_model_dir),
                     "--template", "chatml", "-n", "1", "--color", "never"])
    out = capsys.readouterr().out
    assert code == 0
    assert "<|im_start|>user\n怎样泡一杯绿茶？<|im_end|>\n<|im_start|>assistant\n⟦用 80 度左右的水" in out
    assert "即可。<|im_end|>⟧" in out and "trained" in out


def test_generate_adgen_is_deterministic_and_varied(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli_main(["data", "generate", "adgen", "--n", "50", "--seed", "7", "--out", str(a)]) == 0
    assert cli_main(["data", "generate", "adgen", "--n", "50", "--seed", "7", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert generate_adgen(50, seed=8) != generate_adgen(50, seed=7)
    convs = read_conversations(a).conversations
    assert len(convs) == 50 and convs[0].meta["format"] == "prompt-response"
    records = generate_adgen(300, seed=1)
    assert len({r["summary"] for r in records}) == 300  # no copy repeats
    for r in records:  # every attribute value is in the copy: the mapping is learnable
        assert r["content"].startswith("类型#")
        for pair in r["content"].split("*")[1:]:
            assert pair.split("#")[1] in r["summary"]


def test_stats_on_two_processes_equal_one(tiny_model_dir, tmp_path, capsys):
    """Two worker processes send their rows back as flat arrays, counted there without a list per row: every
    number equals one process's, down to each row's length (the histogram's percentiles) and trained tokens."""
    data = tmp_path / "adgen.jsonl"
    assert cli_main(["data", "generate", "adgen", "--n", "2500", "--seed", "3", "--out", str(data)]) == 0
    capsys.readouterr()
    numbers = []
    for procs in ("1", "2"):
        assert cli_main(["data", "stats", str(data), "--model", str(tiny_model_dir), "--png", "none", "--json",
                         "--lengths", "100,200,400", "--num-proc", procs]) == 0
        numbers.append(json.loads(capsys.readouterr().out))
    assert numbers[0] == numbers[1]
    assert numbers[0]["examples"] == 2500 and 0 < numbers[0]["over"]["200"] < 2500
    assert 0 < numbers[0]["trained_tokens"]["p50"] < numbers[0]["tokens"]["p50"]
