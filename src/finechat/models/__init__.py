"""Model loading, and architectures native to finechat (registered with transformers' Auto classes)."""

import logging
import warnings

from finechat.models.chatglm.register import register_chatglm

register_chatglm()


def _quiet_known_harmless() -> None:
    """Silence library messages that say nothing to a finechat user (each checked to be harmless here)."""
    # bitsandbytes' CPU backend looks for an optional faster 4-bit kernel package and logs its absence on every
    # import; the built-in kernel is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward" not in record.getMessage())
    # peft reads model.is_gradient_checkpointing (transformers 5 renamed it); peft's prefix tuning (P-Tuning v2)
    # passes past_key_values, which transformers removes in 5.40 (pyproject.toml pins transformers below it).
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated and will be removed in version 5\.40",
                            category=FutureWarning)


_quiet_known_harmless()
