"""Generation settings: sampling and length for one answer, checked when made, shared by every front end."""

from __future__ import annotations

import dataclasses
from typing import Any

from finechat.config import field
from finechat.errors import ConfigError

# Temperatures below this decode greedily: the distribution is already one-hot in float32, and dividing the
# logits by a tinier value (1e-300) overflows them to inf, whose softmax is NaN (an empty or garbage answer).
GREEDY_BELOW_TEMPERATURE = 1e-5

@dataclasses.dataclass
class GenerationSettings:
    """Sampling and length settings for one answer."""

    max_new_tokens: int = field(512, help="most tokens to generate for one answer")
    max_length: int | None = field(None, help="ChatGLM-style limit on prompt + answer tokens")
    temperature: float = field(0.7, help="sampling temperature (0, or below 1e-5 = greedy)")
    top_p: float = field(0.9, help="nucleus sampling: keep the smallest set of tokens with this probability")
    top_k: int = field(0, help="keep only the k most likely tokens (0 = off)")
    repetition_penalty: float = field(1.0, help="penalise tokens already generated (1.0 = off)")
    presence_penalty: float = field(0.0, help="OpenAI's: subtract this from every token already in the answer")
    frequency_penalty: float = field(0.0, help="OpenAI's: subtract this times the count of each token in the answer")
    do_sample: bool = field(True, help="sample; --no-do-sample (or --greedy) picks the most likely token")
    greedy: bool = field(False, help="greedy decoding (same as --no-do-sample); answers repeat exactly")
    seed: int | None = field(None, help="random seed for sampling; a seeded answer repeats")
    stop: list[str] = field([], help="extra strings that end the answer (comma-separated)")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.greedy or self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.do_sample = False

    @classmethod
    def from_kwargs(cls, base: GenerationSettings | None = None, **kwargs: Any) -> GenerationSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown generation setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        values = dataclasses.asdict(base) if base else {}
        values.update({k: v for k, v in kwargs.items() if v is not None or k in ("seed", "max_length")})
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        if kwargs.get("do_sample") is True and "greedy" not in kwargs:
            values["greedy"] = False
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e

    def max_new_tokens_for(self, prompt_length: int) -> int:
        """The token budget for one answer: ``max_new_tokens``, within ChatGLM-style ``max_length`` when set."""
        if self.max_length is None:
            return self.max_new_tokens
        return max(1, min(self.max_new_tokens, self.max_length - prompt_length))
