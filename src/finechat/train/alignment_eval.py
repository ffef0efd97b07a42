"""The ChatGPT-pipeline report of one model: held-out preference accuracy, reward-model score, rule rewards.

Used by multi-stage runs (``eval_alignment:`` in a ``stages:`` file, see finechat.train.stages) after each
stage, and before the first one for the base model:

- ``preference accuracy``: share of held-out pairs where the model's log-ratio against the model the stage
  started from prefers the chosen answer (finechat.eval.pair_accuracy; 0.5 = chance, the base scores exactly
  that); ``logp accuracy``: share where the model itself gives the chosen answer the higher log-probability;
- ``rm score``: the stage-rm reward model's mean score of the model's greedy answers to held-out prompts;
- ``correct`` / ``calculator``: the GRPO rule rewards of those answers (finechat.train.grpo_rewards): right against
  the reference answer, and arithmetic that the calculator tool confirms.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from finechat.config import field
from finechat.console import log
from finechat.data.pairs import read_preferences
from finechat.eval.pair_accuracy import disabled_adapter, pair_logps, preference_scores
from finechat.eval.predict import generate_answers, load_examples
from finechat.eval.reward_scoring import RewardModel, load_reward_model, pairwise_accuracy, score_answers
from finechat.files import write_jsonl_atomic
from finechat.generate.contract import ChatEngine
from finechat.generate.engine import GenerationSettings
from finechat.models.resolve import load_adapter, load_model_and_tokenizer
from finechat.train.grpo_rewards import answer_format, calculator, correct


@dataclasses.dataclass
class AlignmentEvalConfig:
    """Held-out data scored after every stage of a preference pipeline."""

    pairs: str | None = field(None, help="held-out preference pairs (preference accuracy)")
    rm_pairs: str | None = field(None, help="held-out pairs for the reward model's accuracy, all of them (default: "
                                            "pairs); a reward model scores a pair in one pass, so this set can be "
                                            "larger and its accuracy less noisy")
    prompts: str | None = field(None, help="held-out prompts with reference answers (rm score, rule rewards)")
    max_samples: int | None = field(32, help="score only the first N pairs / prompts")
    max_new_tokens: int = field(48, help="answer length limit")
    batch_size: int = field(8, help="examples generated together")
    template: str | None = field(None, help="prompt template (default: the tokenizer's)")


Key = tuple[str, str | None]  # (model, adapter) of a scored model


class AlignmentScorer:
    """The held-out data of a pipeline, read once, and what scoring it needs from stage to stage.

    Each stage's reference is the model it started from, which the row before it scored already: the answer
    log-probabilities of every scored model are kept, so a reference is neither loaded nor run again. The reward
    model is loaded once for all the rows that use it.
    """

    def __init__(self, acfg: AlignmentEvalConfig):
        self.acfg = acfg
        self.pairs = read_preferences(acfg.pairs).records[: acfg.max_samples or None] if acfg.pairs else []
        self.rm_pairs = read_preferences(acfg.rm_pairs).records if acfg.rm_pairs else self.pairs
        self.examples = load_examples(acfg.prompts, "auto", acfg.max_samples) if acfg.prompts else []
        self.logps: dict[Key, tuple[list[float], list[float]]] = {}
        self._reward_model: tuple[str, RewardModel] | None = None

    def reward_model(self, folder: str) -> RewardModel:
        """The stage-rm checkpoint ``folder``, loaded on first use."""
        if self._reward_model is None or self._reward_model[0] != folder:
            self._reward_model = (folder, load_reward_model(folder))
        return self._reward_model[1]

    def _reference_logps(self, bot: ChatEngine, key: Key, started_from: Key) -> tuple[list[float], list[float]]:
        if started_from in self.logps:
            return self.logps[started_from]
        if started_from == (key[0], None) and key[1]:  # the same base under the adapter: switch the adapter off
            with disabled_adapter(bot.model):
                found = pair_logps(bot.model, bot.tokenizer, bot.template, self.pairs, self.acfg.batch_size)
        else:  # a resumed run: the row that scored the reference ran before the restart
            reference, tokenizer, _ = load_model_and_tokenizer(started_from[0], dtype="float32")
            if started_from[1]:
                reference = load_adapter(reference, started_from[1])
            found = pair_logps(reference, tokenizer, bot.template, self.pairs, self.acfg.batch_size)
        self.logps[started_from] = found
        return found

    def score(self, bot: ChatEngine, key: Key, started_from: Key | None, out_dir: Path,
              reward_model: str | None) -> dict:
        """The report of ``bot`` (the model ``key``) against the model it started from (None: itself)."""
        acfg = self.acfg
        out: dict[str, Any] = {}
        if self.pairs:
            policy = pair_logps(bot.model, bot.tokenizer, bot.template, self.pairs, acfg.batch_size)
            self.logps[key] = policy
            reference = policy if started_from is None else self._reference_logps(bot, key, started_from)
            out.update(preference_scores(policy, reference))
        if self.examples:
            prompts = [e.messages for e in self.examples]
            answers = generate_answers(bot, prompts, GenerationSettings(greedy=True,
                                                                        max_new_tokens=acfg.max_new_tokens),
                                       acfg.batch_size, progress=False)
            texts, gold = [e.query for e in self.examples], [e.label for e in self.examples]
            out["correct"] = sum(correct(texts, answers, gold=gold)) / len(answers)
            out["calculator"] = sum(calculator(texts, answers)) / len(answers)
            out["format"] = sum(answer_format(texts, answers)) / len(answers)
            if reward_model:
                rm = self.reward_model(reward_model)
                out["rm score"] = score_answers(rm, prompts, answers, batch_size=acfg.batch_size)["rm score"]
            write_jsonl_atomic(out_dir / "answers.jsonl", [{"prompt": t, "predict": a, "label": g}
                                                           for t, a, g in zip(texts, answers, gold)])
        log("alignment eval: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in out.items()))
        return out

    def reward_model_accuracy(self, reward_model: str) -> dict:
        """A stage-rm checkpoint's pairwise accuracy and margin on the held-out pairs (``rm_pairs`` if given)."""
        if not self.rm_pairs:
            return {}
        return pairwise_accuracy(self.reward_model(reward_model), self.rm_pairs, self.acfg.batch_size)
