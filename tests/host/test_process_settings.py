"""What a command sets for its whole process so the event loop answers devices first."""

from __future__ import annotations

import gc
import sys

from devicebridge.app import (
    THREAD_SWITCH_INTERVAL_S,
    YOUNG_COLLECTION_CONTAINERS,
    event_loop_first,
    freeze_start_up,
)


def test_a_command_bounds_the_gil_wait_and_gives_back_what_start_up_froze_and_set() -> None:
    before = sys.getswitchinterval()
    thresholds = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with event_loop_first():
        assert sys.getswitchinterval() == min(before, THREAD_SWITCH_INTERVAL_S)
        made_at_start_up = [[index] for index in range(1000)]  # containers: tracked
        freeze_start_up()
        # The full passes no longer scan what start-up made.
        assert gc.get_freeze_count() > len(made_at_start_up)
        oldest = {id(o) for o in gc.get_objects(generation=2)}
        assert not any(id(o) in oldest for o in made_at_start_up)
        assert gc.get_threshold() == (YOUNG_COLLECTION_CONTAINERS, *thresholds[1:])
    assert sys.getswitchinterval() == before
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds
