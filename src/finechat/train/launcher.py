"""torchrun with finechat's ending: ``python -m finechat.train.launcher TORCHRUN_ARGS``.

``finechat train --nproc-per-node N`` re-executes itself through this module. It is torchrun itself
(``torch.distributed.run``'s own argument parser, elastic agent and rendezvous); only the ending differs. When a
rank fails, torchrun stops the others (SIGTERM, within its ``--monitor-interval``) and then raises
``ChildFailedError``, which its ``main`` prints as a second traceback of its own plus a box that repeats "To
enable traceback see ..." for a rank whose error it did not record. The failing rank has already printed its
error (one line for a finechat error, its traceback for anything else; see :func:`finechat.train.distributed.
report_rank_failure`), so here the agent's exception becomes one line naming the rank that failed first and how,
and the exit code is that rank's (3 for bad data, 2 for a bad setting, 1 otherwise). A rank that only lost a
peer (exit code :data:`finechat.train.distributed.PEER_LOST_EXIT`) is named only when no other rank failed here
(the one that left ran on another node).
"""

from __future__ import annotations

import signal
import sys

from finechat.train.distributed import PEER_LOST_EXIT


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = _first_failure(e)
        how = (f"was ended by signal {failure.signal_name()}" if failure.exitcode < 0 else
               "lost a peer (a rank on another node left the run first)" if failure.exitcode == PEER_LOST_EXIT else
               f"failed first (exit code {failure.exitcode}; its error is above)")
        others = len(e.failures) - 1
        print(f"finechat train: rank {rank} {how}; torchrun stopped every rank"
              + (f" ({others} more ended after it)" if others else ""), file=sys.stderr)
        return failure.exitcode if 0 < failure.exitcode != PEER_LOST_EXIT else 1
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: the ranks were stopped by the agent
        print(f"finechat train: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


def _first_failure(error):
    """The failure to name: torchrun's first one, passing over the ranks that only lost a peer and those that
    torchrun itself stopped (SIGTERM) once another had failed. torchrun orders its failures by whole-second
    timestamps and, on a tie, takes the lowest rank: often one of those (rank 0, where rank 1 had failed)."""
    failures = error.failures
    for passed_over in ({PEER_LOST_EXIT, -signal.SIGTERM}, {PEER_LOST_EXIT}):
        own = {rank: f for rank, f in failures.items() if f.exitcode not in passed_over}
        if own:
            rank = min(own, key=lambda r: (own[r].timestamp, r))
            return rank, own[rank]
    return error.get_first_failure()


if __name__ == "__main__":
    sys.exit(main())
