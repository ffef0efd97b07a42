"""Python's cyclic garbage collector, kept out of the way of a long pass over data.

Reading and tokenizing allocate a few dicts, lists and tuples per record, and every 700 container allocations
CPython's collector runs; its older generations then walk every object alive in the process, and a process that
has imported torch and transformers and loaded a tokenizer tracks ~375,000 of them. Measured on 100,000 ADGEN-like
records (``benchmarks/data_scale.py``, one process): 10.9 s with the collector as it is, 6.4 s with the objects
alive at the start frozen (``gc.freeze``, they are never garbage of this pass) and young collections 70x rarer.
Reference counting frees the records as before; cyclic garbage made during the pass is still collected, only less
often, and what was frozen is collected normally again once the block ends.

The standard library has the two calls; what this module adds is giving them back: the caller's thresholds
and its own frozen objects are as they were afterwards (a command must not leave process-wide state changed).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG_THRESHOLD = 50_000  # container allocations between young collections (CPython's default: 700)


@contextmanager
def quiet_collector() -> Iterator[None]:
    """Freeze what is alive now and collect young objects rarely, for the block; then undo both."""
    thresholds, froze = _quiet()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if froze:
            gc.unfreeze()


def quiet_worker() -> None:
    """The same for a worker process of ours for its whole life (nothing to give back: it ends with the pass)."""
    _quiet()


def _quiet() -> tuple[tuple[int, ...], bool]:
    """Freeze (unless the caller has frozen its own objects: they stay frozen) and raise the young threshold;
    returns the thresholds before and whether this froze."""
    thresholds = gc.get_threshold()
    froze = gc.get_freeze_count() == 0
    if froze:
        gc.freeze()
    gc.set_threshold(max(thresholds[0], YOUNG_THRESHOLD), *thresholds[1:])
    return thresholds, froze
