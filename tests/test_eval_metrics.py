"""The metrics equal ChatGLM-6B ptuning's compute_metrics, written out independently here."""

import json

import numpy as np
import pytest

from finechat.eval.metrics import compute_metrics, format_table, perplexity, score_pair

PAIRS = [
    ("这件外套采用简约的设计，白色的颜色搭配精致的刺绣图案。", "这件外套采用简约的设计，白色搭配刺绣，时尚又大方。"),
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("这款T恤 uses cotton，穿着舒适 and breathable。", "这款T恤采用纯棉面料，穿着舒适透气。"),
    ("", "一件白色的简约外套。"),
    ("   ", "空白的预测"),
    ("完全不同的句子", "风格#简约"),
    ("，。！", "标点"),
    ("a", "a"),
]


def reference(preds, labels):
    """ChatGLM-6B ptuning main.py compute_metrics, with LLaMA-Factory's zero for empty texts."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    scores = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels):
        hypothesis = list(jieba.cut(pred))
        ref = list(jieba.cut(label))
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(ref).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(ref))[0]
        for k, v in result.items():
            scores[k].append(round(v["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def test_metrics_equal_reference_formula():
    preds, labels = [p for p, _ in PAIRS], [lab for _, lab in PAIRS]
    ours = compute_metrics(preds, labels)
    ref = reference(preds, labels)
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert round(ours[key], 4) == round(ref[key], 4), key
    assert ours["n"] == len(PAIRS)
    assert ours["empty_predictions"] == 2


@pytest.mark.parametrize("pred,label", PAIRS)
def test_each_pair_equals_reference(pred, label):
    ours = score_pair(pred, label)
    ref = reference([pred], [label])
    assert {k: round(v, 4) for k, v in ours.items()} == {k: round(v, 4) for k, v in ref.items()}


def test_identical_text_scores_100_and_empty_scores_0():
    same = score_pair("这件外套简约大方，时尚百搭。", "这件外套简约大方，时尚百搭。")
    assert same["bleu-4"] == pytest.approx(100, abs=1e-3)
    assert same["rouge-l"] == pytest.approx(100, abs=1e-3)
    assert score_pair("", "有内容") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert score_pair("有内容", "")["rouge-1"] == 0.0


def test_bleu_is_on_characters_and_rouge_on_words():
    # Same characters in another word order: character 4-grams change, jieba words mostly stay.
    a = score_pair("白色外套", "外套白色")
    assert a["rouge-1"] == pytest.approx(100, abs=1e-3)
    assert a["bleu-4"] < 50


def test_perplexity_and_table():
    assert perplexity(0.0) == 1.0
    assert perplexity(None) is None
    assert perplexity(1e6) == float("inf")
    table = format_table({"before": {"bleu-4": 1.234, "rouge-l": 5.0}, "after": {"bleu-4": 20.5, "rouge-l": 30.0}})
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "model"
    assert "20.50" in lines[3] and "1.23" in lines[2]
    json.dumps(compute_metrics(["a"], ["a"]))  # plain JSON


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        compute_metrics(["a"], [])
