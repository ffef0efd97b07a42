"""The ChatGPT-pipeline report of one model: held-out preference accuracy, reward-model score, rule rewards.

Used by multi-stage runs (``eval_alignment:`` in a ``stages:`` file, see finechat.train.stages) after each
stage, and before the first one for the base model:

- ``preference accuracy``: share of held-out pairs where the model's log-ratio against the model the stage
  started from prefers the chosen answer (finechat.eval.preference; 0.5 = chance, the base scores exactly
  that); ``logp accuracy``: share where the model itself gives the chosen answer the higher log-probability;
- ``rm score``: the stage-rm reward model's mean score of the model's greedy answers to held-out prompts;
- ``correct`` / ``calculator``: the GRPO rule rewards of those answers (finechat.train.rewards): right against
  the reference answer, and arithmetic that the calculator tool confirms.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from finechat.config import field
from finechat.data.preference import read_preferences
from finechat.data.templates import get_template
from finechat.eval.predict import generate_answers, load_examples
from finechat.eval.preference import preference_accuracy
from finechat.eval.reward import load_reward_model, pairwise_accuracy, score_answers
from finechat.generate.engine import ChatModel, GenerationSettings
from finechat.models.load import load_adapter, load_model_and_tokenizer, log
from finechat.train.rewards import answer_format, calculator, correct


@dataclasses.dataclass
class AlignmentEvalConfig:
    """Held-out data scored after every stage of a preference pipeline."""

    pairs: str | None = field(None, help="held-out preference pairs (preference accuracy)")
    prompts: str | None = field(None, help="held-out prompts with reference answers (rm score, rule rewards)")
    max_samples: int | None = field(32, help="score only the first N pairs / prompts")
    max_new_tokens: int = field(48, help="answer length limit")
    batch_size: int = field(8, help="examples generated together")
    template: str | None = field(None, help="prompt template (default: the tokenizer's)")


def _load(model: str, adapter: str | None) -> tuple[Any, Any]:
    policy, tokenizer, _ = load_model_and_tokenizer(model, dtype="float32")
    return (load_adapter(policy, adapter) if adapter else policy), tokenizer


def alignment_eval(model: str, adapter: str | None, started_from: tuple[str, str | None] | None,
                   acfg: AlignmentEvalConfig, out_dir: Path, reward_model: str | None) -> dict:
    """The report of ``model`` (+ ``adapter``) against the model it started from (None: itself)."""
    policy, tokenizer = _load(model, adapter)
    template = get_template(acfg.template, tokenizer, getattr(policy.config, "model_type", None))
    out: dict[str, Any] = {}
    if acfg.pairs:
        pairs = read_preferences(acfg.pairs).records[: acfg.max_samples or None]
        if started_from is None:
            reference = policy  # the base: its own reference, so exactly chance
        elif started_from == (model, None) and adapter:
            reference = None  # the same base under the adapter: switch the adapter off
        else:
            reference = _load(*started_from)[0]
        out.update(preference_accuracy(policy, tokenizer, template, pairs, reference=reference))
        del reference
    if acfg.prompts:
        examples = load_examples(acfg.prompts, "auto", acfg.max_samples)
        bot = ChatModel(policy, tokenizer, template)
        prompts = [e.messages for e in examples]
        answers = generate_answers(bot, prompts, GenerationSettings(greedy=True, max_new_tokens=acfg.max_new_tokens),
                                   acfg.batch_size, progress=False)
        texts = [e.query for e in examples]
        out["correct"] = sum(correct(texts, answers, gold=[e.label for e in examples])) / len(answers)
        out["calculator"] = sum(calculator(texts, answers)) / len(answers)
        out["format"] = sum(answer_format(texts, answers)) / len(answers)
        if reward_model:
            rm = load_reward_model(reward_model)
            out["rm score"] = score_answers(rm, prompts, answers, batch_size=acfg.batch_size)["rm score"]
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "answers.jsonl", "w", encoding="utf-8") as fh:
            for e, a in zip(examples, answers):
                fh.write(json.dumps({"prompt": e.query, "predict": a, "label": e.label}, ensure_ascii=False) + "\n")
    log("alignment eval: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def reward_model_accuracy(reward_model: str, acfg: AlignmentEvalConfig) -> dict:
    """A stage-rm checkpoint's pairwise accuracy and margin on the held-out pairs."""
    if not acfg.pairs:
        return {}
    pairs = read_preferences(acfg.pairs).records[: acfg.max_samples or None]
    return pairwise_accuracy(load_reward_model(reward_model), pairs, acfg.batch_size)
