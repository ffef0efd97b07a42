"""Where and how a model runs: the device, the weights dtype and the number of torch threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from finechat.errors import ModelLoadError


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was asked for but CUDA is not available")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError("device 'mps' was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` torch threads (None: unchanged), restoring the caller's count after."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
