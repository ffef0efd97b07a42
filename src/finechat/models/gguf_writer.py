"""Write a loaded causal LM and its tokenizer as one GGUF file that llama.cpp, Ollama and LM Studio run.

The format work is the ``gguf`` package's, llama.cpp's own Python writer: ``GGUFWriter`` lays out the
file, ``TensorNameMap`` gives llama.cpp's tensor names, ``SpecialVocab`` / ``LlamaHfVocab`` read the
special tokens, merges and sentencepiece vocabularies, and ``gguf.quants.quantize`` packs Q8_0 / Q4_x
blocks. What this module adds is what those pieces leave to their caller (llama.cpp's
``convert_hf_to_gguf.py``, which is a script, not a library): the per-architecture hyperparameter keys,
the byte-level BPE vocabulary list, the name of the pre-tokenizer llama.cpp must split text with, and
the rotary-embedding row order llama.cpp's Llama graph expects. Facts taken from llama.cpp:

* Llama-family q/k projections are stored with the two rotary halves of every head interleaved
  (llama.cpp rotates adjacent pairs; transformers rotates halves): rows are regrouped
  ``[heads, 2, head_dim/2] -> [heads, head_dim/2, 2]``, per key/value head for ``k_proj``. Qwen2 uses the
  "neox" (halves) rotation in llama.cpp and is written as is.
* The pre-tokenizer names (``tokenizer.ggml.pre``) select llama.cpp's split regexes: "gpt-2" for the
  plain byte-level regex, "smollm" for that regex after splitting every digit, "llama-bpe" and "qwen2"
  for their own. The name is read from the structure of the tokenizer's pre-tokenizer, never from the
  model's name.

The file is written to a temporary file beside the target and renamed into place (``finechat.files``), so a
crash or a bad tensor never leaves half a GGUF.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from finechat.errors import FinechatError
from finechat.files import atomic_path
from finechat.models.gguf_header import read_gguf_header

# outtype -> (GGML type of 2-D weights, llama.cpp file type); 1-D tensors (norms, biases) stay F32 as in llama.cpp.
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# model_type -> llama.cpp architecture, and whether q/k rows need the Llama rotary regrouping.
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def supported() -> str:
    """The architectures and output types export knows, for error messages and --help."""
    return f"architectures {', '.join(ARCHITECTURES)}; output types {', '.join(OUTTYPES)}"


def check_architecture(model_type: str | None) -> None:
    """Refuse, with a message naming what is supported, a model llama.cpp has no mapping for."""
    if model_type == "chatglm":
        raise FinechatError(
            "ChatGLM-6B (v1) has no llama.cpp architecture (llama.cpp's 'chatglm' is ChatGLM2/3 and GLM-4, a "
            "different layout), so it cannot be written as GGUF; export a Hugging Face folder instead "
            f"(finechat export --out DIR). GGUF export supports {', '.join(ARCHITECTURES)}."
        )
    if model_type not in ARCHITECTURES:
        raise FinechatError(f"model type {model_type!r} has no GGUF mapping in finechat; supported: "
                            f"{', '.join(ARCHITECTURES)}")


def check_gguf_file(path: str | Path) -> dict:
    """Read a GGUF file's header and tensor table; a truncated or foreign file is one clear error.

    Returns what an engine needs before loading it: architecture, context length and end-of-turn token id.
    """
    fields = read_gguf_header(path)  # bounded: never trusts a count the file cannot hold
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise FinechatError(f"{path}: GGUF file without general.architecture")
    return {"architecture": arch, "context_length": fields.get(f"{arch}.context_length"),
            "eot_token_id": fields.get("tokenizer.ggml.eot_token_id")}


def _rope_rows(weight, n_head: int):
    """Regroup q/k rows from transformers' rotate-halves order to llama.cpp's adjacent pairs (see module doc)."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE, from the structure of its pre_tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in (("llama-bpe", _LLAMA3_SPLIT), ("qwen2", _QWEN2_SPLIT), ("gpt-2", _GPT2_SPLIT)):
            if pattern == split:
                return name
    raise FinechatError(
        f"the tokenizer's pre-tokenizer ({' + '.join(str(k) for k in kinds) or 'none'}) matches none that llama.cpp "
        "knows by name (gpt-2, smollm, llama-bpe, qwen2); a GGUF with the wrong one would split text differently "
        "from the model's training"
    )


def _add_vocab(writer: Any, tokenizer: Any, folder: Path, n_vocab: int) -> dict:
    """Vocabulary, merges, special tokens and chat template; returns a summary for the export record."""
    import gguf

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):  # sentencepiece-style (Llama 2, Mistral)
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        pre = "default"
    elif model.get("type") == "BPE":  # byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2)
        pre = _pre_tokenizer_name(tokenizer_json)
        by_id = {i: t for t, i in tokenizer.get_vocab().items()}
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
        special_ids = set(tokenizer.all_special_ids)
        tokens, scores, types = [], None, []
        for i in range(len(by_id)):
            if i not in by_id:
                raise FinechatError(f"the tokenizer has no token with id {i}; cannot write a GGUF vocabulary")
            text = by_id[i]
            tokens.append(text)
            if text in added:
                types.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
    else:
        raise FinechatError(f"tokenizer model {model.get('type')!r} is not supported for GGUF export "
                            "(byte-level BPE and sentencepiece-style BPE are)")
    if len(tokens) > n_vocab:
        raise FinechatError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {n_vocab} rows")
    # The embedding may have more rows than the tokenizer has tokens (padded for speed); llama.cpp needs one
    # entry per row, so the spare rows become unused placeholder tokens.
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(folder, load_merges=model.get("type") == "BPE" and pre != "default", n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    # Whether BOS/EOS are added is read from the tokenizer's behaviour, which tokenizer_config.json may not state.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if "bos" not in special.add_special_token:
        writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    if "eos" not in special.add_special_token:
        writer.add_add_eos_token(bool(probe) and eos is not None and probe[-1] == eos and len(probe) > 1)
    return {"tokenizer": "gpt2" if pre != "default" else "llama", "pre_tokenizer": pre, "tokens": len(tokens),
            "merges": len(special.merges), "special_tokens": special.special_token_ids}


def _add_hyperparameters(writer: Any, config: Any, arch: str) -> None:
    cfg = config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in (None, "default"):
        raise FinechatError(f"rope scaling {rope_type!r} is not supported by finechat's GGUF export "
                            "(plain and linear RoPE are)")
    if getattr(cfg, "use_sliding_window", False):
        raise FinechatError("sliding-window attention is not supported by finechat's GGUF export")


def write_gguf(model: Any, tokenizer: Any, out: str | Path, outtype: str = "f16", *, name: str | None = None,
               eot_tokens: list[str] | None = None, sampling: dict | None = None, description: str | None = None,
               progress: bool = True) -> dict:
    """Write ``model`` (a transformers Llama/Mistral/Qwen2 causal LM) and ``tokenizer`` to ``out`` as GGUF.

    ``eot_tokens`` are the chat template's end-of-turn tokens (llama.cpp stops there); ``sampling`` the
    default temperature / top_p / top_k / repeat penalty llama.cpp reads from ``general.sampling.*``.
    Returns a summary (architecture, tensor types, vocabulary) for the caller's report.
    """
    import gguf
    import numpy as np
    import torch
    from tqdm import tqdm

    if outtype not in OUTTYPES:
        raise FinechatError(f"unknown output type {outtype!r}; choose from {', '.join(OUTTYPES)}")
    model_type = getattr(model.config, "model_type", None)
    check_architecture(model_type)
    arch_name, permute_qk = ARCHITECTURES[model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    cfg = model.config
    out = Path(out).expanduser()
    weight_type = gguf.GGMLQuantizationType[OUTTYPES[outtype][0]]
    # With 4/5-bit weights the (tied) embedding stays Q8_0, as llama.cpp's own quantizer keeps the output
    # matrix at higher precision: it carries every logit.
    embed_type = gguf.GGMLQuantizationType.Q8_0 if outtype.startswith(("q4", "q5")) else weight_type
    names = gguf.TensorNameMap(arch, cfg.num_hidden_layers)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False) or (
        "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr())
    type_counts: dict[str, int] = {}
    # The writer opens the temporary file atomic_path made beside ``out`` by name; it is renamed only when complete.
    with atomic_path(out) as staged:
        writer = gguf.GGUFWriter(staged, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        if description:
            writer.add_description(description)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, OUTTYPES[outtype][1])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, cfg, arch_name)
        with tempfile.TemporaryDirectory() as tok_dir:
            tokenizer.save_pretrained(tok_dir)
            vocab = _add_vocab(writer, tokenizer, Path(tok_dir), cfg.vocab_size)
        vocab_ids = tokenizer.get_vocab()
        for token in eot_tokens or []:
            if token in vocab_ids:  # the template's end of turn (e.g. <|im_end|>), where llama.cpp stops a reply
                writer.add_eot_token_id(vocab_ids[token])
                vocab["eot"] = token
                break
        for key, value in (sampling or {}).items():
            getattr(writer, f"add_sampling_{key}")(value)
        items = [(k, v) for k, v in state.items() if not (tied and k == "lm_head.weight")
                 and not k.endswith("rotary_emb.inv_freq")]
        for key, tensor in tqdm(items, desc=f"GGUF {outtype}", unit="tensor", disable=not progress):
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise FinechatError(f"tensor {key} has no llama.cpp name for architecture {arch_name.lower()}")
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
                data = _rope_rows(data, n_head)
            elif permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
                data = _rope_rows(data, n_kv)
            qtype = gguf.GGMLQuantizationType.F32
            if data.ndim == 2:
                qtype = embed_type if gguf_name in ("token_embd.weight", "output.weight") else weight_type
                block = gguf.GGML_QUANT_SIZES[qtype][0]
                if data.shape[-1] % block:  # a row that is not whole blocks cannot be packed: keep it 16-bit
                    qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
            writer.add_tensor(gguf_name, packed, raw_dtype=qtype)  # packed blocks: the writer derives the shape
            type_counts[qtype.name] = type_counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch], "outtype": outtype, "tensor_types": type_counts,
            "bytes": out.stat().st_size, **vocab}
