"""Score answers with a reward model trained by ``stage: rm``: pairwise accuracy on pairs, scores of answers.

A reward-model checkpoint describes itself (``finechat_run.json``: base model, method, template), so
``load_reward_model(DIR)`` rebuilds it the way it was trained: the base's decoder with a one-score head
(:func:`finechat.models.reward_head.reward_model_from`) plus the LoRA adapter, or the whole fine-tuned classifier
for ``method: full / freeze``. Texts are rendered with the training template and scored at their last token.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from finechat.console import log
from finechat.data.formats import Conversation, Turn
from finechat.data.pairs import PreferencePair
from finechat.data.templates import get_template
from finechat.data.tokenize import TokenizeSettings, encode_conversation, special_token_layout
from finechat.errors import ModelLoadError
from finechat.files import read_json, write_json_atomic
from finechat.models.resolve import load_adapter, load_model_and_tokenizer
from finechat.models.reward_head import reward_model_from, zero3_off

RUN_FILE = "finechat_run.json"


@dataclasses.dataclass
class RewardModel:
    """A loaded reward model with the tokenizer and template it was trained with."""

    model: Any
    tokenizer: Any
    template: Any
    max_length: int = 1024

    def ids(self, prompt: Conversation, answer: str) -> list[int]:
        """The tokens of ``prompt + answer`` as training saw them (SFT rendering, answer last)."""
        conv = Conversation(prompt.turns + [Turn("assistant", answer)], system=prompt.system, tools=prompt.tools)
        settings = TokenizeSettings(cutoff_len=self.max_length, last_turn_only=True)
        layout = special_token_layout(self.tokenizer, self.template)
        example, _ = encode_conversation(conv, self.tokenizer, self.template, settings, layout)[-1]
        if example is None:
            return self.tokenizer(answer, add_special_tokens=False)["input_ids"][: self.max_length]
        last = max(i for i, x in enumerate(example["labels"]) if x != -100)
        return example["input_ids"][: last + 1]

    def score(self, items: list[tuple[Conversation, str]], batch_size: int = 8) -> list[float]:
        """One scalar reward per (prompt, answer)."""
        import torch

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[float] = []
        self.model.eval()
        for start in range(0, len(items), batch_size):
            rows = [self.ids(p, a) for p, a in items[start:start + batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # [batch, 1]
            out += [float(x) for x in logits[:, 0]]
        return out


def load_reward_model(folder: str | Path, device: str = "auto") -> RewardModel:
    """Load a ``stage: rm`` checkpoint (LoRA on the base, or a full classifier) for scoring."""
    folder = Path(folder).expanduser()
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        raise ModelLoadError(f"{folder}: not a finechat checkpoint (no {RUN_FILE})")
    info = read_json(run_file)
    if info.get("stage") != "rm":
        raise ModelLoadError(f"{folder}: a stage-{info.get('stage')} checkpoint, not a reward model (stage rm)")
    config = info.get("config") or {}
    base = config.get("model") or (info.get("base_model") or {}).get("path") or "default"
    # whole weights on every rank, even inside a ZeRO-3 run (GRPO's reward_model reward): see zero3_off
    with zero3_off():
        causal, tokenizer, _ = load_model_and_tokenizer(base, dtype="float32", device=device)
        if (folder / "adapter_config.json").is_file():
            model = load_adapter(reward_model_from(causal, tokenizer.pad_token_id), str(folder))
            if model.active_peft_config.peft_type == "LORA":
                model = model.merge_and_unload()  # scoring only: the same scores, ~15% less time than the side branches
        else:
            from transformers import AutoModelForSequenceClassification

            log(f"Loading the reward model {folder} ...")
            model = AutoModelForSequenceClassification.from_pretrained(folder).to(next(causal.parameters()).device)
    del causal
    template = get_template(info.get("template") if info.get("template") not in (None, "tokenizer") else None,
                            tokenizer, getattr(model.config, "model_type", None))
    return RewardModel(model, tokenizer, template, int(config.get("cutoff_len") or 1024))


def pairwise_accuracy(rm: RewardModel, pairs: list[PreferencePair], batch_size: int = 8) -> dict[str, float]:
    """Share of pairs whose chosen answer scores higher than the rejected one, and the mean margin."""
    chosen = rm.score([(p.prompt, p.chosen) for p in pairs], batch_size)
    rejected = rm.score([(p.prompt, p.rejected) for p in pairs], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"pairs": len(pairs), "rm accuracy": sum(m > 0 for m in margins) / max(len(margins), 1),
            "rm margin": sum(margins) / max(len(margins), 1), "rm score chosen": sum(chosen) / max(len(chosen), 1),
            "rm score rejected": sum(rejected) / max(len(rejected), 1)}


def conversation_of(messages: list[dict]) -> Conversation:
    """A prompt Conversation from template messages (system first when there is one)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    return Conversation([Turn(m["role"], m["content"]) for m in messages if m["role"] != "system"], system=system)


def score_answers(rm: RewardModel, prompts: list[list[dict]], answers: list[str], labels: list[str] | None = None,
                  batch_size: int = 8) -> dict[str, float]:
    """Mean reward of generated answers to ``prompts`` (message lists), and of the reference labels."""
    convs = [conversation_of(m) for m in prompts]
    predicted = rm.score([(c, a or " ") for c, a in zip(convs, answers)], batch_size)
    out = {"n": len(answers), "rm score": sum(predicted) / max(len(predicted), 1)}
    if labels is not None:
        scored = rm.score(list(zip(convs, labels)), batch_size)
        out["rm score of labels"] = sum(scored) / max(len(scored), 1)
    return out


def write_scores(output_dir: str | Path, scores: dict) -> Path:
    """``reward_scores.json`` in ``output_dir``."""
    path = Path(output_dir) / "reward_scores.json"
    write_json_atomic(path, scores)
    return path
