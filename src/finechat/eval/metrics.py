"""Scores for generated answers: Rouge-1/2/L and BLEU-4 exactly as ChatGLM-6B's P-Tuning v2 reports them.

The published ADGEN table of ChatGLM-6B (and LLaMA-Factory's ``do_predict``) computes, for each
(prediction, label) pair, then takes the mean over pairs:

- **Rouge-1, Rouge-2, Rouge-L**: the F-score x 100 of ``rouge_chinese.Rouge().get_scores`` on *words*:
  both texts are segmented with ``jieba.cut`` and the pieces joined by spaces. English words come out of
  jieba as words (with the spaces between them as pieces of their own, as in the original).
- **BLEU-4**: ``nltk`` ``sentence_bleu([list(label)], list(pred), smoothing_function=
  SmoothingFunction().method3)`` x 100 on *characters* (``list(text)``; a space is a character too), with
  the default uniform 4-gram weights.

Each per-example score is rounded to 4 decimals before the mean, as the original does. Where the original
crashes (rouge_chinese raises "Hypothesis is empty" for an empty or all-space prediction or label), the
example scores 0 instead, as LLaMA-Factory does; the example still counts in the mean.

Also here: perplexity from an eval loss, and the plain-text table every report prints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
EXTRA_NAMES = ("eval_loss", "perplexity")


def _jieba():
    try:
        import jieba
    except ImportError as e:  # pragma: no cover - the eval extra is part of [all]
        from finechat.errors import FinechatError

        raise FinechatError("the metrics need jieba, rouge-chinese and nltk: pip install 'finechat[eval]'") from e
    jieba.setLogLevel(60)  # silence "Building prefix dict ..." on every process start
    return jieba


def score_pair(prediction: str, label: str) -> dict[str, float]:
    """BLEU-4 (characters) and Rouge-1/2/L F (jieba words) x 100 for one pair, each rounded to 4 decimals."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    hypothesis = " ".join(jieba.cut(prediction))
    reference = " ".join(jieba.cut(label))
    scores = {}
    if hypothesis.split() and reference.split():
        result = Rouge().get_scores(hypothesis, reference)[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            scores[key] = round(result[key]["f"] * 100, 4)
    else:  # rouge_chinese raises "Hypothesis is empty" here; ChatGLM-6B's script would crash
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    with warnings.catch_warnings():
        # nltk warns about missing n-gram orders on short texts; the smoothing already handles them
        warnings.simplefilter("ignore")
        bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    scores["bleu-4"] = round(float(bleu) * 100, 4)
    return {k: scores[k] for k in METRIC_NAMES}


def compute_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean BLEU-4 and Rouge-1/2/L over the pairs (ChatGLM-6B ptuning's ``compute_metrics``), plus ``n``."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    totals = dict.fromkeys(METRIC_NAMES, 0.0)
    for prediction, label in zip(predictions, labels):
        for key, value in score_pair(prediction or "", label or "").items():
            totals[key] += value
    n = len(predictions)
    out: dict[str, float] = {k: (v / n if n else 0.0) for k, v in totals.items()}
    out["n"] = n
    out["empty_predictions"] = sum(1 for p in predictions if not (p or "").strip())
    return out


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy); None when there is no loss, inf when it overflows."""
    if loss is None or math.isnan(loss):
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def format_table(rows: dict[str, dict], columns: Iterable[str] | None = None, first: str = "model") -> str:
    """A Markdown table: one row per name, one column per metric (missing values shown as '-')."""
    columns = list(columns or [c for c in (*METRIC_NAMES, *EXTRA_NAMES, "n") if any(c in r for r in rows.values())])
    header = [first, *columns]
    body = [[name, *(_fmt(r.get(c)) for c in columns)] for name, r in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]

    def line(cells: list) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)
