"""Mixing several data sets by sampling ratios, the way ``datasets.interleave_datasets`` does.

At each step one source is drawn with probability ``ratios[i]`` (a ``random.Random(seed)``, so a seed repeats
the mix) and gives its next conversation. ``stop="first_exhausted"`` ends the mix when a drawn source has run
out (undersampling); ``"all_exhausted"`` starts a source that ran out again from its beginning until every
source has run out at least once (oversampling). A source with ratio 0 gives nothing.

We interleave lazily ourselves instead of calling ``datasets.interleave_datasets`` because the sources are
streams of ``Conversation`` objects read from any supported format (each record keeps its file and row), not
Arrow tables of one schema; the semantics are the same.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

from finechat.errors import ConfigError, DataFileError

STOPS = ("first_exhausted", "all_exhausted")


@dataclasses.dataclass
class MixSettings:
    """Sampling ratios of the data sources (one per source, summing to 1), the stopping rule and the seed."""

    ratios: list[float]
    stop: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    seed: int = 42

    def __post_init__(self) -> None:
        if self.stop not in STOPS:
            raise ConfigError(f"mix_stop: {self.stop!r} is not one of {', '.join(STOPS)}")
        for i, r in enumerate(self.ratios):
            if not isinstance(r, (int, float)) or isinstance(r, bool) or r < 0:
                raise ConfigError(f"mix[{i}]: {r!r} is not a ratio >= 0")
        total = sum(self.ratios)
        if abs(total - 1) > 1e-6:
            raise ConfigError(f"mix: the ratios {self.ratios} sum to {total:g}, not 1")

    def check(self, sources: int) -> None:
        if len(self.ratios) != sources:
            raise ConfigError(f"mix: {len(self.ratios)} ratios for {sources} data sources; give one ratio per "
                              "entry of data")


class SourceCounter:
    """How many conversations each data source gave."""

    def __init__(self, names: list[str]):
        self.names, self.rows = names, [0] * len(names)

    def count(self, i: int) -> None:
        self.rows[i] += 1

    def table(self) -> list[dict[str, Any]]:
        return [{"source": name, "rows": n} for name, n in zip(self.names, self.rows)]


def interleave(streams: list[Callable[[], Iterator[Any]]], mix: MixSettings, counter: SourceCounter) -> Iterator[Any]:
    """Items of the streams (each a function that starts one afresh) drawn by ``mix``; counted per source."""
    mix.check(len(streams))
    rng = random.Random(mix.seed)
    live = [mix.ratios[i] > 0 for i in range(len(streams))]
    exhausted = [not x for x in live]
    iters: list[Iterator[Any] | None] = [s() if live[i] else None for i, s in enumerate(streams)]
    weights = list(mix.ratios)
    while True:
        i = rng.choices(range(len(streams)), weights=weights)[0]
        item = next(iters[i], _END)  # type: ignore[arg-type]
        if item is _END:
            exhausted[i] = True
            if mix.stop == "first_exhausted" or all(exhausted):
                return
            iters[i] = streams[i]()  # oversample: this source starts again
            item = next(iters[i], _END)
            if item is _END:
                raise DataFileError(f"{counter.names[i]}: this data source has no records to mix")
        counter.count(i)
        yield item


_END = object()
