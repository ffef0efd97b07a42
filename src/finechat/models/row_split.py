"""Linear layers for CPU decoding: fp32 products over a few rows as one batched product, bf16 rows on ATen.

Why: at batch 1 every Linear layer is a matrix-vector product; ``F.linear`` hands it to MKL's
matrix-vector kernel, which runs on one core, while ``torch.bmm`` over row chunks of the same weight (a
view, no copy) runs the chunks side by side, one per thread. No library offers this for plain fp32 layers
(torchao, optimum-quanto and bitsandbytes target quantized or GPU kernels). Measurements and the size
thresholds' reasons: docs/results/decode.md ("Why the fast decoder looks as it does").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

MAX_SPLIT_ROWS = 32  # up to this many rows (sequences x new tokens) a Linear layer runs as row chunks
MIN_SPLIT_WEIGHTS = 1 << 16  # smaller weights stay in cache, where splitting only adds ~8 us of overhead


class RowSplitLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose products over a few rows run as ``row_chunks`` matrix-vector products at once.

    Installed in place by :func:`split_linear_layers`; same parameters, same state dict, same results up to
    the order of the additions inside each dot product.
    """

    row_chunks: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(self, x)


def split_linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: fp32, up to :data:`MAX_SPLIT_ROWS` rows as one batched product over row
    chunks; bf16, one row on ATen's matrix-vector kernel (:func:`aten_single_row_products`)."""
    weight = module.weight
    in_features = weight.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    if weight.dtype == torch.bfloat16:  # not split; one row on ATen's kernel
        with aten_single_row_products(rows, x.dtype, x.device):
            return F.linear(x, weight, module.bias)
    if not 0 < rows <= MAX_SPLIT_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or weight.device.type != "cpu" or x.device.type != "cpu" or not weight.is_contiguous() \
            or torch.get_num_threads() < 2:
        return F.linear(x, weight, module.bias)
    chunks = module.row_chunks
    # [chunks, out/chunks, in] @ [chunks, in, rows]: at::bmm hands each chunk to its own thread
    out = torch.bmm(weight.view(chunks, -1, in_features), x.reshape(rows, in_features).t().expand(chunks, -1, -1))
    out = out.permute(2, 0, 1).reshape(*x.shape[:-1], weight.shape[0])
    return out if module.bias is None else out + module.bias


@contextlib.contextmanager
def aten_single_row_products(rows: int, dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Within: bf16 CPU products of a single row run on ATen's own kernel rather than oneDNN's.

    Why: for one row oneDNN's bf16 matmul streams the weight at ~60% of ATen's matrix-vector kernel
    (4096 x 12288, 2 cores: 19.5 vs 32.6 GB/s; 130528 x 4096: 19 vs 32), while from a few rows up oneDNN is
    many times faster, so the choice is per product. torch offers no per-call choice, only its process-wide
    ``mkldnn`` switch: it is turned off for the one product and restored after (also on error); a product of
    another thread during that window takes ATen's kernel too (same values up to the order of the additions).
    Only Linear layers use it: ATen's bf16 batched products (attention) are slower than oneDNN's even for one row.
    """
    if rows != 1 or dtype != torch.bfloat16 or device.type != "cpu" or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


def plain_module(module: Any) -> bool:
    """No hooks and no per-instance forward (accelerate's offloading wraps ``forward`` on the instance)."""
    return not module._forward_hooks and not module._forward_pre_hooks and "forward" not in module.__dict__


def _row_chunks(out_features: int) -> int:
    """The largest divisor of ``out_features`` up to the number of threads; 1 when none (or one thread)."""
    for chunks in range(torch.get_num_threads(), 1, -1):
        if out_features % chunks == 0:
            return chunks
    return 1


def split_linear_layers(model: Any) -> int:
    """Make every plain fp32 / bf16 CPU ``nn.Linear`` of ``model`` a :class:`RowSplitLinear`, in place; returns
    how many.

    Weights are untouched (no copy, tied weights stay tied, saving is unchanged). peft's adapter matrices,
    hooked or accelerate-wrapped modules and weights under :data:`MIN_SPLIT_WEIGHTS` entries are left as they are.
    bf16 layers are not split (splitting made them slower): their one-row products go to ATen's kernel instead.
    """
    changed = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module) is not torch.nn.Linear or "lora_" in name or weight is None or not plain_module(module):
            continue
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) \
                or weight.numel() < MIN_SPLIT_WEIGHTS:
            continue
        chunks = _row_chunks(weight.shape[0]) if weight.dtype == torch.float32 else 1
        if chunks < 2 and weight.dtype == torch.float32:
            continue
        module.__class__ = RowSplitLinear
        module.row_chunks = chunks
        changed += 1
    return changed


def unsplit_linear_layers(model: Any) -> int:
    """Undo :func:`split_linear_layers`: every :class:`RowSplitLinear` is an ``nn.Linear`` again."""
    changed = 0
    for module in model.modules():
        if type(module) is RowSplitLinear:
            module.__class__ = torch.nn.Linear
            del module.row_chunks
            changed += 1
    return changed
