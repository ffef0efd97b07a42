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


def __getattr__(name: str) -> Any:
    # Imported on first use: `import finechat` stays light (no torch) for the CLI and tools that only need a name.
    if name == "load":  # finechat.load(model="default", adapter=None, ...) -> ChatModel
        from finechat.generate.chat_loader import load

        return load
    if name == "ChatModel":
        from finechat.generate.engine import ChatModel

        return ChatModel
    raise AttributeError(f"module 'finechat' has no attribute {name!r}")
