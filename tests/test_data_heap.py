"""finechat.data.heap: the garbage collector is quiet inside the block and as it was after it."""

import gc

from finechat.data.heap import YOUNG_THRESHOLD, quiet_collector


def test_quiet_collector_freezes_and_gives_everything_back():
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with quiet_collector():
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_callers_own_frozen_objects_stay_frozen_and_an_error_still_gives_back():
    before = gc.get_threshold()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        try:
            with quiet_collector():
                raise KeyError("in the block")
        except KeyError:
            pass
        assert gc.get_freeze_count() == frozen and gc.get_threshold() == before
    finally:
        gc.unfreeze()
