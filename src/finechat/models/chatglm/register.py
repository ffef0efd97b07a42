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
    register_ptuning()
    _done = True


def _native_ptuning(model, cfg):
    """``method: ptuning`` on a ChatGLM model: its own prefix encoder (ChatGLM-6B ptuning's checkpoints)."""
    model.enable_prefix_tuning(cfg.pre_seq_len, bool(getattr(cfg, "prefix_projection", False)))
    return model


def register_ptuning() -> None:
    """Make the training recipe's ``method: ptuning`` use the native prefix encoder for ChatGLM (idempotent).

    Called at registration and again whenever a ChatGLM model is built: when ``finechat.train.methods`` is
    the module being imported (it imports finechat.models, which registers ChatGLM), it cannot take the
    registration yet, and the next model construction does it.
    """
    import importlib
    import importlib.util
    import sys

    name = "finechat.train.methods"
    methods = sys.modules.get(name)
    if methods is None:
        if importlib.util.find_spec(name) is None:
            return
        methods = importlib.import_module(name)
    if not hasattr(methods, "register_ptuning"):  # still initialising (circular import); retried later
        return
    if methods.PTUNING_BUILDERS.get("chatglm") is not _native_ptuning:
        methods.register_ptuning("chatglm", _native_ptuning)
