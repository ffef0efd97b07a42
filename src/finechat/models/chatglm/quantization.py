"""ChatGLM-6B's weight-only INT8 / INT4 quantization, in its own checkpoint format, in plain PyTorch.

The published chatglm-6b-int4 / -int8 folders store, for ``query_key_value``, ``dense``, ``dense_h_to_4h``
and ``dense_4h_to_h`` of every block, an int8 ``weight`` and an fp16 ``weight_scale`` (one per output row),
plus the fp16 ``bias``. The reference code quantizes and dequantizes with CUDA kernels (cpm_kernels) or C
code compiled with gcc at run time; this module does the same arithmetic with torch operations so that
those folders run on CPU and on CUDA with nothing compiled. The formulas, which must stay bit-exact:

- scale = fp16(absmax(row) / (2^(bits-1) - 1)); q = int8(round(w / scale)) (w in its own dtype, so an fp16
  model divides in fp16 exactly like the reference);
- INT4: two values per byte, element 2j in the high nibble, 2j+1 in the low nibble (two's complement);
- dequantization: fp16(q) * scale, in fp16; the matmul then runs in the activations' dtype.

Neither bitsandbytes nor torchao reads this layout (and torchao's INT4 needs a kernel package absent on
CPU), hence our own small module; the generic quantization of other models lives in finechat.models.quantize.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [out, in * bits / 8] (packed for INT4), fp16 scale [out])."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
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


class QuantizedLinear(nn.Module):
    """A Linear layer holding ChatGLM's int8 / packed-int4 ``weight``, fp16 ``weight_scale`` and ``bias``."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.float16):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.weight_bit_width = in_features, out_features, bits
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., in] -> [..., out]; the weight is rebuilt in fp16 (as the reference) and used in x's dtype
        weight = dequantize_weight(self.weight, self.weight_scale, self.weight_bit_width).to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_bit_width}"


def quantize_layers(layers: nn.ModuleList, bits: int, empty: bool = False) -> None:
    """Replace the four Linear layers of every block with :class:`QuantizedLinear` (in place).

    ``empty``: build zero-filled layers to be loaded from a quantized checkpoint instead of quantizing.
    """
    for block in layers:
        for path in QUANTIZED_LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, name)
            if isinstance(linear, QuantizedLinear):
                if linear.weight_bit_width != bits:
                    raise ValueError(f"the model is already quantized to {linear.weight_bit_width} bits")
                continue
            if empty:
                new = QuantizedLinear(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                                      device=linear.weight.device, bias_dtype=linear.weight.dtype)
            else:
                new = QuantizedLinear.from_linear(linear, bits)
            setattr(parent, name, new)
