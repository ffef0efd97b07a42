"""Register the native ChatGLM-6B with transformers' Auto classes under model_type ``chatglm``.

After :func:`register_chatglm`, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` /
``AutoModelForSeq2SeqLM`` / ``AutoTokenizer`` ``.from_pretrained(folder)`` load an original THUDM/chatglm-6b
folder (its config.json names remote code in ``auto_map``) with ``trust_remote_code=False``: transformers
prefers a registered local class when remote code is not trusted.
"""

from __future__ import annotations

_done = False


def register_chatglm() -> None:
    """Idempotent: safe to call from several places."""
    global _done
    if _done:
        return
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig
    from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
    from finechat.models.chatglm.tokenization_chatglm import ChatGLMTokenizer

    AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
    # The published folder's AutoModel is the model with its LM head (ChatGLM-6B's README loads it with
    # AutoModel.from_pretrained(...).half()), so every Auto class maps to the generation model.
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        auto.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    _done = True
