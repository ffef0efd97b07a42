"""ChatGLM-6B's weight-only INT8 / INT4 quantization, in its own checkpoint format, in plain PyTorch.

The published chatglm-6b-int4 / -int8 folders store, for ``query_key_value``, ``dense``, ``dense_h_to_4h``
and ``dense_4h_to_h`` of every block, an int8 ``weight`` and an fp16 ``weight_scale`` (one per output row),
plus the fp16 ``bias``. The reference code quantizes and dequantizes with CUDA kernels (cpm_kernels) or C
code compiled with gcc at run time; this module does the same arithmetic with torch operations so that
those folders run on CPU and on CUDA with nothing compiled (on x86 CPUs, INT4 inference also compiles a small
kernel of our own when gcc is there, for speed only: below). The formulas, which must stay bit-exact:

- scale = fp16(absmax(row) / (2^(bits-1) - 1)); q = int8(round(w / scale)) (w in its own dtype, so an fp16
  model divides in fp16 exactly like the reference);
- INT4: two values per byte, element 2j in the high nibble, 2j+1 in the low nibble (two's complement);
- dequantization: fp16(q) * scale, in fp16; the matmul then runs in the activations' dtype.

Neither bitsandbytes nor torchao reads this layout (and torchao's INT4 needs a kernel package absent on
CPU), hence our own small module; the generic quantization of other models lives in finechat.models.weight_only.

On a CPU, dequantizing to fp16 every step made INT8 / INT4 slower than FP16 (fp16 products are slow on a
CPU). Inference there runs through packed kernels: ``torch._weight_int8pack_mm`` on the stored INT8 weight
as it is; for INT4, finechat's own INT4 x INT8 kernel (finechat.models.int4_kernel: x86, compiled with gcc
at first use; about 1.8x the bandwidth PyTorch's INT4 kernel reaches on 2 cores) on the weight repacked once
into its blocks of 128, else ``torch._weight_int4pack_mm_for_cpu`` (same helpers as
finechat.models.weight_only) on the weight repacked into that kernel's layout. Both repackings are bijections
of the same bytes (ChatGLM's signed nibbles, high first, are the kernels' codes q + 8). ChatGLM's scale is
one per row, so PyTorch's INT4 kernel gets unit scales over groups as wide as it takes and the row scale
multiplies the output. Measured per 4096 x 12288 product, one token, 2 cores: bf16 ``F.linear`` (oneDNN)
1.5-2x the time of PyTorch's kernels; ``benchmarks/chatglm_memory.py`` has the whole model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from finechat.models import int4_kernel
from finechat.models.weight_only import (
    INT4_GROUP_SIZES,
    INT8_KERNEL_WIDTH,
    KERNEL_DTYPE,
    from_cpu_int4pack,
    layer_group_size,
    pack_nibbles,
    to_cpu_int4pack,
)

QUANTIZE_CHUNK_ROWS = 1024  # rows quantized at a time (the temporaries of a 130528-row head would be GBs)
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in * bits / 8] (packed for INT4), fp16 scale [out])."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if weight.shape[0] > QUANTIZE_CHUNK_ROWS:  # row by row arithmetic: chunks give the same bits, less memory
        q = torch.empty(weight.shape[0], weight.shape[1] * bits // 8, dtype=torch.int8, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.float16, device=weight.device)
        for i in range(0, weight.shape[0], QUANTIZE_CHUNK_ROWS):
            q[i:i + QUANTIZE_CHUNK_ROWS], scale[i:i + QUANTIZE_CHUNK_ROWS] = quantize_weight(
                weight[i:i + QUANTIZE_CHUNK_ROWS], bits)
        return q, scale
    scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> [out, in / 2]: element 2j in the high nibble, 2j+1 in the low."""
    if q.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even number of input features, got {q.shape[-1]}")
    q = q.to(torch.int16)
    high, low = q[..., 0::2], q[..., 1::2]
    packed = ((high & 0x0F) << 4) | (low & 0x0F)  # 0..255
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: [out, in / 2] int8 -> [out, in] int8 with sign-extended nibbles."""
    high = packed >> 4  # arithmetic shift keeps the sign of the high nibble
    low = (packed << 4).to(torch.int8) >> 4  # move the low nibble up, then sign-extend it back down
    return torch.stack((high, low), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 (packed for INT4) weight + fp16 row scale -> fp16 [out, in], as the reference's extraction kernels."""
    q = unpack_int4(weight) if bits == 4 else weight
    return q.to(torch.float16) * scale.to(torch.float16)[:, None]


def chatglm_to_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """ChatGLM's INT4 bytes -> finechat.models.weight_only's nibble layout (and back: the map is its own inverse).

    ChatGLM: signed nibbles, element 2j high; the kernels' layout: q + 8 in 0..15, element 2j low. Adding 8
    to a 4-bit two's complement value flips its top bit, so the map is "swap the nibbles, xor 0x88".
    """
    u = packed.view(torch.uint8)
    return ((u >> 4) | (u << 4)) ^ 0x88


def packed_kernel_group_size(in_features: int) -> int | None:
    """The INT4 kernel's group size for a row-scaled weight (the largest that divides the width; None: none)."""
    return layer_group_size(in_features, max(INT4_GROUP_SIZES))


@functools.lru_cache(maxsize=16)
def _unit_scales(groups: int, out_features: int) -> torch.Tensor:
    """scales_and_zeros of 1 and 0 for the INT4 kernel: it then returns x @ q^T and the row scale is applied after."""
    unit = torch.zeros(groups, out_features, 2, dtype=KERNEL_DTYPE)
    unit[..., 0] = 1
    return unit


class QuantizedLinear(nn.Module):
    """A Linear layer holding ChatGLM's int8 / packed-int4 ``weight``, fp16 ``weight_scale`` and ``bias``.

    Inference on a CPU (no gradient) runs through packed kernels: ``torch._weight_int8pack_mm`` (bfloat16
    activations) reads the INT8 weight as stored; INT4 is repacked once, at its first such use, in place
    (``self.layout``), into finechat's INT4 kernel's blocks (``int4_blocks``, float32 activations rounded to
    int8 per block of 128, where that kernel builds and the width is a multiple of 128) or else into
    ``torch._weight_int4pack_mm_for_cpu``'s layout (``cpu_int4pack``, bfloat16 activations). The row scale
    goes to PyTorch's kernels in bf16 (the output is rounded to bf16 anyway: one more rounding of the same size);
    the state dict always holds ChatGLM's layout and fp16 scales, bit for bit. Anywhere else (CUDA,
    training, widths the kernels refuse) the weight is dequantized in fp16 as the reference does.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.weight_bit_width = in_features, out_features, bits
        self.layout = "chatglm"  # or "int4_blocks" / "cpu_int4pack" once repacked for an INT4 kernel
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features * bits // 8, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float16, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        layer = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                    device=linear.weight.device, bias_dtype=linear.weight.dtype)
        q, scale = quantize_weight(linear.weight.detach(), bits)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    # -- the packed CPU kernels ------------------------------------------------------------------------
    def packed_kernels_apply(self, x: torch.Tensor) -> bool:
        """Whether this call can use the packed kernels (CPU, no gradient through it, widths they accept)."""
        if x.device.type != "cpu" or self.weight.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return False
        if self.weight_bit_width == 8:
            return self.in_features % INT8_KERNEL_WIDTH == 0
        if self.layout == "int4_blocks" or (self.layout == "chatglm" and self.own_int4_kernel()):
            return True
        return self.out_features % 16 == 0 and packed_kernel_group_size(self.in_features) is not None

    def own_int4_kernel(self) -> bool:
        """Whether INT4 runs through finechat.models.int4_kernel here (else through PyTorch's INT4 kernel)."""
        return self.weight_bit_width == 4 and int4_kernel.supports(self.in_features) and int4_kernel.available()

    def to_kernel_layout(self) -> None:
        """INT4 on a CPU: repack the weight for the INT4 kernel, in place (INT8 is used as stored)."""
        if self.weight_bit_width == 4 and self.layout == "chatglm" and self.weight.device.type == "cpu":
            if self.own_int4_kernel():
                codes = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
                for i in range(0, self.out_features, QUANTIZE_CHUNK_ROWS):  # ChatGLM's q -> code q + 8
                    rows = self.weight.data[i:i + QUANTIZE_CHUNK_ROWS]
                    codes[i:i + QUANTIZE_CHUNK_ROWS] = int4_kernel.to_blocks((unpack_int4(rows) + 8).to(torch.uint8))
                self.weight.data = codes.view(torch.int8)
                self.layout = "int4_blocks"
            else:
                self.weight.data = to_cpu_int4pack(self.weight.data, convert=chatglm_to_nibbles).view(torch.int8)
                self.layout = "cpu_int4pack"

    def stored_weight(self) -> torch.Tensor:
        """The weight in ChatGLM's layout, whatever the in-memory one."""
        if self.layout == "chatglm":
            return self.weight
        if self.layout == "int4_blocks":
            return pack_int4(int4_kernel.from_blocks(self.weight.data).to(torch.int8) - 8).to(self.weight.device)
        values = from_cpu_int4pack(self.weight.data, self.out_features, self.in_features)
        return chatglm_to_nibbles(pack_nibbles(values)).view(torch.int8).to(self.weight.device)

    def to_stored_layout(self) -> None:
        if self.layout != "chatglm":
            self.weight.data = self.stored_weight()
            self.layout = "chatglm"

    def kernel_scale(self, dtype: torch.dtype = KERNEL_DTYPE) -> torch.Tensor:
        """The row scale in a kernel's dtype, kept while ``weight_scale`` stays the same tensor."""
        return self._converted("weight_scale", dtype)

    def _converted(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        tensor = getattr(self, name)
        key = (tensor.data_ptr(), tensor._version, dtype)
        cached = self.__dict__.get("_kernel_" + name)
        if cached is None or cached[0] != key:
            cached = (key, tensor.detach().to(dtype))
            self.__dict__["_kernel_" + name] = cached
        return cached[1]

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        self.to_kernel_layout()
        if self.layout == "int4_blocks":
            bias = self._converted("bias", torch.float32) if self.bias is not None else None
            out = int4_kernel.matmul(x.reshape(-1, self.in_features), self.weight.view(torch.uint8),
                                     self.kernel_scale(torch.float32), bias)
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [rows, in]
        if self.weight_bit_width == 8:
            out = torch._weight_int8pack_mm(flat, self.weight, self.kernel_scale())
        else:
            # unit scales over the groups (shared by all layers of a shape), the row scale after: one small op
            group = packed_kernel_group_size(self.in_features)
            out = torch._weight_int4pack_mm_for_cpu(flat, self.weight.view(torch.uint8), group,
                                                   _unit_scales(self.in_features // group, self.out_features))
            out = torch.addcmul(self.bias, out, self.kernel_scale()) if self.bias is not None \
                else out * self.kernel_scale()
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_kernels_apply(x):
            return self._packed_forward(x)
        self.to_stored_layout()
        # [..., in] -> [..., out]; the weight is rebuilt in fp16 (as the reference) and used in x's dtype
        weight = dequantize_weight(self.weight, self.weight_scale, self.weight_bit_width).to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, weight, bias)

    # -- state dict and device moves: always ChatGLM's layout and fp16 scales --------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "chatglm":
            destination[prefix + "weight"] = self.stored_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self.to_stored_layout()  # the incoming tensors are in ChatGLM's layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        probe = fn(torch.empty(0, dtype=torch.float16, device=self.weight.device))
        if probe.device != self.weight.device:
            self.to_stored_layout()  # the kernel layout is the CPU's alone
        scale = self.weight_scale.data
        result = super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float16:  # .half()/.bfloat16()/.float(): the scale is part of the format
            self.weight_scale.data = scale.to(self.weight_scale.device)
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_bit_width}"


class PackedHead(nn.Linear):
    """The (tied) output head of a quantized ChatGLM: on a CPU, inference reads an INT8 copy through the INT8 kernel.

    The head reads vocab x hidden weights a token (a bf16 head is a quarter of the bytes an INT4 model reads
    a step); ChatGLM's own INT8 formula per row halves that. The copy is made at the first use, in memory
    only: the state dict holds the tied weight as before, so checkpoints are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad) \
                or self.in_features % INT8_KERNEL_WIDTH:
            return nn.functional.linear(x, self.weight, self.bias)
        q, scale = self.int8_copy()
        out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(KERNEL_DTYPE), q, scale)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def int8_copy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [vocab, hidden], scale [vocab] in the kernel's dtype) of the current weight, made once per version."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        cached = self.__dict__.get("_int8_copy")
        if cached is None or cached[0] != key:
            self.__dict__["_int8_copy"] = None  # free the old copy first
            with torch.no_grad():
                q, scale = quantize_weight(self.weight.detach(), 8)
            cached = (key, q, scale.to(KERNEL_DTYPE))
            self.__dict__["_int8_copy"] = cached
        return cached[1], cached[2]


def linear_layer(in_features: int, out_features: int, bits: int | None) -> nn.Module:
    """A block's Linear layer: ``nn.Linear``, or an empty :class:`QuantizedLinear` to load a quantized checkpoint
    into (no float weight is ever built for it)."""
    if bits:
        return QuantizedLinear(in_features, out_features, bits)
    return nn.Linear(in_features, out_features)


def quantize_layers(layers: nn.ModuleList, bits: int) -> None:
    """Quantize the four Linear layers of every block to :class:`QuantizedLinear` (in place, one at a time)."""
    for block in layers:
        for path in QUANTIZED_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, name)
            if isinstance(linear, QuantizedLinear):
                if linear.weight_bit_width != bits:
                    raise ValueError(f"the model is already quantized to {linear.weight_bit_width} bits")
                continue
            setattr(parent, name, QuantizedLinear.from_linear(linear, bits))
