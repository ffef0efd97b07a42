"""Messages for people: progress and notices on stderr, so that stdout stays clean for answers and data."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """Progress for people, on stderr so that stdout stays clean for answers and data."""
    print(message, file=sys.stderr, flush=True)
