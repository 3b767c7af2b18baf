"""What the store writer's process holds and runs (:mod:`devicebridge.storage.writer`):
a :class:`StoreDesk` for each writer, the objects the bridge's process shared once, and
the writer's own jobs.

Kept apart from the writer's side in the bridge's process, and light: the writer's
process imports this module to start, and what a job names (its function, the classes of
its arguments) when the job arrives, so that it answers its first job a few hundredths of
a second after it starts, not a few tenths (a QA run, a ``devicebridge run``, waits for
that first job).
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from devicebridge.errors import SessionStoreError
from devicebridge.storage.sessions import ChunkRow, DecisionRow, SessionStore

if TYPE_CHECKING:
    from devicebridge.core.admission import PastSession


class StoreDesk:
    """A store as the writer's process holds it for one
    :class:`~devicebridge.storage.writer.StoreWriter`: its
    connection (opened with the first job that uses it), and the runs admitted on it.

    Every job of a writer gets its desk as its first argument, in the writer's process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._store: SessionStore | None = None
        # Runs admitted on this store that have not ended, by run, with the id of the
        # session each has stored so far (None before it has): read and changed only by
        # the writer's jobs, which run one at a time, so that an admission there counts
        # every run admitted before it (see RoutineRunner.admit).
        self.admitted_runs: dict[int, tuple[PastSession, int | None]] = {}
        # Sessions whose telemetry a failed commit lost, with the failure (a session's
        # last commit raises it: its record must not say it was all stored).
        self.unstored: dict[int, str] = {}
        self.closed = False

    @classmethod
    def of(cls, store: SessionStore) -> StoreDesk:
        """A desk on a store already open here (a run with no writer: nothing counted)."""
        desk = cls(store.path)
        desk._store = store
        return desk

    @property
    def store(self) -> SessionStore:
        if self._store is None:
            self._store = SessionStore(self.path)
        return self._store

    def close(self) -> None:
        self.closed = True
        if self._store is not None:
            self._store.close()
            self._store = None


def _rebuilt(cls: type[Any], values: dict[str, Any]) -> Any:
    return cls(**values)


def _reduce_dataclass(obj: Any) -> tuple[Any, ...]:
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    return (_rebuilt, (type(obj), values))


def _cross_by_init(*modules: ModuleType) -> None:
    """The dataclasses of ``modules`` cross to and from the writer's process through
    their ``__init__``: compiled with mypyc (the compiled build), a frozen dataclass's
    own unpickling sets its fields one by one, which it refuses."""
    for module in modules:
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == module.__name__
            ):
                copyreg.pickle(obj, _reduce_dataclass)


@functools.cache
def cross_core_dataclasses() -> None:
    """What a job sends or answers (policies and routines for admission, admissions)
    crosses through ``__init__`` (see :func:`_cross_by_init`): called where such a job is
    sent, and in the writer's process before it answers a job once the core's policy is
    loaded there (once is enough)."""
    from devicebridge.core import admission, policy, routine

    _cross_by_init(admission, policy, routine)


# What the bridge's process sent once for later jobs to name (in the writer's process).
_SHARED_OBJECTS: Final[dict[int, object]] = {}


def shared_object(token: int) -> object:
    """The object the bridge's process shared as ``token`` (in the writer's process)."""
    return _SHARED_OBJECTS[token]


def share_object(token: int, obj: object) -> None:
    _SHARED_OBJECTS[token] = obj


def forget_object(token: int) -> None:
    _SHARED_OBJECTS.pop(token, None)


# --------------------------------------------------------------------------- jobs
# The writer's own (StoreWriter): each runs in the writer's process, with the writer's desk.


def nothing(desk: StoreDesk) -> None:
    """Done once every job sent before it is done."""


def write_rows(
    desk: StoreDesk, rows: list[ChunkRow], decisions: list[tuple[int, Sequence[DecisionRow]]]
) -> None:
    try:
        desk.store.append_rows(rows, decisions)
    except SessionStoreError as exc:
        for session_id in {row[0] for row in rows} | {d[0] for d in decisions}:
            desk.unstored.setdefault(session_id, str(exc))
        raise


def commit_rows(
    desk: StoreDesk,
    session_id: int,
    rows: list[ChunkRow],
    decisions: list[tuple[int, Sequence[DecisionRow]]],
) -> None:
    failure = desk.unstored.pop(session_id, None)
    if failure is not None:
        raise SessionStoreError(f"telemetry not stored: {failure}", path=desk.path)
    desk.store.append_rows(rows, decisions)


def finish_session_rows(
    desk: StoreDesk,
    session_id: int,
    rows: list[ChunkRow],
    decisions: list[tuple[int, Sequence[DecisionRow]]],
    record: dict[str, Any],
    admitted_run: int | None,
) -> None:
    try:
        commit_rows(desk, session_id, rows, decisions)
    finally:
        try:
            desk.store.finish_session(session_id, **record)
        finally:
            if admitted_run is not None:
                desk.admitted_runs.pop(admitted_run, None)


def release_admitted_run(desk: StoreDesk, run_key: int) -> None:
    desk.admitted_runs.pop(run_key, None)


def close_desk(desk: StoreDesk) -> None:
    desk.close()
