"""The process between the board and a job: runs ``finechat ARGS`` and records how it ended, board or no board.

``python -m finechat.serve.board.runner JOB_FOLDER ATTEMPT`` reads the job's argument list from
``JOB_FOLDER/board_job.json``, runs ``python -m finechat ARGS`` in the workspace (an argument list, never a
shell string) with its output appended to ``board.log``, and writes ``board_exit.json`` (exit code, whether
it was stopped) when it ends. The board starts it in a session of its own, so a board restart neither stops
the job nor loses its outcome, and a crash of the job is an exit code here, never an error in the board.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from finechat.files import write_json_atomic

JOB_FILE, LOG_FILE, EXIT_FILE = "board_job.json", "board.log", "board_exit.json"


def main(argv: list[str]) -> int:
    folder, attempt = Path(argv[0]), int(argv[1])
    job = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    stopped = False
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(f"\n=== attempt {attempt}: finechat {' '.join(job['argv'])}\n")
        log.flush()
        child = subprocess.Popen([sys.executable, "-m", "finechat", *job["argv"]], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

        def stop(signum: int, frame: object) -> None:
            nonlocal stopped
            stopped = True
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        returncode = child.wait()
    write_json_atomic(folder / EXIT_FILE, {"attempt": attempt, "returncode": returncode, "stopped": stopped,
                                           "ended": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
