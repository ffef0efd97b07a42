"""Model loading, and architectures native to finechat (registered with transformers' Auto classes)."""

import importlib.util

if importlib.util.find_spec("finechat.models.chatglm.register") is not None:
    from finechat.models.chatglm.register import register_chatglm

    register_chatglm()
