"""A fake THUDM/chatglm-6b folder at a tiny size, written the way the original is laid out (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

from tiny import CORPUS

REMOTE_CODE_TRAP = 'raise RuntimeError("the remote code of the model folder was executed")\n'


def make_ice_text(folder: Path) -> Path:
    from finechat.models.chatglm.tokenization_chatglm import train_ice_text_model

    return train_ice_text_model(CORPUS * 2, Path(folder) / "ice_text.model")


def tiny_config(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, **extra):
    from finechat.models.chatglm.configuration_chatglm import ChatGLMConfig

    return ChatGLMConfig(
        vocab_size=len(tokenizer) + 8, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
        inner_hidden_size=4 * hidden, max_sequence_length=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
        gmask_token_id=tokenizer.gmask_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def write_fake_chatglm(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0, shards: int = 2,
                       init_std: float | None = None) -> Path:
    """config.json (published keys incl. auto_map), tokenizer_config.json, ice_text.model, fp16 shards + index.

    ``init_std`` redraws every weight from N(0, init_std): at the default initialisation ChatGLM's sqrt(2 * layers)
    residual scaling makes a tiny model repeat the last prompt token (<sop>), so its answers are all empty; a
    wide one (0.5) gives answers that depend on the prompt.
    """
    import torch

    from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
    from finechat.models.chatglm.tokenization_chatglm import ChatGLMTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = ChatGLMTokenizer(str(make_ice_text(folder)))
    config = tiny_config(tokenizer, hidden, layers)
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, init_std)
    model = model.half()
    published = {
        "_name_or_path": "THUDM/chatglm-6b",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "mask_token_id": config.mask_token_id, "gmask_token_id": config.gmask_token_id,
        "pad_token_id": config.pad_token_id, "hidden_size": hidden, "inner_hidden_size": 4 * hidden,
        "layernorm_epsilon": 1e-05, "max_sequence_length": 256, "model_type": "chatglm",
        "num_attention_heads": 4, "num_layers": layers, "position_encoding_2d": True, "torch_dtype": "float16",
        "transformers_version": "4.27.1", "use_cache": True, "vocab_size": config.vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(published, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eop_token": "<eop>", "eos_token": "<eop>",
        "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "end_token": "</s>", "remove_space": False, "do_lower_case": False, "num_image_tokens": 0,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }, indent=2))
    for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py"):
        (folder / name).write_text(REMOTE_CODE_TRAP)
    # The original checkpoint keeps each layer's rotary buffer and an untied copy of lm_head.weight.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    head_dim = hidden // 4
    for i in range(layers):
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2)))
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv.half()
    names = list(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        shard = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[s * per:(s + 1) * per]}
        torch.save(part, folder / shard)
        for k, v in part.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return folder
