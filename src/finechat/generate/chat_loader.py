"""Load a chat model in one call: model (``default``, a folder or a .gguf), optional adapter, template, settings.

``finechat.load`` (the package root) is this function, for users; library code calls it here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finechat.errors import ConfigError
from finechat.files import read_json
from finechat.generate.engine import ChatModel
from finechat.generate.llamacpp import ENGINES, load_llamacpp
from finechat.generate.settings import GenerationSettings
from finechat.generate.vllm_engine import load_vllm
from finechat.models.resolve import check_adapter_folder, load_adapter, load_model_and_tokenizer


def load(
    model: str = "default",
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    template: str | None = None,
    quantization_bit: int | None = None,
    trust_remote_code: bool = False,
    compile: bool = False,
    engine: str = "torch",
    **generation: Any,
) -> ChatModel:
    """Load a model (``default``, a Hugging Face folder or a .gguf file), an optional adapter and a template.

    Returns a :class:`finechat.generate.engine.ChatModel` with ``.model``, ``.tokenizer``, ``chat`` and
    ``stream_chat``. Extra keyword arguments set the default generation settings (``max_new_tokens``, ...).
    ``compile=True`` compiles the fast decoder's one-token step with ``torch.compile`` on first use.
    ``engine="llama.cpp"`` runs a GGUF file through llama-cpp-python instead (:mod:`finechat.generate.llamacpp`);
    ``engine="vllm"`` starts a vLLM server child on the model and talks to it (:mod:`finechat.generate.vllm_engine`).
    """
    if engine == "vllm":
        unused = [name for name, value, default in (("quantization_bit", quantization_bit, None),
                                                    ("compile", compile, False)) if value != default]
        if unused:  # nothing silently ignored: vLLM runs the weights in dtype with its own kernels
            raise ConfigError(f"{', '.join(unused)}: not used by the vLLM engine (it runs the weights in --dtype with "
                              "its own kernels; give it a quantized checkpoint folder instead)")
        return load_vllm(model, adapter=adapter, template=template, dtype=dtype, device=device,
                         trust_remote_code=trust_remote_code, **generation)
    if engine != "torch":
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
        unused = [name for name, value, default in (("dtype", dtype, "auto"), ("device", device, "auto"),
                                                    ("quantization_bit", quantization_bit, None),
                                                    ("trust_remote_code", trust_remote_code, False),
                                                    ("compile", compile, False)) if value != default]
        if unused:  # nothing silently ignored: the GGUF's own weight types and llama.cpp's CPU kernels are used
            raise ConfigError(f"{', '.join(unused)}: not used by the llama.cpp engine (it runs the GGUF as stored; "
                              "choose the weight type when exporting: finechat export --to gguf --outtype ...)")
        return load_llamacpp(model, adapter=adapter, template=template, **generation)
    if adapter:
        check_adapter_folder(adapter)  # a wrong path fails before the model loads, listing the checkpoints
    hf_model, tokenizer, folder = load_model_and_tokenizer(
        model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quantization_bit=quantization_bit
    )
    if adapter:
        if template is None:  # the template the adapter was trained with (finechat checkpoints record it)
            run_file = Path(adapter).expanduser() / "finechat_run.json"
            template = read_json(run_file).get("template") if run_file.is_file() else None
        hf_model = load_adapter(hf_model, adapter)
        hf_model.eval()
    bot = ChatModel(hf_model, tokenizer, template, source=str(folder))
    bot.compile_decoder = compile
    if generation:
        bot.generation = GenerationSettings.from_kwargs(bot.generation, **generation)
    return bot
