"""finechat: fine-tune and deploy ChatGPT-like open LLMs.

    import finechat
    bot = finechat.load()                      # SmolLM2-135M-Instruct, or a folder / .gguf / adapter
    response, history = bot.chat("你好", history=[])
    for partial, history in bot.stream_chat("What can you do?", history):
        print(partial)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "ChatModel", "__version__"]


def load(
    model: str = "default",
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    template: str | None = None,
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
    compile: bool = False,
    **generation: Any,
):
    """Load a model (``default``, a Hugging Face folder or a .gguf file), an optional adapter and a template.

    Returns a :class:`finechat.generate.engine.ChatModel` with ``.model``, ``.tokenizer``, ``chat`` and
    ``stream_chat``. Extra keyword arguments set the default generation settings (``max_new_tokens``, ...).
    ``compile=True`` compiles the fast decoder's one-token step with ``torch.compile`` on first use.
    """
    from finechat.generate.engine import ChatModel, GenerationSettings
    from finechat.models.load import load_adapter, load_model_and_tokenizer

    hf_model, tokenizer, folder = load_model_and_tokenizer(
        model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quantization_bit=quantization_bit
    )
    if adapter:
        if template is None:  # the template the adapter was trained with (finechat checkpoints record it)
            from pathlib import Path

            from finechat.models.load import read_json

            run_file = Path(adapter).expanduser() / "finechat_run.json"
            template = read_json(run_file).get("template") if run_file.is_file() else None
        hf_model = load_adapter(hf_model, adapter)
        hf_model.eval()
    bot = ChatModel(hf_model, tokenizer, template, source=str(folder))
    bot.compile_decoder = compile
    if generation:
        bot.generation = GenerationSettings.from_kwargs(bot.generation, **generation)
    return bot


def __getattr__(name: str):
    if name == "ChatModel":
        from finechat.generate.engine import ChatModel

        return ChatModel
    raise AttributeError(name)
