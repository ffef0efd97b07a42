"""``finechat eval --reward-model DIR``: a reward model's pairwise accuracy, or its scores of generated answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finechat.data.pairs import is_preference_file, read_preferences
from finechat.errors import ConfigError
from finechat.eval.metrics import format_table
from finechat.eval.predict import generate_answers, load_examples
from finechat.eval.reward_scoring import load_reward_model, pairwise_accuracy, score_answers, write_scores
from finechat.generate.engine import ChatModel, GenerationSettings
from finechat.models.resolve import load_adapter, load_model_and_tokenizer


def reward_eval(reward_model: str, cfg: Any, settings: GenerationSettings, load_options: dict) -> str:
    """The report table; writes ``reward_scores.json`` into ``cfg.output_dir`` (default: DIR/eval)."""
    if not cfg.data:
        raise ConfigError("--reward-model needs --data: preference pairs (pairwise accuracy) or prompts to answer")
    rm = load_reward_model(reward_model, cfg.device)
    out = cfg.output_dir or str(Path(reward_model) / "eval")
    name = Path(reward_model).name
    if is_preference_file(cfg.data, cfg.format if cfg.format != "auto" else "auto"):
        pairs = read_preferences(cfg.data, cfg.format).records[: cfg.max_samples or None]
        scores = pairwise_accuracy(rm, pairs, cfg.batch_size)
    else:
        examples = load_examples(cfg.data, cfg.format, cfg.max_samples)
        model, tokenizer, _ = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, device=cfg.device)
        if cfg.adapter:
            model = load_adapter(model, cfg.adapter)
        bot = ChatModel(model, tokenizer, load_options.get("template"))
        answers = generate_answers(bot, [e.messages for e in examples], settings, cfg.batch_size)
        scores = score_answers(rm, [e.messages for e in examples], answers, [e.label for e in examples],
                               cfg.batch_size)
        name = Path(cfg.adapter).name if cfg.adapter else Path(cfg.model).name
    scores.update({"reward_model": str(reward_model), "data": str(cfg.data)})
    path = write_scores(out, scores)
    numbers = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    table = format_table({name: numbers}, columns=list(numbers))
    return f"{table}\n\nWrote {path}"
