"""ChatGLM-6B's configuration, with the field names of the published ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedConfig


@dataclass(repr=False)
class ChatGLMConfig(PreTrainedConfig):
    """The hyper-parameters of a ChatGLM-6B model (defaults: the published 6.2B model).

    ``pre_seq_len`` / ``prefix_projection`` switch on P-Tuning v2's prefix encoder; ``quantization_bit``
    (4 or 8) builds the weight-only quantized layers of ChatGLM's INT4 / INT8 checkpoints.
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_sequence_length",
        "intermediate_size": "inner_hidden_size",
        "layer_norm_eps": "layernorm_epsilon",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int | None = None
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    quantization_bit: int = 0
    quantization_embeddings: bool = False
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.inner_hidden_size is None:
            self.inner_hidden_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError("head_dim (hidden_size / num_attention_heads) must be a multiple of 4 for 2D rotary")
        if not self.position_encoding_2d:
            raise ValueError("only position_encoding_2d=true (ChatGLM-6B's layout) is supported")
        if self.quantization_bit not in (0, 4, 8, None):
            raise ValueError(f"quantization_bit must be 0, 4 or 8, got {self.quantization_bit}")
        if self.quantization_embeddings:
            raise ValueError("quantized embeddings (chatglm-6b-int4-qe) are not supported; use the int4 / int8 folders")
        if self.pre_seq_len is not None and self.pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be >= 1 or null, got {self.pre_seq_len}")
        super().__post_init__(**kwargs)
