"""Loading a ChatGLM-6B folder quantized (INT8 / INT4, its own format) without ever holding the FP16 model.

Two cases, one path: a published ``chatglm-6b-int4`` / ``-int8`` folder (``quantization_bit`` in its
config.json: int8 weights and fp16 scales on disk), and a full FP16 folder loaded with ``--quantization-bit``.
The model is built on the meta device with its quantized layers (no weight allocated), then the checkpoint is
read one tensor at a time: a float block weight is quantized as it arrives (ChatGLM's formula, in its own
dtype), everything else is copied in ``dtype`` and assigned. The peak is the quantized model plus one tensor.

Why not ``from_pretrained``: with ``quantization_bit`` set on an FP16 folder it would find fp16 tensors where
the model has int8 ones (transformers quantizes on load only through its own quantizer classes); and both
readers keep every page they touched of a memory-mapped shard resident until the whole shard is dropped
(the published INT4 checkpoint is one 4 GB file), which costs as much again as the model.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from finechat.errors import ModelLoadError
from finechat.models.chatglm.modeling_chatglm import ChatGLMForConditionalGeneration
from finechat.models.chatglm.quantization import QuantizedLinear, quantize_weight

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CHECKPOINT_NAMES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                    "pytorch_model.bin")
MADV_DONTNEED = 4  # Linux


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (safetensors preferred), in order."""
    for name in CHECKPOINT_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{path}: not a shard index ({e})") from e
            return [folder / shard for shard in dict.fromkeys(weight_map.values())]
        return [path]
    raise ModelLoadError(f"{folder}: no model weights ({', '.join(CHECKPOINT_NAMES)})")


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a .safetensors file, read into its own buffer (no memory map: see the module docstring)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise ModelLoadError(f"{path}: not a safetensors file ({e})") from e
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in SAFETENSORS_DTYPES:
                raise ModelLoadError(f"{path}: {name}: unsupported dtype {info.get('dtype')!r}")
            start, end = info["data_offsets"]
            raw = torch.empty(end - start, dtype=torch.uint8)
            f.seek(8 + size + start)
            if f.readinto(raw.numpy()) != end - start:
                raise ModelLoadError(f"{path}: {name}: the file is truncated")
            yield name, raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _release(tensor: torch.Tensor) -> None:
    """Drop a memory-mapped tensor's pages from the resident set now (they are read once, never written)."""
    page = 4096
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
        except (OSError, AttributeError):  # not Linux: the pages go when the shard is dropped
            pass


def read_torch_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a pytorch_model.bin (weights only, memory-mapped; its pages released once consumed)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a damaged or unsafe file
        raise ModelLoadError(f"{path}: cannot read the weights: {str(e).splitlines()[0]}") from e
    for name in list(state):
        tensor = state.pop(name)
        yield name, tensor
        _release(tensor)


def read_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(folder):
        yield from (read_safetensors(path) if path.suffix == ".safetensors" else read_torch_bin(path))


def load_quantized_chatglm(folder: str | Path, config: Any, bits: int | None = None,
                           dtype: torch.dtype = torch.bfloat16) -> Any:
    """A ChatGLM-6B model in ChatGLM's INT8 / INT4 format from ``folder``, built tensor by tensor.

    ``bits``: quantize a float checkpoint at load (None: the folder's own ``quantization_bit``). ``dtype``: of
    everything not quantized (embedding, norms, biases) and of the activations.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    folder = Path(folder)
    stored_bits = config.quantization_bit or None
    if bits and stored_bits and bits != stored_bits:
        raise ModelLoadError(f"{folder}: the weights are already quantized to {stored_bits} bits, not {bits}")
    bits = bits or stored_bits
    if bits not in (4, 8):
        raise ModelLoadError(f"{folder}: quantization_bit must be 4 or 8, got {bits}")
    config.quantization_bit = bits
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    expected = dict(model.state_dict())
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    loaded: set[str] = set()
    verb = "Loading" if stored_bits else f"Quantizing to INT{bits}"
    for name, tensor in tqdm(read_checkpoint(folder), desc=f"{verb} {folder.name}", unit=" tensors", leave=False):
        if name.endswith("rotary_emb.inv_freq") or name in tied:
            continue  # recomputed / the embedding's own tensor
        if name not in expected:
            raise ModelLoadError(f"{folder}: unexpected tensor {name} {tuple(tensor.shape)} in the weights")
        module_name, _, field = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, QuantizedLinear) and field == "weight" and tensor.is_floating_point():
            weight, scale = quantize_weight(tensor, bits)
            model.load_state_dict({name: weight, f"{module_name}.weight_scale": scale}, strict=False, assign=True)
            loaded.add(f"{module_name}.weight_scale")
        else:
            value = tensor.to(dtype, copy=True) if tensor.is_floating_point() and field != "weight_scale" \
                else tensor.clone()
            if value.shape != expected[name].shape:
                raise ModelLoadError(f"{folder}: {name} has shape {tuple(value.shape)}, the config says "
                                     f"{tuple(expected[name].shape)}")
            model.load_state_dict({name: value}, strict=False, assign=True)
        loaded.add(name)
    missing = [k for k in expected if k not in loaded and k not in tied and not k.startswith("transformer.prefix_encoder.")]
    if missing:
        raise ModelLoadError(f"{folder}: {len(missing)} tensors missing from the weights, e.g. {missing[:3]}")
    model.tie_weights()
    if model.transformer.prefix_encoder is not None:  # a fresh P-Tuning v2 prefix, as from_pretrained makes one
        model.transformer.prefix_encoder.to_empty(device="cpu")
        for module in model.transformer.prefix_encoder.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
