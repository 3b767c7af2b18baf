"""The MQTT outbox: what the bridge would publish, kept in SQLite until the broker has it.

Messages are appended in order and removed only after the broker acknowledged them
(QoS 1 PUBACK), so a broker outage or a killed bridge loses nothing and delivery resumes
in order. Each message carries a ``message_id`` (``<bridge>:<sequence>``) that is also in
its payload and its MQTT 5 user properties: a message re-sent after a crash between the
broker's PUBACK and the local delete has the same id, so a subscriber that keeps the ids
it has seen processes it once.

A writer that produces many messages (the service) stages them (:meth:`Outbox.stage`) and
stores each group with one :meth:`Outbox.commit`: one transaction for a group instead of
one per message. A staged message is not yet stored and not yet offered to the link.

Acknowledged messages leave at once in memory (:meth:`Outbox.delivered`: they are neither
counted nor offered again) and from SQLite with the next commit, in its transaction, or at
the latest once :data:`MAX_UNPURGED_MESSAGES` wait to be removed (and on close): one
transaction for what a flush stores and what the broker took since, instead of one per
PUBACK. A bridge killed meanwhile re-sends those (at most that many) with their ids.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from devicebridge.errors import OutboxError, OutboxFullError
from devicebridge.storage.sqlite import connect

OUTBOX_FILENAME: Final = "outbox.sqlite3"
DEFAULT_MAX_MESSAGES: Final = 1_000_000
# While no more than this many messages wait, they are also kept in memory, so that the
# link does not read back from SQLite what was just written (the usual case: the broker
# keeps up). After a long outage the waiting messages are read from SQLite again.
MIRROR_MAX_MESSAGES: Final = 10_000
# Acknowledged messages removed from SQLite at the latest once this many wait for it (their
# removal otherwise goes with the next commit): what a killed bridge may re-send.
MAX_UNPURGED_MESSAGES: Final = 1_000


_DELETE_THROUGH: Final = "DELETE FROM outbox WHERE sequence <= ?"
_INSERT: Final = (
    "INSERT INTO outbox (sequence, topic, payload, qos, retain, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    sequence: int
    message_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    def __init__(
        self, path: Path, *, bridge_id: str, max_messages: int = DEFAULT_MAX_MESSAGES
    ) -> None:
        self.path = path
        self.bridge_id = bridge_id
        self.max_messages = max_messages
        try:
            self._db = connect(path)
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS outbox ("
                " sequence INTEGER PRIMARY KEY AUTOINCREMENT,"
                " topic TEXT NOT NULL, payload BLOB NOT NULL,"
                " qos INTEGER NOT NULL, retain INTEGER NOT NULL, created_at TEXT NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open the outbox: {exc}", path=path) from exc
        # Counted once here and kept up to date, instead of COUNT(*) on every append:
        # after a long outage the table is large, exactly when appends must stay cheap.
        (self._count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        # The next sequence is kept in memory too (this bridge is the outbox's only writer):
        # every published message needs its id before it is appended.
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " COALESCE((SELECT MAX(sequence) FROM outbox), 0))"
        ).fetchone()
        self._next_sequence = int(row[0]) + 1
        # Every waiting message, in order, or None while SQLite alone holds them all.
        self._mirror: deque[OutgoingMessage] | None = deque() if self._count == 0 else None
        self._staged: list[tuple[int, str, bytes, int, int]] = []
        # Everything up to this sequence was acknowledged; SQLite still holds what was
        # acknowledged after ``_purged_through`` (removed with the next commit). At open,
        # everything before the oldest stored message is gone.
        (oldest,) = self._db.execute("SELECT MIN(sequence) FROM outbox").fetchone()
        self._delivered_through = self._next_sequence - 1 if oldest is None else oldest - 1
        self._purged_through = self._delivered_through
        self.commits = 0  # transactions that stored messages (for tests and benchmarks)

    def close(self) -> None:
        """Store what is staged, remove what was acknowledged, then close."""
        try:
            self.commit()
            self._purge()
        finally:
            self._db.close()

    def message_id(self, sequence: int) -> str:
        return f"{self.bridge_id}:{sequence}"

    def next_sequence(self) -> int:
        """The sequence the next appended or staged message will get (to put its id in the
        payload)."""
        return self._next_sequence

    def append(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        return self.append_many([(topic, payload, qos, retain)])[0]

    def append_many(self, messages: Sequence[tuple[str, bytes, int, bool]]) -> list[int]:
        """Append ``(topic, payload, qos, retain)`` messages in order, in one transaction.

        All of them are stored or none (a full outbox refuses the whole group): one commit
        for a group of messages instead of one per message. Messages staged before are
        stored with them (they come first).
        """
        if not messages:
            return []
        self._check_room(len(messages))
        sequences = [
            self.stage(topic, payload, qos=qos, retain=retain)
            for topic, payload, qos, retain in messages
        ]
        self.commit()
        return sequences

    @property
    def staged(self) -> int:
        """Messages staged and not yet committed."""
        return len(self._staged)

    def stage(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Give a message its sequence and keep it for the next :meth:`commit`."""
        self._check_room(1)
        sequence = self._next_sequence
        self._next_sequence = sequence + 1
        self._staged.append((sequence, topic, payload, qos, int(retain)))
        return sequence

    def commit(self) -> int:
        """Store every staged message in one transaction; returns how many.

        On an error nothing is stored and the messages stay staged (a later commit tries
        them again, with the same sequences).
        """
        staged = self._staged
        if not staged:
            return 0
        created_at = datetime.now(UTC).isoformat()
        rows = [(*row, created_at) for row in staged]
        delivered_through = self._delivered_through
        purge = delivered_through > self._purged_through
        try:
            if len(rows) == 1 and not purge:
                self._db.execute(_INSERT, rows[0])  # autocommit: one statement, one transaction
            else:
                with self._db:  # sqlite3 commits (or rolls back) the group as one transaction
                    self._db.execute("BEGIN")
                    if purge:
                        self._db.execute(_DELETE_THROUGH, (delivered_through,))
                    self._db.executemany(_INSERT, rows)
        except sqlite3.Error as exc:
            raise OutboxError(str(exc), path=self.path) from exc
        if purge:
            self._purged_through = delivered_through
        self._staged = []
        self.commits += 1
        self._count += len(rows)
        mirror = self._mirror
        if mirror is not None:
            if len(mirror) + len(rows) > MIRROR_MAX_MESSAGES:
                self._mirror = None  # SQLite holds them; read from there until drained
            else:
                mirror.extend(
                    OutgoingMessage(seq, self.message_id(seq), topic, payload, qos, bool(retain))
                    for seq, topic, payload, qos, retain in staged
                )
        return len(rows)

    def _check_room(self, adding: int) -> None:
        waiting = self._count + len(self._staged)
        if waiting + adding > self.max_messages:
            raise OutboxFullError(
                f"{waiting} messages waiting for the broker (limit {self.max_messages})",
                path=self.path,
            )

    def pending(self, limit: int = 100) -> list[OutgoingMessage]:
        """The oldest ``limit`` messages not yet acknowledged, in order."""
        return self.pending_after(0, limit)

    def pending_after(self, sequence: int, limit: int) -> list[OutgoingMessage]:
        """The oldest ``limit`` stored messages after ``sequence`` (those already in flight
        on the link come before it), in order."""
        mirror = self._mirror
        if mirror is not None:
            return list(
                itertools.islice(
                    itertools.dropwhile(lambda m: m.sequence <= sequence, mirror), limit
                )
            )
        rows = self._db.execute(
            "SELECT sequence, topic, payload, qos, retain FROM outbox WHERE sequence > ?"
            " ORDER BY sequence LIMIT ?",
            (max(sequence, self._delivered_through), limit),  # acknowledged: gone
        ).fetchall()
        messages = [
            OutgoingMessage(seq, self.message_id(seq), topic, bytes(payload), qos, bool(retain))
            for seq, topic, payload, qos, retain in rows
        ]
        if len(messages) == self._count and self._count <= MIRROR_MAX_MESSAGES:
            self._mirror = deque(messages)  # all of them: mirror again from here on
        return messages

    def delivered(self, sequence: int) -> None:
        """The broker acknowledged this message (and, MQTT keeping order, all before it).

        They leave the outbox now; SQLite drops them with the next commit (see the module's
        doc), or now once :data:`MAX_UNPURGED_MESSAGES` wait for it.
        """
        if sequence <= self._delivered_through:
            return
        mirror = self._mirror
        if mirror is not None:
            removed = 0
            while mirror and mirror[0].sequence <= sequence:
                mirror.popleft()
                removed += 1
        else:  # no copy in memory: count what SQLite holds of the range
            try:
                (removed,) = self._db.execute(
                    "SELECT COUNT(*) FROM outbox WHERE sequence > ? AND sequence <= ?",
                    (self._delivered_through, sequence),
                ).fetchone()
            except sqlite3.Error as exc:
                raise OutboxError(str(exc), path=self.path) from exc
        self._delivered_through = sequence
        self._count -= removed
        # One sequence per message: the distance is how many wait for their removal.
        if sequence - self._purged_through >= MAX_UNPURGED_MESSAGES:
            self._purge()

    def _purge(self) -> None:
        """Remove from SQLite what the broker acknowledged."""
        through = self._delivered_through
        if through <= self._purged_through:
            return
        try:
            self._db.execute(_DELETE_THROUGH, (through,))
        except sqlite3.Error as exc:
            raise OutboxError(str(exc), path=self.path) from exc
        self._purged_through = through

    def __len__(self) -> int:
        return int(self._count)
