"""Model loading, and architectures native to finechat (registered with transformers' Auto classes)."""

from finechat.models.chatglm.register import register_chatglm

register_chatglm()
