"""Places held in a batch scheduler's queue for one request: all-or-nothing admission (``BatchScheduler.reserve``).

A request that starts several generations (several prompts) or runs scoring work beside the batch holds all
its places first, so it is refused whole with a 429, never half started.
"""

from __future__ import annotations

import threading
from typing import Any


class Reservation:
    """Places held in a :class:`BatchScheduler`'s queue (:meth:`BatchScheduler.reserve`): ``submit`` uses one,
    ``release`` gives back one; ``close`` gives back all that are left (also on ``with`` exit)."""

    def __init__(self, scheduler: Any, places: int):  # a BatchScheduler (which imports this module)
        self.scheduler, self.left = scheduler, places
        self._guard = threading.Lock()

    def _take(self) -> bool:
        with self._guard:
            if self.left < 1:
                return False
            self.left -= 1
            return True

    def submit(self, input_ids: list[int], settings: Any) -> Any:
        if not self._take():
            return self.scheduler.submit(input_ids, settings)  # more than reserved: an ordinary admission
        return self.scheduler.submit(input_ids, settings, reserved=True)

    def release(self, places: int = 1) -> None:
        with self._guard:
            places = min(places, self.left)
            self.left -= places
        if places:
            self.scheduler._release(places)

    def close(self) -> None:
        self.release(self.left)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
