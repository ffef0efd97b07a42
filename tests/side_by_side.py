"""Commands that run beside a test's own work: CI has two cores, so a test that starts a command and does something
else meanwhile takes the longer of the two instead of their sum."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def beside(*argvs: list[str], stdin: bool = False, **popen_kwargs) -> Iterator[list[subprocess.Popen]]:
    """Start every command (stdout and stderr piped, text; stdin piped if asked) and yield their processes; one still
    running when the block ends (an assertion failed first) is killed."""
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, **popen_kwargs) for argv in argvs]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
