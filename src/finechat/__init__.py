"""finechat: fine-tune and deploy ChatGPT-like open LLMs.

    import finechat
    bot = finechat.load()                      # SmolLM2-135M-Instruct, or a folder / .gguf / adapter
    response, history = bot.chat("你好", history=[])
    for partial, history in bot.stream_chat("What can you do?", history):
        print(partial)
"""

from __future__ import annotations

from typing import Any

from finechat.config import VERSION as __version__

__all__ = ["load", "ChatModel", "__version__"]


def load(*args: Any, **kwargs: Any):
    """Load a model (``default``, a Hugging Face folder or a .gguf file), an optional adapter and a template.

    See :func:`finechat.generate.load.load` for the arguments; returns a :class:`ChatModel`.
    """
    from finechat.generate.load import load as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):
    if name == "ChatModel":
        from finechat.generate.engine import ChatModel

        return ChatModel
    raise AttributeError(name)
