"""Weight-only INT8 and group-wise INT4 quantization for any transformers causal LM, saved self-described.

``quantize_model(model, bits)`` swaps every ``nn.Linear`` (and, with ``include_embedding=True``, the token
embedding and a tied ``lm_head``) for a module that keeps integer weights and dequantizes inside the matmul.
``save_quantized`` writes a folder whose ``config.json`` carries a ``finechat_quantization`` key;
``load_quantized`` rebuilds the model from it (``finechat.models.resolve`` calls it for such folders).

Why our own modules over PyTorch's packed kernels rather than a library (default model, this 2-core
AVX-512 CPU, ms/token for the 210 Linear layers alone, shared machine; benchmarks/decode.py for the whole
model; NOTES.md for the libraries' end-to-end numbers):

==============================================  ==========  ==========================================
method                                           ms/token    why (not) used
==============================================  ==========  ==========================================
fp32 ``F.linear``                                38          the baseline
bf16 ``F.linear``                                25
torchao ``Int8WeightOnlyConfig`` (whole model)   62          slower than fp32 on CPU
bitsandbytes 8-bit / nf4 (whole model)           34 / 17     top-1 agreement 0.90 / 0.50: too lossy
optimum-quanto qint8 / qint4 (whole model)       103 / 120   slow
torchao ``Int4WeightOnlyConfig``                 --          fails on CPU ("Requires mslk >= 1.0.0")
``torch._weight_int8pack_mm``, fp32 activations  64          fp32 path of the kernel is slow
``torch._weight_int8pack_mm``, bf16 activations  12          **used for INT8**
``torch._weight_int4pack_mm_for_cpu``, fp32      184
``torch._weight_int4pack_mm_for_cpu``, bf16      6.9         **used for INT4** (group size 64)
==============================================  ==========  ==========================================

INT4 quality on this small model depends mostly on the group size (perplexity on all 3,178 held-out
tokens, embedding and head in INT8, with the per-group clipping search below): group 32: +0.36% (top-1
agreement 0.955, 0.706 bytes/param); group 128 (64 where 128 does not divide the width): +74% (0.58,
0.650 bytes/param). The reason is the model itself: its GGUF stores all 210 Linear layers as Q4_1 (4-bit
groups of 32 with an fp16 scale and minimum) and the embedding as Q8_0, so group 32 lands on the values'
own grid while coarser groups cannot represent them; 0.65 bytes/param with an INT8 embedding is below the
source's own 0.69. Models shipped in 16 bits quantize far better at 128 (gpt-fast's default on 7B models).

So on CPU the quantized layers cast their input to bfloat16 for the kernel and cast the result back (the
residual stream, norms and attention stay in the model's dtype, fp32 by default). On CUDA (and MPS) the
layers dequantize to the activation dtype and call ``F.linear`` -- correct everywhere, and fused into one
kernel under ``torch.compile``; no GPU was available to tune it.

Formats (what the state dict holds, independent of the device kernels' private layouts):

* INT8: ``weight_int8`` [out, in] int8 and ``scales`` [out] bfloat16, symmetric per output channel
  (w ~= q * scale; the scale is rounded to bf16 *before* quantizing so it carries no hidden error).
* INT4: ``weight_int4`` [out, in/2] uint8, two 4-bit values per byte (low nibble = even column), and
  ``scales_and_zeros`` [in/group, out, 2] bfloat16, asymmetric per group: w ~= (q - 8) * scale + zero,
  the convention of PyTorch's int4pack kernels. Each group's range is chosen among a few shrunken
  min-max ranges by the smallest squared error (clipping rare outliers buys finer steps for the rest). On CPU the module keeps the kernel's packed layout in
  memory only and converts back when the state dict is written.
* Embedding (``include_embedding``): INT8 per row; a tied ``lm_head`` shares the same INT8 tensors.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finechat.errors import ModelLoadError
from finechat.files import write_text_atomic

CONFIG_KEY = "finechat_quantization"
FORMAT_VERSION = 1
KERNEL_DTYPE = torch.bfloat16  # what the CPU int8/int4 kernels are fast in
DEFAULT_GROUP_SIZE = 32
INT8_KERNEL_WIDTH = 16  # the INT8 kernel's input width must be a multiple: other widths give garbage (torch 2.13)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4pack kernels accept
CLIP_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # INT4 range shrink factors tried per group


def _uses_packed_kernels(device: torch.device) -> bool:
    return device.type == "cpu"


# --------------------------------------------------------------------------------------------------------
# INT8
# --------------------------------------------------------------------------------------------------------
def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: returns (q [rows, cols] int8, scales [rows] bf16) with w ~= q * scale."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(KERNEL_DTYPE)  # [rows]
    q = torch.round(w / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A Linear layer with INT8 weights (per output channel scales); computes in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=KERNEL_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                     linear.weight.device)
        module.weight_int8, module.scales = quantize_int8_rows(linear.weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if _uses_packed_kernels(x.device) and self.in_features % INT8_KERNEL_WIDTH == 0:
            flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales.to(KERNEL_DTYPE))
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int8Embedding(nn.Module):
    """A token embedding with INT8 rows; returns vectors in ``dtype`` (the model's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None, device: Any = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype, self.padding_idx = (
            num_embeddings, embedding_dim, dtype, padding_idx)
        self.register_buffer("weight_int8", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8,
                                                         device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=KERNEL_DTYPE, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.dtype,
                     embedding.padding_idx, embedding.weight.device)
        module.weight_int8, module.scales = quantize_int8_rows(embedding.weight)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., dim]
        rows = F.embedding(input_ids, self.weight_int8).to(self.dtype)
        return rows * self.scales[input_ids].to(self.dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8"


def tied_int8_head(embedding: Int8Embedding, bias: nn.Parameter | None = None) -> Int8Linear:
    """An ``lm_head`` that reads the INT8 embedding's own tensors (tied weights stay tied)."""
    head = Int8Linear(embedding.embedding_dim, embedding.num_embeddings, False, embedding.dtype,
                      embedding.weight_int8.device)
    head.weight_int8, head.scales = embedding.weight_int8, embedding.scales
    head.bias = bias
    return head


# --------------------------------------------------------------------------------------------------------
# INT4
# --------------------------------------------------------------------------------------------------------
CPU_INT4_TILE_ROWS = 64  # the CPU int4pack layout packs rows in blocks of 64 (AVX-512) or 32; 64 covers both
PACK_CHUNK_ROWS = 1024  # rows packed per call: keeps the int32 copy the packer wants small (a multiple of the tile)


@functools.lru_cache(maxsize=8)
def _learn_cpu_int4_slots(out_features: int, in_features: int) -> torch.Tensor:
    """For each 4-bit slot of the CPU-packed tensor (low nibble first), the flat index ``row * in + col`` it holds.

    Learnt by packing the base-16 digits of every index with ``_convert_weight_to_int4pack_for_cpu``.
    """
    count = out_features * in_features
    index = torch.arange(count, dtype=torch.int64).reshape(out_features, in_features)
    slots = torch.zeros(count, dtype=torch.int64)
    for digit in range(max(1, (count - 1).bit_length() + 3) // 4):
        values = ((index >> (4 * digit)) & 0xF).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(values, 1).reshape(-1)
        slots |= torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).to(torch.int64) << (4 * digit)
    return slots


def _cpu_int4_tile_slots(in_features: int) -> torch.Tensor | None:
    """The slot map of one tile of :data:`CPU_INT4_TILE_ROWS` rows, when PyTorch's layout repeats tile by tile.

    A full-size map costs 8 bytes per weight (512 MB for a 16384 x 4096 layer); PyTorch packs each block of
    rows on its own, so one tile's map serves every tile. Checked on two tiles; None if the layout ever stops
    being tile-local (then the full map is used).
    """
    two = _learn_cpu_int4_slots(2 * CPU_INT4_TILE_ROWS, in_features)
    tile = CPU_INT4_TILE_ROWS * in_features
    if not torch.equal(two[tile:], two[:tile] + tile):
        return None
    return two[:tile]


def to_cpu_int4pack(nibbles: torch.Tensor, convert: Any = None) -> torch.Tensor:
    """[out, in / 2] nibbles (:func:`pack_nibbles`' layout) -> ``torch._weight_int4pack_mm_for_cpu``'s layout.

    Works :data:`PACK_CHUNK_ROWS` rows at a time (the packer wants int32, 4 bytes a weight) into one
    preallocated result; the layout is the same as packing all rows at once since each block of rows is
    packed on its own. ``convert``: applied to each chunk of bytes first (another nibble layout).
    """
    out_features = nibbles.shape[0]
    step = PACK_CHUNK_ROWS if out_features % CPU_INT4_TILE_ROWS == 0 else out_features
    packed = torch.empty(nibbles.shape, dtype=torch.uint8, device=nibbles.device)
    for i in range(0, out_features, step):
        chunk = nibbles[i:i + step] if convert is None else convert(nibbles[i:i + step])
        packed[i:i + step] = torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(chunk).to(torch.int32), 1)
    return packed


def from_cpu_int4pack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_cpu_int4pack`: [out, in] uint8 values 0..15 (the CPU layout is private to PyTorch)."""
    tile = _cpu_int4_tile_slots(in_features) if out_features % CPU_INT4_TILE_ROWS == 0 else None
    if tile is None:
        slots, tiles = _learn_cpu_int4_slots(out_features, in_features), 1
    else:
        slots, tiles = tile, out_features // CPU_INT4_TILE_ROWS
    packed = packed.cpu().view(torch.uint8).reshape(tiles, -1)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(tiles, -1)  # [tiles, tile rows * in]
    values = torch.empty_like(nibbles)
    values[:, slots] = nibbles
    return values.reshape(out_features, in_features)


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise INT4: (q [out, in] uint8 in 0..15, scales_and_zeros [in/g, out, 2] bf16).

    w ~= (q - 8) * scale + zero, where ``zero`` is the value of the group's mid-point code 8.
    """
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
    best_error = best_q = best_scales = best_zeros = None
    # Clipping search: shrinking a group's range trades clipping of rare outliers for finer steps for the
    # rest; keep, per group, the range with the smallest squared error (cf. llama.cpp's k-quant search).
    for shrink in CLIP_SEARCH:
        scales = ((high - low) * shrink / 15.0).clamp(min=1e-8).to(KERNEL_DTYPE).float()
        zeros = (low * shrink + 8 * scales).to(KERNEL_DTYPE).float()
        q = torch.round((w - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15)
        error = ((q - 8) * scales[..., None] + zeros[..., None] - w).pow(2).sum(-1)  # [out, groups]
        if best_error is None:
            best_error, best_q, best_scales, best_zeros = error, q, scales, zeros
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_q = torch.where(better[..., None], q, best_q)
        best_scales = torch.where(better, scales, best_scales)
        best_zeros = torch.where(better, zeros, best_zeros)
    scales_and_zeros = torch.stack([best_scales, best_zeros], dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
    return best_q.to(torch.uint8).reshape(out_features, in_features), scales_and_zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [out, in/2] uint8 (low nibble = even column)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] uint8 -> [out, in] uint8 values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class Int4Linear(nn.Module):
    """A Linear layer with group-wise INT4 weights; computes in the input's dtype.

    ``weight_int4`` is the canonical nibble layout, except on CPU where it holds the packed layout of
    ``torch._weight_int4pack_mm_for_cpu`` (``self.layout == "cpu"``); the state dict is always canonical.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = DEFAULT_GROUP_SIZE,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = "nibbles"
        self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                             dtype=KERNEL_DTYPE, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                     linear.weight.dtype, linear.weight.device)
        q, module.scales_and_zeros = quantize_int4_groups(linear.weight, group_size)
        module.weight_int4 = pack_nibbles(q)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        module.to_kernel_layout()
        return module

    # -- layouts ---------------------------------------------------------------------------------------
    def to_kernel_layout(self) -> None:
        """Repack for the device the weights are on (CPU: the int4pack kernel's layout)."""
        if self.layout == "nibbles" and _uses_packed_kernels(self.weight_int4.device):
            self.weight_int4 = to_cpu_int4pack(self.weight_int4)
            self.layout = "cpu"

    def canonical_weight(self) -> torch.Tensor:
        """The weights in the canonical nibble layout, whatever the in-memory layout."""
        if self.layout == "nibbles":
            return self.weight_int4
        # The CPU layout is private to PyTorch: undo it with the slot map learnt from PyTorch's own packer.
        q = from_cpu_int4pack(self.weight_int4, self.out_features, self.in_features)
        return pack_nibbles(q).to(self.weight_int4.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_int4"] = self.canonical_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self.layout = "nibbles"
        if prefix + "weight_int4" in state_dict:  # the file holds the canonical layout
            self.weight_int4 = torch.empty_like(state_dict[prefix + "weight_int4"], device=self.weight_int4.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.to_kernel_layout()

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        # Moving between devices: go through the canonical layout, then repack for the new device.
        moved = fn(torch.empty(0, dtype=torch.uint8, device=self.weight_int4.device)).device
        if self.layout == "cpu" and moved != self.weight_int4.device:
            self.weight_int4, self.layout = self.canonical_weight(), "nibbles"
        result = super()._apply(fn, recurse)
        self.to_kernel_layout()
        return result

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_nibbles(self.canonical_weight()).to(dtype)  # [out, in]
        group = torch.arange(self.in_features, device=q.device) // self.group_size
        scales = self.scales_and_zeros[group, :, 0].T.to(dtype)
        zeros = self.scales_and_zeros[group, :, 1].T.to(dtype)
        return (q - 8) * scales + zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.layout == "cpu" and x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
            out = torch._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group_size,
                                                   self.scales_and_zeros.to(KERNEL_DTYPE))
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.dequantized_weight(x.dtype))
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


# --------------------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)


def layer_group_size(in_features: int, group_size: int) -> int | None:
    """The largest kernel group size <= ``group_size`` that divides ``in_features`` (None: none does)."""
    return next((g for g in INT4_GROUP_SIZES[::-1] if g <= group_size and in_features % g == 0), None)


def plan_quantization(model: nn.Module, bits: int, group_size: int, include_embedding: bool) -> dict:
    """Which module gets which format: {"modules": {name: {"bits", "group_size"?}}, "embedding", "tied_head"}."""
    head_name = _output_head_name(model)
    modules: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (name == head_name and not include_embedding):
            continue
        if name == head_name and _is_tied(model):
            continue  # quantized together with the embedding
        group = layer_group_size(module.in_features, group_size)
        if bits == 4 and name != head_name and group:
            modules[name] = {"bits": 4, "group_size": group}
        else:  # the output head stays INT8 (it sets every logit); odd widths fall back to INT8
            modules[name] = {"bits": 8}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_name = next((n for n, m in model.named_modules() if m is embed), None) if include_embedding else None
    return {"modules": modules, "embedding": embedding_name,
            "tied_head": head_name if include_embedding and _is_tied(model) else None}


def _swap_in(model: nn.Module, plan: dict, from_weights: bool) -> nn.Module:
    """Replace the planned modules by quantized ones (quantizing real weights, or empty shells to load into)."""
    for name, spec in plan["modules"].items():
        linear = model.get_submodule(name)
        if from_weights:
            module = Int8Linear.from_linear(linear) if spec["bits"] == 8 else Int4Linear.from_linear(
                linear, spec["group_size"])
        elif spec["bits"] == 8:
            module = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        else:
            module = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, spec["group_size"],
                                linear.weight.dtype)
        _set_module(model, name, module)
    if plan.get("embedding"):
        embed = model.get_submodule(plan["embedding"])
        qembed = Int8Embedding.from_embedding(embed) if from_weights else Int8Embedding(
            embed.num_embeddings, embed.embedding_dim, embed.weight.dtype, embed.padding_idx)
        _set_module(model, plan["embedding"], qembed)
        if plan.get("tied_head"):
            old_head = model.get_submodule(plan["tied_head"])
            _set_module(model, plan["tied_head"], tied_int8_head(qembed, getattr(old_head, "bias", None)))
    return model


def quantize_model(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                   include_embedding: bool = False) -> nn.Module:
    """Quantize ``model``'s Linear layers in place to weight-only INT8 or group-wise INT4; returns it.

    ``include_embedding`` also stores the token embedding (and the output head, tied or not) as INT8.
    The plan is recorded as ``model.config.finechat_quantization`` for :func:`save_quantized`.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    if getattr(getattr(model, "config", None), CONFIG_KEY, None):
        raise ValueError("this model is already quantized")
    plan = plan_quantization(model, bits, group_size, include_embedding)
    if not plan["modules"]:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    with torch.no_grad():
        _swap_in(model, plan, from_weights=True)
    record = {"format_version": FORMAT_VERSION, "bits": bits, "group_size": group_size if bits == 4 else None,
              "include_embedding": include_embedding, "method": "finechat weight-only", **plan}
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, record)
    return model


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of all weights held in memory, number of original parameters) -- tied tensors counted once."""
    seen: set[int] = set()
    total = params = 0
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for name, t in tensors:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
            if name == "weight_int4":
                params += module.in_features * module.out_features
            elif name == "scales_and_zeros" or (name == "scales" and isinstance(module, (Int8Linear, Int8Embedding))):
                pass
            else:
                params += t.numel()
    return total, params


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | Path, source: dict | None = None) -> Path:
    """Write a quantized model as a self-describing folder: config.json (with ``finechat_quantization``),
    model.safetensors, the tokenizer and the generation config."""
    from safetensors.torch import save_file

    record = getattr(model.config, CONFIG_KEY, None)
    if not record:
        raise ValueError("the model is not quantized (call quantize_model first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if record.get("tied_head"):  # shares the embedding's tensors; rebuilt at load
        state = {k: v for k, v in state.items() if not k.startswith(record["tied_head"] + ".")}
    elif _is_tied(model):
        state = {k: v for k, v in state.items() if k != f"{_output_head_name(model)}.weight"}
    tensors, seen = {}, {}
    for key, value in state.items():
        ptr = value.data_ptr()
        if ptr in seen and value.numel():
            raise ValueError(f"{key} shares memory with {seen[ptr]}; cannot write it twice")
        seen[ptr] = key
        tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", CONFIG_KEY: json.dumps(record)})
    config = model.config.to_dict()
    config[CONFIG_KEY] = record
    config.pop("quantization_config", None)
    config["dtype"] = str(next(iter(p for p in model.parameters() if p.is_floating_point()), torch.empty(0)).dtype
                          ).split(".")[-1]
    write_text_atomic(out / "config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if source is not None:
        write_text_atomic(out / "finechat_source.json", json.dumps(source, indent=2, ensure_ascii=False) + "\n")
    return out


def load_quantized(folder: str | Path, config: Any, dtype: torch.dtype = torch.float32, **model_kwargs: Any) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized` (``config`` is its ``AutoConfig``)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{folder}/config.json: {CONFIG_KEY} is missing or of an unknown format version "
                             f"(this finechat reads version {FORMAT_VERSION})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(f"{folder}: model.safetensors is missing")
    if model_kwargs.get("trust_remote_code"):
        model_kwargs = {k: v for k, v in model_kwargs.items() if k != "trust_remote_code"}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
    _swap_in(model, record, from_weights=False)
    state = load_file(str(weights))
    head = record.get("tied_head")
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = {k for k in missing if head and k.startswith(head + ".")}
    if not head and _is_tied(model):
        expected_missing |= {k for k in missing if k == f"{_output_head_name(model)}.weight"}
    missing = [k for k in missing if k not in expected_missing]
    if missing or unexpected:
        raise ModelLoadError(f"{weights}: does not match its config ({len(missing)} missing, e.g. {missing[:3]}; "
                             f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    if head:  # re-share the embedding's INT8 tensors with the head
        embed = model.get_submodule(record["embedding"])
        _set_module(model, head, tied_int8_head(embed, getattr(model.get_submodule(head), "bias", None)))
    elif _is_tied(model) or getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def copy_extra_files(src: Path, out: Path, names: tuple[str, ...] = ("finechat_source.json",)) -> None:
    """Carry small descriptive files (licence, source) over to the quantized folder."""
    for name in names:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
