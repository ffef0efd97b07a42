"""Model loading, and architectures native to finechat (registered with transformers' Auto classes)."""

import importlib.util

try:
    _chatglm = importlib.util.find_spec("finechat.models.chatglm.register")
except ModuleNotFoundError:
    _chatglm = None
if _chatglm is not None:
    from finechat.models.chatglm.register import register_chatglm

    register_chatglm()
