"""Preference data: every layout read and checked, bad records named by file:line, SFT masking, the CLI."""

import json
from pathlib import Path

import pytest
from tiny import make_tokenizer

from finechat.cli import main as cli_main
from finechat.data.formats import read_conversations
from finechat.data.pairs import (
    PreferencePair,
    read_preferences,
    split_answer,
    tokenize_preferences,
)
from finechat.data.preference_generate import arithmetic_records, pairs_from_sft
from finechat.data.templates import get_template
from finechat.data.tokenize import IGNORE_INDEX, TokenizeSettings, special_token_layout, tokenize_conversation
from finechat.errors import DataError

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name, fmt, n", [
    ("preference_alpaca.json", "pref-alpaca", 6), ("preference_sharegpt.json", "pref-sharegpt", 3),
    ("preference_prompt.jsonl", "pref-prompt", 4), ("preference_hh.jsonl", "pref-prompt", 3),
])
def test_each_sample_layout_reads_every_record(name, fmt, n):
    result = read_preferences(SAMPLES / name)
    assert (result.format, len(result.records), result.skipped) == (fmt, n, [])
    for pair in result.records:
        assert pair.prompt.turns[-1].role == "user" and pair.chosen.strip() != pair.rejected.strip()


def test_whole_dialogues_split_at_the_last_shared_user_turn():
    pair = read_preferences(SAMPLES / "preference_hh.jsonl").records[1]
    assert [t.role for t in pair.prompt.turns] == ["user", "assistant", "user"]
    assert pair.chosen.startswith("An octopus") and pair.rejected.startswith("I don't know")


def test_ultrafeedback_layout_drops_the_repeated_prompt():
    pair = read_preferences(SAMPLES / "preference_prompt.jsonl").records[2]
    assert pair.prompt.messages() == [{"role": "user", "content": "What is 6 times 7?"}]
    assert (pair.chosen, pair.rejected) == ("6 × 7 = 42.", "6 × 7 = 36.")


def test_kto_labels_and_pairs_as_labelled_answers():
    kto = read_preferences(SAMPLES / "kto.jsonl", kind="labelled")
    assert [r.label for r in kto.records] == [True, False] * 3
    from_pairs = read_preferences(SAMPLES / "preference_alpaca.json", kind="labelled")
    assert len(from_pairs.records) == 12 and sum(r.label for r in from_pairs.records) == 6


def test_bad_pairs_are_refused_with_file_line_or_skipped_and_listed():
    bad = SAMPLES / "bad" / "preference_bad.jsonl"
    with pytest.raises(DataError, match=r"preference_bad.jsonl:1: rejected: same text as chosen"):
        read_preferences(bad)
    result = read_preferences(bad, on_bad_record="skip")
    assert len(result.records) == 1
    assert [(line, field) for _, line, field, _ in result.skipped] == [(1, "rejected"), (2, "rejected"),
                                                                      (3, "rejected")]
    assert "empty answer" in result.skipped_table() and "missing field" in result.skipped_table()
    with pytest.raises(DataError, match=r"kto_bad_label.jsonl:2: label: expected true or false, got \"no\""):
        read_preferences(SAMPLES / "bad" / "kto_bad_label.jsonl", kind="labelled")


def test_sft_data_says_which_fields_are_missing():
    with pytest.raises(DataError, match=r"alpaca.json:2: chosen, rejected: missing: this looks like SFT data"):
        read_preferences(SAMPLES / "alpaca.json")


def test_tokenized_pair_matches_sft_masking(tokenizer):
    template = get_template(None, tokenizer)
    pair = read_preferences(SAMPLES / "preference_alpaca.json").records[0]
    prompt_ids, chosen_ids = split_answer(pair.prompt, pair.chosen, tokenizer, template,
                                          special_token_layout(tokenizer, template))
    conv = read_conversations(SAMPLES / "alpaca.json").conversations[0]
    conv.turns = pair.prompt.turns + [type(conv.turns[0])("assistant", pair.chosen)]
    sft = tokenize_conversation(conv, tokenizer, template, TokenizeSettings(cutoff_len=10 ** 6))
    trained = [t for t, lab in zip(sft["input_ids"], sft["labels"]) if lab != IGNORE_INDEX]
    assert prompt_ids == sft["input_ids"][: len(prompt_ids)]
    assert chosen_ids == trained  # the prompt is never trained, the answer exactly as SFT trains it


def test_a_prompt_with_no_room_under_cutoff_is_counted_and_listed(tokenizer):
    template = get_template(None, tokenizer)
    pairs = read_preferences(SAMPLES / "preference_alpaca.json").records
    longest_prompt = max(len(split_answer(p.prompt, p.chosen, tokenizer, template, ([], []))[0]) for p in pairs)
    rows, stats = tokenize_preferences(pairs, tokenizer, template, cutoff_len=longest_prompt)
    assert len(rows) + len(stats.no_room) == len(pairs) and stats.no_room
    assert "no room for an answer" in stats.summary() and pairs[0].where.split(":")[0] in stats.summary()
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= longest_prompt
               for r in rows)


def test_pairs_from_sft_rule_numbers_corrupts_only_the_result():
    from finechat.data.formats import parse_alpaca

    convs = [parse_alpaca(r) for r in arithmetic_records(20, seed=3)]
    pairs, left_out = pairs_from_sft(convs, "numbers", seed=0)
    assert len(pairs) == 20 and left_out == []
    for p in pairs:
        assert isinstance(p, PreferencePair) and p.chosen != p.rejected
        assert p.chosen.split("=")[0] == p.rejected.split("=")[0]  # same question, a different result
    assert pairs_from_sft(convs, "numbers", seed=0)[0][0].rejected == pairs[0].rejected  # deterministic


def test_pairs_rule_operands_miscopies_the_question_with_right_arithmetic_and_mixed_alternates():
    from fractions import Fraction

    from finechat.data.formats import parse_alpaca
    from finechat.tools.calculator import evaluate

    convs = [parse_alpaca(r) for r in arithmetic_records(20, seed=3)]
    pairs, left_out = pairs_from_sft(convs, "operands", seed=0)
    assert len(pairs) == 20 and left_out == []
    for p in pairs:
        question, result = p.rejected.rstrip("。.").split(" = ")
        assert question != p.chosen.split(" = ")[0]  # another question ...
        assert Fraction(evaluate(question.replace("×", "*"))) == Fraction(result)  # ... worked out right
    mixed, _ = pairs_from_sft(convs, "mixed", seed=0)
    kinds = ["operands" if p.rejected.split(" = ")[0] != p.chosen.split(" = ")[0] else "numbers" for p in mixed]
    assert kinds == ["numbers", "operands"] * 10
    no_statement = [parse_alpaca({"instruction": "Say hi", "output": "Hi there, 3 times."})]
    assert pairs_from_sft(no_statement, "operands")[1][0][1] == "no 'a op b = c' in the answer for rule operands"


def test_arithmetic_questions_are_distinct_and_never_a_held_out_one(tmp_path, capsys):
    held = SAMPLES / "preference" / "arithmetic_heldout.jsonl"
    held_questions = {json.loads(line)["instruction"] for line in held.read_text(encoding="utf-8").splitlines()}
    out = tmp_path / "sums.jsonl"
    # seed 2 is the seed the held-out set was written with: without --exclude it starts with the same questions
    assert cli_main(["data", "generate", "arithmetic", "--n", "40", "--seed", "2", "--out", str(out),
                     "--exclude", str(held)]) == 0
    assert "none of the 64 questions" in capsys.readouterr().out
    questions = [json.loads(line)["instruction"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(questions) == len(set(questions)) == 40 and not set(questions) & held_questions
    assert {r["instruction"] for r in arithmetic_records(64, seed=2)} == held_questions
    with pytest.raises(DataError, match="different arithmetic questions"):
        arithmetic_records(30, seed=0, max_operand=2)  # 26 questions exist with first operands of 2


def test_shipped_held_out_prompts_are_not_in_the_training_files():
    folder = SAMPLES / "preference"

    def questions(name: str) -> set[str]:
        rows = [json.loads(line) for line in (folder / name).read_text(encoding="utf-8").splitlines()]
        return {r["instruction"] if "instruction" in r else r["prompt"][-1]["content"] for r in rows}

    held = questions("arithmetic_heldout.jsonl") | questions("arithmetic_pairs_heldout.jsonl") \
        | questions("arithmetic_pairs_rm_heldout.jsonl")
    for name in ("arithmetic_sft.jsonl", "arithmetic_pairs.jsonl", "arithmetic_prompts.jsonl"):
        assert not questions(name) & held, name


def test_cli_convert_preview_stats_and_pairs(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "hh.json"
    assert cli_main(["data", "convert", str(SAMPLES / "preference_hh.jsonl"), "--to", "pref-alpaca", str(out)]) == 0
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 3
    assert read_preferences(out).format == "pref-alpaca"
    capsys.readouterr()
    assert cli_main(["data", "preview", str(SAMPLES / "preference_sharegpt.json"), "--model", str(tiny_model_dir),
                     "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "chosen (" in shown and "rejected (" in shown and "It boils at 50" in shown
    assert cli_main(["data", "stats", str(SAMPLES / "preference_prompt.jsonl"), "--model", str(tiny_model_dir),
                     "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out)
    assert numbers["pairs"] == 4 and numbers["format"] == "pref-prompt"
    pairs = tmp_path / "pairs.jsonl"
    assert cli_main(["data", "pairs", str(SAMPLES / "alpaca.json"), "--rule", "swap", "--out", str(pairs)]) == 0
    assert len(read_preferences(pairs).records) == len(read_conversations(SAMPLES / "alpaca.json").conversations)
    assert cli_main(["data", "stats", str(SAMPLES / "bad" / "preference_bad.jsonl"), "--model",
                     str(tiny_model_dir)]) == 3
    assert "preference_bad.jsonl:1" in capsys.readouterr().err
