"""``ModelOptions``: which model to load and how, the option group every model-loading subcommand shares."""

from __future__ import annotations

import dataclasses
from typing import Literal

from finechat.config import field


@dataclasses.dataclass
class ModelOptions:
    """Which model to load and how (shared by every subcommand that loads a model)."""

    model: str = field("default", help="'default' (SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file")
    adapter: str | None = field(None, help="a peft adapter folder (LoRA or P-Tuning v2) to put on the model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = field("auto", help="where to run")
    template: str | None = field(None, help="prompt template name; default: the tokenizer's chat template")
    quantization_bit: int | None = field(None, help="quantize weights at load time to 8 or 4 bits")
    trust_remote_code: bool = field(False, help="allow a model folder's own Python code to run (off by default)")
    compile: bool = field(False, help="torch.compile the fast decoder's one-token step (Llama/Qwen2/ChatGLM; "
                                      "the first answer waits about a minute on CPU while it compiles)")
    engine: Literal["torch", "llama.cpp", "vllm"] = field(
        "torch", help="torch: finechat's PyTorch engine; llama.cpp: run a .gguf file through llama-cpp-python (pip "
        "install 'finechat[llamacpp]'); vllm: start a vLLM server child on a model folder and talk to it over HTTP "
        "(make vllm)")

    def __post_init__(self) -> None:
        if self.quantization_bit not in (None, 4, 8):
            raise ValueError(f"quantization_bit must be 4 or 8, got {self.quantization_bit}")
