"""Jobs the storage tests send to the store writer's process (StoreWriter.submit sends a
job by name: it must be a function at a module's top level)."""

from __future__ import annotations

import os
import threading
from typing import Any

from devicebridge.errors import SessionStoreError
from devicebridge.storage.desk import StoreDesk

from .test_sessions import open_session


def open_session_job(desk: StoreDesk) -> int:
    return open_session(desk.store)


def append_samples_job(desk: StoreDesk, session_id: int, first: int, samples: Any) -> None:
    desk.store.append_samples(session_id, first, samples)


def where_job(desk: StoreDesk) -> tuple[int, int]:
    """The process and the thread that run the writer's jobs."""
    return os.getpid(), threading.get_ident()


def failing_job(desk: StoreDesk) -> None:
    raise SessionStoreError("disk full", path=desk.path)


class _Unpicklable(Exception):
    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def bug_job(desk: StoreDesk) -> None:
    raise _Unpicklable("a bug in a job", detail="cannot be rebuilt from its args")


def nothing_job(desk: StoreDesk) -> None:
    """Done once every job sent before it is done."""


def spin_job(desk: StoreDesk, cpu_s: float) -> None:
    """Use ``cpu_s`` of CPU time in the writer's process."""
    import time

    end_s = time.process_time() + cpu_s
    while time.process_time() < end_s:
        pass


def policy_limits_job(desk: StoreDesk, *shared: Any) -> Any:
    """The policies and routines as the writer's process got them (sent once, then named
    by a token): the one given alone, or all of them."""
    return shared[0] if len(shared) == 1 else shared


def shared_count_job(desk: StoreDesk) -> int:
    """How many shared objects (policies, routines) the writer's process keeps."""
    from devicebridge.storage import desk as desk_module

    return len(desk_module._SHARED_OBJECTS)
