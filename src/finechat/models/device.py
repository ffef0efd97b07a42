"""Where and how a model runs: the device, the weights dtype and the number of torch threads."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from finechat.console import log
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


def busy_cpu_threads() -> tuple[int | None, str | None]:
    """One torch thread when the CPU is already busy (load average >= its cores), else None (torch's default),
    with the notice that says so; OMP_NUM_THREADS, when set, is the user's choice and wins.

    Why: with the load average at 5-17 on 2 cores, PyTorch's OpenMP threads wait on threads the OS has
    descheduled; the same ``finechat chat`` took 65-191 s with the default threads and 24 s with one, and 16
    greedy tokens for 4 prompts 39 s against over 300 s (docs: NOTES, quickstart).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if "OMP_NUM_THREADS" in os.environ or cores <= 1:
        return None, None
    load = os.getloadavg()[0]
    if load < cores:
        return None, None
    return 1, (f"The CPU is busy (load average {load:.1f} on {cores} cores): using one thread "
               "(set OMP_NUM_THREADS to choose).")


# The notice of the running cpu_threads block, said when its first model loads (say_thread_choice), not before:
# bad input found before any model loads stays a one-line error. [message, said]; empty outside a block.
_THREAD_NOTICE: list = []


def say_thread_choice() -> None:
    """Say the busy-CPU thread choice once, as a model starts loading (models.resolve calls it)."""
    if _THREAD_NOTICE and not _THREAD_NOTICE[1]:
        _THREAD_NOTICE[1] = True
        log(_THREAD_NOTICE[0])


@contextlib.contextmanager
def cpu_threads() -> Iterator[None]:
    """Run a block that runs a model with the threads :func:`busy_cpu_threads` chooses, restoring the caller's
    count after (every model-running command goes through this; ``bench --threads`` pins its own inside)."""
    threads, notice = busy_cpu_threads()
    if threads is None:
        yield  # torch not even imported: commands that end early stay light
        return
    outer = list(_THREAD_NOTICE)
    _THREAD_NOTICE[:] = [notice, bool(outer and outer[1])]  # said once per process, also when blocks nest
    try:
        with torch_threads(threads):
            yield
    finally:
        said = _THREAD_NOTICE[1]
        _THREAD_NOTICE[:] = [outer[0], outer[1] or said] if outer else []


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
