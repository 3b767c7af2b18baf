"""MQTT ingestion: every bridge's topics into the console's database, each message once.

The :class:`Ingester` holds one MQTT connection with a persistent session (fixed client
id, clean start off, QoS 1 subscriptions), so that what bridges publish while the
console is down waits at the broker; on every connect it subscribes again, which
also brings every retained message (availability, status, device states, installed
programs and the last sessions run with them). Messages are acknowledged to the broker
only after the batch that holds them is committed (paho's manual acknowledgement), so
a console killed mid-batch gets them again.

Idempotence (:class:`IngestStore`): every row a message makes carries the message's
sequence number or a natural key from the bridge (session id, program id, nonce) with
a unique constraint; a retained row is replaced only by a newer message (a larger
sequence), so a re-delivered or replayed message changes nothing and never counts a
session twice.

The same connection sends the programs pushed from the console: a push is stored as
``queued`` first and published (QoS 1) while connected; the bridge's acknowledgement,
matched by nonce, makes it ``accepted`` or ``rejected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, Engine, and_, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from devicebridge.clinic import schema as t
from devicebridge.clinic.authoring import describe_program
from devicebridge.clinic.errors import RecordError
from devicebridge.clinic.records import (
    Place,
    digest_telemetry,
    integer,
    load_json,
    message_sequence,
    moment,
    number,
    parse_topic,
    text,
)
from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.signed_program import ProgramRejectedError, parse_envelope
from devicebridge.integrations.mqtt import (
    CONNACK_UNSUPPORTED_PROTOCOL,
    TOPIC_ROOT,
    MqttSettings,
    Topics,
)

LOG = logging.getLogger(__name__)


def console_topics(root: str) -> tuple[str, ...]:
    """What the console reads of every bridge: everything it publishes but the program
    pushes, which only their bridge reads (docs/mqtt.md: no account reads another's)."""
    return tuple(
        f"{root}/+/{leaf}"
        for leaf in (
            "availability",
            "status",
            "devices/#",
            "sessions/summary",
            "programs/ack",
            "programs/installed",
        )
    )


BATCH_MAX: Final = 2000  # messages committed together at most
CLIENTS_PER_LOOKUP: Final = 500  # bridge ids in one SELECT ... IN (...)
PUSH_POLL_S: Final = 5.0
# What a database refuses of a value (sqlite3 raises OverflowError for a too large int).
REFUSED: Final = (
    SQLAlchemyError,
    OverflowError,
)  # queued pushes are looked for at least this often (wall time)
DEVICE_FAULT_CODES: Final = frozenset({"fault", "hard_limit", "over_temperature"})
SAFETY_STOP_DECISIONS: Final = frozenset({"stop"})
# Sessions stopped by these reasons were stopped by a person or the bridge, not by safety.
ORDINARY_STOPS: Final = frozenset({None, "", "bridge stopped", "user", "stopped by user"})
RUNNING: Final = "running"

Now = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Incoming:
    """One MQTT message as received (``mid``/``qos`` to acknowledge it after the commit)."""

    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 0


@dataclass
class IngestStats:
    messages: int = 0
    applied: int = 0
    duplicates: int = 0  # seen before (same or older sequence): nothing changed
    skipped: int = 0  # not readable as the contract says
    batches: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, other: IngestStats) -> None:
        self.messages += other.messages
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.skipped += other.skipped
        self.batches += 1
        for kind, seen in other.by_kind.items():
            self.by_kind[kind] += seen


def _availability_value(payload: bytes) -> str:
    value = payload.strip().decode("ascii", "replace")
    if value not in ("online", "offline"):
        raise RecordError(f"availability {value[:20]!r} is neither online nor offline")
    return value


@dataclass(frozen=True, slots=True)
class _Availability:
    """A bridge's last availability in a batch, and whether it was online at some point."""

    value: str
    online: bool


@dataclass(frozen=True, slots=True)
class _RunItem:
    """One message of a run: its row's natural key and values (and a session's summary)."""

    key: tuple[int, Any]
    values: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


# Kinds whose consecutive messages are written together (one upsert with RETURNING).
_RUN_KINDS: Final = frozenset({"summary", "device_state"})


@dataclass(slots=True)
class _Run:
    """Consecutive messages of one kind with distinct keys: one statement writes them.

    A repeated key ends the run (one statement cannot change a row twice, and the
    second message must see what the first wrote).
    """

    kind: str
    items: list[_RunItem] = field(default_factory=list)
    keys: set[tuple[int, Any]] = field(default_factory=set)

    def takes(self, kind: str, key: tuple[int, Any]) -> bool:
        return kind == self.kind and key not in self.keys

    def add(self, item: _RunItem) -> None:
        self.items.append(item)
        self.keys.add(item.key)


def _distinct_runs(kind: str, items: Iterable[_RunItem]) -> Iterator[_Run]:
    """``items`` in order, cut into runs where a key comes again."""
    run = _Run(kind)
    for item in items:
        if not run.takes(kind, item.key):
            yield run
            run = _Run(kind)
        run.add(item)
    if run.items:
        yield run


class IngestStore:
    """Applies batches of messages to the database, in one transaction per batch."""

    def __init__(
        self,
        engine: Engine,
        *,
        topic_root: str = TOPIC_ROOT,
        policy: SafetyPolicy | None = None,
        now: Now = utc_now,
    ) -> None:
        self.engine = engine
        self.topic_root = topic_root
        self.policy = policy or default_policy()
        self.now = now
        self.stats = IngestStats()
        self._client_ids: dict[str, int] = {}
        # (client id, serial) -> the console's session row receiving that device's telemetry
        self._open_sessions: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()
        self._dialect = engine.dialect.name
        self._sql = _Statements(self._insert)
        self._load_open_sessions()

    # ------------------------------------------------------------------ helpers

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    def _load_open_sessions(self) -> None:
        with self.engine.connect() as db:
            rows = db.execute(
                select(t.devices.c.client_id, t.devices.c.serial, t.sessions.c.id).join(
                    t.sessions,
                    and_(
                        t.sessions.c.client_id == t.devices.c.client_id,
                        t.sessions.c.bridge_session_id == t.devices.c.session_id,
                    ),
                )
            ).all()
        self._open_sessions = {(r[0], r[1]): r[2] for r in rows}

    def client_id(self, db: Connection, bridge_id: str) -> int:
        """The console's id of a bridge, creating the client on its first message."""
        found = self._client_ids.get(bridge_id)
        if found is None:
            self._know_clients(db, [bridge_id])
            found = self._client_ids[bridge_id]
        return found

    def _know_clients(self, db: Connection, bridge_ids: Iterable[str]) -> None:
        """Create the clients not seen before and learn their ids: two statements for a
        batch, whatever the number of bridges in it (a console started afresh learns a
        clinic's thousands of bridges from its first batches)."""
        new = list(dict.fromkeys(b for b in bridge_ids if b not in self._client_ids))
        if not new:
            return
        now = self.now()
        db.execute(
            self._sql.client_insert,
            [{"bridge_id": b, "created_at": now, "status_seq": 0, "adherence_seq": 0} for b in new],
        )
        for start in range(0, len(new), CLIENTS_PER_LOOKUP):
            chunk = new[start : start + CLIENTS_PER_LOOKUP]
            rows = db.execute(
                select(t.clients.c.id, t.clients.c.bridge_id).where(
                    t.clients.c.bridge_id.in_(chunk)
                )
            )
            self._client_ids.update({row.bridge_id: row.id for row in rows})

    # ------------------------------------------------------------------ batches

    def apply(self, batch: Sequence[Incoming]) -> None:
        """Apply ``batch`` in order, in one transaction; a bad message is skipped.

        A message the database refuses (a value out of what a column holds, say) would
        roll the whole batch back: then each message is applied in a transaction of its
        own and only the refused one is skipped.
        """
        with self._lock:
            try:
                self._apply(batch)
            except REFUSED as exc:
                if len(batch) == 1:
                    self._forget()
                    self.stats.messages += 1
                    self.stats.skipped += 1
                    LOG.warning("skipped a message on %s: %s", batch[0].topic, exc)
                    return
                self._forget()
                for message in batch:
                    try:
                        self._apply([message])
                    except REFUSED as single:
                        self._forget()
                        self.stats.messages += 1
                        self.stats.skipped += 1
                        LOG.warning("skipped a message on %s: %s", message.topic, single)

    def _forget(self) -> None:
        """Drop what a rolled-back transaction may have cached (ids it had created)."""
        self._client_ids.clear()
        self._load_open_sessions()

    def _apply(self, batch: Sequence[Incoming]) -> None:
        counted = IngestStats()
        places = [parse_topic(message.topic, self.topic_root) for message in batch]
        with self.engine.begin() as db:
            # Every bridge that publishes on its topics is a client, whatever it sent.
            self._know_clients(db, (place.bridge_id for place in places if place is not None))
            statuses: dict[int, dict[str, Any]] = {}
            availability: dict[int, _Availability] = {}
            # A run of consecutive summaries (or device states) is written in one
            # statement: nothing else of the batch comes between them, so this is the
            # order of the messages, one round trip instead of one per message.
            run: _Run | None = None
            for message, place in zip(batch, places, strict=True):
                counted.messages += 1
                if place is None:
                    counted.skipped += 1
                    continue
                try:
                    if place.kind in _RUN_KINDS:
                        item = self._run_item(db, place, message.payload)
                        if run is not None and not run.takes(place.kind, item.key):
                            self._flush(db, run, counted)
                            run = None
                        if run is None:
                            run = _Run(place.kind)
                        run.add(item)
                        counted.by_kind[place.kind] += 1
                        continue
                    if run is not None:
                        self._flush(db, run, counted)
                        run = None
                    if place.kind == "status":
                        # Only the newest status of a bridge in a batch needs writing.
                        body = load_json(message.payload)
                        seq = message_sequence(body, place.bridge_id)
                        client = self.client_id(db, place.bridge_id)
                        if client not in statuses or statuses[client]["seq"] < seq:
                            statuses[client] = {"seq": seq, "body": body}
                        counted.applied += 1
                    elif place.kind == "availability":
                        # Also written once per bridge, at the end: nothing reads it before.
                        value = _availability_value(message.payload)
                        client = self.client_id(db, place.bridge_id)
                        seen = availability.get(client)
                        availability[client] = _Availability(
                            value, online=value == "online" or (seen is not None and seen.online)
                        )
                        counted.applied += 1
                    else:
                        changed = self._apply_one(db, place, message.payload)
                        if changed:
                            counted.applied += 1
                        else:
                            counted.duplicates += 1
                    counted.by_kind[place.kind] += 1
                except RecordError as exc:
                    counted.skipped += 1
                    LOG.warning("skipped a message on %s: %s", message.topic, exc)
            if run is not None:
                self._flush(db, run, counted)
            if availability:
                self._write_availability(db, availability)
            if statuses:
                self._write_statuses(db, statuses)
        # Counted once committed: a batch applied again message by message counts once.
        self.stats.add(counted)

    def _run_item(self, db: Connection, place: Place, payload: bytes) -> _RunItem:
        client = self.client_id(db, place.bridge_id)
        body = load_json(payload)
        seq = message_sequence(body, place.bridge_id)
        if place.kind == "summary":
            values, summary = self._session_values(client, seq, body)
            return _RunItem((client, values["bridge_session_id"]), values, summary)
        return _RunItem(
            (client, place.serial or ""), self._device_values(client, place.serial or "", seq, body)
        )

    def _flush(self, db: Connection, run: _Run, counted: IngestStats) -> None:
        if run.kind == "summary":
            changed = self._store_sessions(db, run.items)
        else:
            changed = self._store_devices(db, run.items)
        counted.applied += changed
        counted.duplicates += len(run.items) - changed

    def _apply_one(self, db: Connection, place: Place, payload: bytes) -> bool:
        client = self.client_id(db, place.bridge_id)
        if place.kind == "push":
            return self._push_seen(db, client, place.bridge_id, payload)
        body = load_json(payload)
        seq = message_sequence(body, place.bridge_id)
        if place.kind == "telemetry":
            return self._telemetry(db, client, place.serial or "", body)
        if place.kind == "events":
            return self._event(db, client, place.serial or "", seq, body)
        if place.kind == "ack":
            return self._ack(db, client, seq, body)
        if place.kind == "installed":
            return self._installed(db, client, seq, body)
        return False

    # ------------------------------------------------------------------ bridge state

    def _write_availability(
        self, db: Connection, availability: Mapping[int, _Availability]
    ) -> None:
        now = self.now()
        for online in (True, False):
            rows = [
                {"b_id": client, "b_value": seen.value}
                for client, seen in availability.items()
                if seen.online is online
            ]
            if not rows:
                continue
            values: dict[str, Any] = {"availability": bindparam("b_value"), "availability_at": now}
            if online:  # an "online" in the batch, even one followed by "offline"
                values["last_seen_at"] = now
            db.execute(
                update(t.clients).where(t.clients.c.id == bindparam("b_id")).values(**values),
                rows,
            )

    def _write_statuses(self, db: Connection, statuses: Mapping[int, Mapping[str, Any]]) -> None:
        now = self.now()
        rows = [
            {
                "b_id": client,
                "b_seq": status["seq"],
                "b_version": text(status["body"].get("version"), 32),
                "b_state": text(status["body"].get("state"), 16),
                "b_outbox": integer(status["body"].get("outbox_depth")),
                "b_at": moment(status["body"].get("updated_at")) or now,
                "b_seen": now,
            }
            for client, status in statuses.items()
        ]
        from sqlalchemy import bindparam

        db.execute(
            update(t.clients)
            .where(t.clients.c.id == bindparam("b_id"))
            .where(t.clients.c.status_seq < bindparam("b_seq"))
            .values(
                status_seq=bindparam("b_seq"),
                version=bindparam("b_version"),
                bridge_state=bindparam("b_state"),
                outbox_depth=bindparam("b_outbox"),
                status_at=bindparam("b_at"),
                last_seen_at=bindparam("b_seen"),
            ),
            rows,
        )

    def _device_values(
        self, client: int, serial: str, seq: int, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        if not serial or len(serial) > 64:
            raise RecordError("bad serial number in the topic")
        return {
            "client_id": client,
            "serial": serial,
            "name": text(body.get("name"), 128),
            "kind": text(body.get("kind"), 16),
            "model": text(body.get("model"), 64),
            "firmware": text(body.get("firmware"), 64),
            "state": text(body.get("state"), 32),
            "battery_percent": integer(body.get("battery_percent")),
            "session_id": integer(body.get("session_id")),
            "seq": seq,
            "updated_at": moment(body.get("updated_at")) or self.now(),
        }

    def _store_devices(self, db: Connection, items: Sequence[_RunItem]) -> int:
        """Upsert device states of distinct devices in one statement; how many changed."""
        changed = {
            (row[0], row[1])
            for row in db.execute(self._sql.device_upsert, [item.values for item in items])
        }
        for item in items:
            if item.key not in changed:
                continue
            client, serial = item.key
            session_id = item.values["session_id"]
            if session_id is None:
                self._open_sessions.pop((client, serial), None)
            else:
                self._open_sessions[(client, serial)] = self._session_row(
                    db, client, session_id, serial=serial, started_at=item.values["updated_at"]
                )
        return len(changed)

    def _session_row(
        self,
        db: Connection,
        client: int,
        bridge_session_id: int,
        *,
        serial: str | None,
        started_at: datetime | None,
    ) -> int:
        """The console's row of a bridge session (a ``running`` placeholder until its summary)."""
        key = {"client_id": client, "bridge_session_id": bridge_session_id}
        db.execute(
            self._sql.session_placeholder,
            {**key, "serial": serial, "status": RUNNING, "started_at": started_at, "seq": 0},
        )
        return int(db.execute(self._sql.session_id, key).scalar_one())

    # ------------------------------------------------------------------ telemetry, events

    def _telemetry(self, db: Connection, client: int, serial: str, body: Mapping[str, Any]) -> bool:
        session = self._open_sessions.get((client, serial))
        if session is None:
            return False  # telemetry outside a session is live only; nothing is kept
        rows = digest_telemetry(body)
        if not rows:
            return False
        db.execute(self._sql.series_insert, [{**row, "session_id": session} for row in rows])
        return True

    def _event(
        self, db: Connection, client: int, serial: str, seq: int, body: Mapping[str, Any]
    ) -> bool:
        kind = body.get("type")
        if kind == "decision":
            session_id = integer(body.get("session_id"))
            if session_id is None:
                raise RecordError("a decision without session_id")
            self._session_row(db, client, session_id, serial=serial, started_at=None)
            if body.get("kind") in SAFETY_STOP_DECISIONS:
                return self._alert(
                    db,
                    client,
                    "safety_stop",
                    f"session:{session_id}",
                    message=text(body.get("message")) or "the session was stopped",
                    rule=text(body.get("rule")),
                    serial=serial,
                    bridge_session_id=session_id,
                )
            return True
        if kind == "device_event":
            code = str(body.get("code", ""))
            if code in DEVICE_FAULT_CODES:
                return self._alert(
                    db,
                    client,
                    "device_fault",
                    f"message:{seq}",
                    message=f"{serial}: device reported {code.replace('_', ' ')}",
                    serial=serial,
                )
            return True
        return kind == "program_installed"

    def _alert(
        self,
        db: Connection,
        client: int,
        kind: str,
        ref: str,
        *,
        message: str,
        rule: str | None = None,
        serial: str | None = None,
        bridge_session_id: int | None = None,
        raised_at: datetime | None = None,
    ) -> bool:
        result = db.execute(
            self._sql.alert_insert,
            {
                "client_id": client,
                "kind": kind,
                "ref": ref,
                "serial": serial,
                "bridge_session_id": bridge_session_id,
                "message": message,
                "rule": rule,
                "raised_at": raised_at or self.now(),
            },
        )
        return bool(result.rowcount)

    # ------------------------------------------------------------------ sessions

    def _session_values(
        self, client: int, seq: int, body: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A session's row from its summary message, and the summary it carries."""
        session_id = integer(body.get("session_id"))
        if session_id is None:
            raise RecordError("a session without session_id")
        status = text(body.get("status"), 16) or "unknown"
        summary = body.get("summary")
        summary = dict(summary) if isinstance(summary, Mapping) else {}
        values = {
            "client_id": client,
            "bridge_session_id": session_id,
            "serial": text(body.get("serial"), 64),
            "status": status,
            "end_reason": text(body.get("end_reason")),
            "bridge_program_id": integer(body.get("program_id")),
            "routine": text(body.get("routine") or summary.get("routine"), 200),
            "started_at": moment(body.get("started_at")),
            "ended_at": moment(body.get("ended_at")),
            "completion": number(summary.get("completion")),
            "cap_events": integer(summary.get("cap_events")),
            "summary": json.dumps(summary, separators=(",", ":"))[:20000],
            "seq": seq,
        }
        return values, summary

    def _store_sessions(self, db: Connection, items: Sequence[_RunItem]) -> int:
        """Upsert sessions of distinct keys in one statement, then their alerts; how many
        changed (a session replaced by an older or repeated summary does not)."""
        changed = {
            (row[0], row[1])
            for row in db.execute(self._sql.session_upsert, [item.values for item in items])
        }
        alerts = [
            alert
            for item in items
            if item.key in changed
            for alert in self._session_alerts(item.values, item.summary)
        ]
        if alerts:
            db.execute(self._sql.alert_insert, alerts)
        return len(changed)

    def _session_alerts(
        self, values: Mapping[str, Any], summary: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """The alert rows a stored session raises (over the cap, stopped, refused)."""
        session_id = values["bridge_session_id"]
        ref = f"session:{session_id}"
        common = {
            "client_id": values["client_id"],
            "ref": ref,
            "serial": values["serial"],
            "bridge_session_id": session_id,
            "rule": None,
            "raised_at": values["ended_at"] or self.now(),
        }
        alerts = []
        caps = values["cap_events"] or 0
        if caps > 0:
            alerts.append(
                {
                    **common,
                    "kind": "over_cap",
                    "message": f"{caps} pressure excursion(s) above the zone cap in session "
                    f"{session_id} ({values['routine'] or 'routine'})",
                }
            )
        stopped_reason = summary.get("stopped_reason") or values["end_reason"]
        if values["status"] == "stopped" and stopped_reason not in ORDINARY_STOPS:
            alerts.append(
                {
                    **common,
                    "kind": "safety_stop",
                    "message": f"session {session_id} stopped: {text(stopped_reason, 300)}",
                }
            )
        if values["status"] == "refused":
            refusals = summary.get("refusals")
            why = (
                "; ".join(str(r.get("message", r)) for r in refusals if isinstance(r, Mapping))
                if isinstance(refusals, list)
                else values["end_reason"]
            )
            alerts.append(
                {
                    **common,
                    "kind": "refused_start",
                    "message": f"start of {values['routine'] or 'a routine'} refused: "
                    f"{text(why, 500)}",
                }
            )
        return alerts

    # ------------------------------------------------------------------ programs

    def _push_seen(self, db: Connection, client: int, bridge_id: str, payload: bytes) -> bool:
        """A signed envelope pushed to a bridge (by the console or by the CLI)."""
        try:
            signed = parse_envelope(payload)
        except ProgramRejectedError as exc:
            raise RecordError(f"a push that is no envelope: {exc.message}") from exc
        meta = signed.metadata
        if meta.client_id != bridge_id:
            return False  # signed for another bridge: that bridge will reject it
        values = self.describe_program(signed.program.decode("utf-8", "replace"))
        statement = self._insert(t.pushes).values(
            client_id=client,
            nonce=meta.nonce[:64],
            therapist_id=meta.therapist_id[:64],
            program_version=meta.program_version[:32],
            status="sent",
            created_at=moment(meta.issued_at) or self.now(),
            sent_at=self.now(),
            expires_at=moment(meta.expires_at),
            **values,
        )
        # The bridge's answer may have come first (another connection): it made the row,
        # and only the envelope knows the program and its schedule.
        result = db.execute(
            statement.on_conflict_do_update(
                index_elements=["nonce"],
                set_={
                    name: statement.excluded[name]
                    for name in (
                        "therapist_id",
                        "program_text",
                        "routine",
                        "category",
                        "schedule_max_sessions",
                        "schedule_per_days",
                        "expires_at",
                    )
                },
                where=t.pushes.c.program_text.is_(None),
            )
        )
        return bool(result.rowcount)

    def describe_program(self, program_text: str) -> dict[str, Any]:
        return describe_program(program_text, self.policy)

    def _ack(self, db: Connection, client: int, seq: int, body: Mapping[str, Any]) -> bool:
        status = body.get("status")
        if status not in ("accepted", "rejected"):
            raise RecordError(f"an acknowledgement with status {status!r}")
        nonce = text(body.get("nonce"), 64)
        values = {
            "status": status,
            "reason": text(body.get("reason"), 32),
            "detail": text(body.get("detail")),
            "bridge_program_id": integer(body.get("program_id")),
            "acked_at": self.now(),
            "envelope": None,
        }
        changed = False
        if nonce:
            # Only the first answer counts: a push delivered twice is answered 'replayed'.
            result = db.execute(
                update(t.pushes)
                .where(t.pushes.c.nonce == nonce, t.pushes.c.client_id == client)
                .where(t.pushes.c.status.in_(("queued", "sent")))
                .values(**values)
            )
            changed = bool(result.rowcount)
            if not changed:
                # An answer to a push this console never saw: its row is made here (a push
                # already answered, or another bridge's, keeps its row).
                result = db.execute(
                    self._insert(t.pushes)
                    .values(
                        client_id=client,
                        nonce=nonce,
                        routine=text(body.get("routine"), 200),
                        program_version=text(body.get("program_version"), 32),
                        created_at=self.now(),
                        **values,
                    )
                    .on_conflict_do_nothing(index_elements=["nonce"])
                )
                changed = bool(result.rowcount)
        if status == "rejected":
            routine = (
                db.execute(
                    select(t.pushes.c.routine).where(t.pushes.c.nonce == nonce)
                ).scalar_one_or_none()
                if nonce
                else None
            )
            changed |= self._alert(
                db,
                client,
                "program_rejected",
                f"message:{seq}",
                message=f"{f'program {routine!r}' if routine else 'a program'} rejected "
                f"({values['reason']}): {values['detail'] or 'no detail'}",
            )
        return changed

    def _installed(self, db: Connection, client: int, seq: int, body: Mapping[str, Any]) -> bool:
        result = db.execute(
            update(t.clients)
            .where(t.clients.c.id == client, t.clients.c.adherence_seq < seq)
            .values(adherence_seq=seq)
        )
        if result.rowcount == 0:
            return False
        programs = body.get("programs")
        for program in programs if isinstance(programs, list) else []:
            if isinstance(program, Mapping):
                self._program(db, client, seq, program)
        sessions = [s for s in body.get("sessions") or [] if isinstance(s, Mapping)]
        ids = {integer(s.get("session_id")) for s in sessions} - {None}
        # A session whose summary was already stored is the same here: only the missing
        # ones (a summary lost while the console was away) and running ones are written.
        finished = (
            {
                int(r[0])
                for r in db.execute(
                    select(t.sessions.c.bridge_session_id).where(
                        t.sessions.c.client_id == client,
                        t.sessions.c.bridge_session_id.in_(ids),
                        t.sessions.c.status != RUNNING,
                    )
                )
            }
            if ids
            else set()
        )
        items = []
        for session in sessions:
            if integer(session.get("session_id")) in finished:
                continue
            with contextlib.suppress(RecordError):
                values, summary = self._session_values(client, seq, session)
                items.append(_RunItem((client, values["bridge_session_id"]), values, summary))
        for run in _distinct_runs("summary", items):
            self._store_sessions(db, run.items)
        return True

    def _program(self, db: Connection, client: int, seq: int, body: Mapping[str, Any]) -> None:
        program_id = integer(body.get("program_id"))
        if program_id is None:
            return
        installed = [str(s)[:64] for s in body.get("installed_on") or [] if isinstance(s, str)]
        pending = [str(s)[:64] for s in body.get("pending_on") or [] if isinstance(s, str)]
        values = {
            "client_id": client,
            "bridge_program_id": program_id,
            "therapist_id": text(body.get("therapist_id"), 64),
            "key_id": text(body.get("key_id"), 32),
            "program_version": text(body.get("program_version"), 32),
            "routine": text(body.get("routine"), 200),
            "device_kind": text(body.get("device_kind"), 16),
            "received_at": moment(body.get("received_at")),
            "expires_at": moment(body.get("expires_at")),
            "installed_on": json.dumps(installed),
            "pending_on": json.dumps(pending),
            "seq": seq,
        }
        db.execute(self._sql.program_upsert, values)
        # A push this console did not see go out (pushed by another tool): the bridge says
        # what it is and how often it may run.
        nonce = text(body.get("nonce"), 64)
        schedule = body.get("schedule")
        if nonce and isinstance(schedule, Mapping):
            max_sessions = integer(schedule.get("max_sessions"))
            per_days = schedule.get("per_days")
            if (
                max_sessions is not None
                and isinstance(per_days, int | float)
                and not isinstance(per_days, bool)
                and math.isfinite(per_days)
            ):
                db.execute(
                    update(t.pushes)
                    .where(
                        t.pushes.c.nonce == nonce,
                        t.pushes.c.client_id == client,
                        t.pushes.c.schedule_max_sessions.is_(None),
                    )
                    .values(
                        schedule_max_sessions=max_sessions,
                        schedule_per_days=float(per_days),
                        category=text(body.get("category"), 64),
                        routine=func.coalesce(t.pushes.c.routine, values["routine"]),
                    )
                )

    # ------------------------------------------------------------------ pushes out

    def queued_pushes(self, limit: int = 100) -> list[tuple[int, str, bytes]]:
        """(push id, bridge id, envelope) of pushes not yet handed to the broker."""
        with self.engine.connect() as db:
            rows = db.execute(
                select(t.pushes.c.id, t.clients.c.bridge_id, t.pushes.c.envelope)
                .join(t.clients, t.clients.c.id == t.pushes.c.client_id)
                .where(t.pushes.c.status == "queued")
                .order_by(t.pushes.c.id)
                .limit(limit)
            ).all()
        return [(int(r[0]), str(r[1]), str(r[2] or "").encode()) for r in rows]

    def mark_sent(self, push_ids: Iterable[int]) -> None:
        ids = list(push_ids)
        if not ids:
            return
        with self.engine.begin() as db:
            db.execute(
                update(t.pushes)
                .where(t.pushes.c.id.in_(ids), t.pushes.c.status == "queued")
                .values(status="sent", sent_at=self.now())
            )


class _Statements:
    """The ingester's statements, built once: building an upsert costs more than running it."""

    def __init__(self, insert: Callable[[Any], Any]) -> None:
        self.client_insert = insert(t.clients).on_conflict_do_nothing(index_elements=["bridge_id"])
        devices = insert(t.devices)
        self.device_upsert = devices.on_conflict_do_update(
            index_elements=["client_id", "serial"],
            set_={
                **{
                    name: devices.excluded[name]
                    for name in (
                        "name",
                        "kind",
                        "model",
                        "state",
                        "battery_percent",
                        "session_id",
                        "seq",
                        "updated_at",
                    )
                },
                # A firmware the device did not report this time (not connected) is kept.
                "firmware": func.coalesce(devices.excluded.firmware, t.devices.c.firmware),
            },
            where=t.devices.c.seq < devices.excluded.seq,
        ).returning(t.devices.c.client_id, t.devices.c.serial)
        self.session_placeholder = insert(t.sessions).on_conflict_do_nothing(
            index_elements=["client_id", "bridge_session_id"]
        )
        self.session_id = select(t.sessions.c.id).where(
            t.sessions.c.client_id == bindparam("client_id"),
            t.sessions.c.bridge_session_id == bindparam("bridge_session_id"),
        )
        sessions = insert(t.sessions)
        self.session_upsert = sessions.on_conflict_do_update(
            index_elements=["client_id", "bridge_session_id"],
            set_={
                name: sessions.excluded[name]
                for name in (
                    "serial",
                    "status",
                    "end_reason",
                    "bridge_program_id",
                    "routine",
                    "started_at",
                    "ended_at",
                    "completion",
                    "cap_events",
                    "summary",
                    "seq",
                )
            },
            where=(t.sessions.c.status == RUNNING) | (t.sessions.c.seq < sessions.excluded.seq),
        ).returning(t.sessions.c.client_id, t.sessions.c.bridge_session_id)
        self.series_insert = insert(t.session_series).on_conflict_do_nothing(
            index_elements=["session_id", "first_sequence", "zone"]
        )
        self.alert_insert = insert(t.alerts).on_conflict_do_nothing(
            index_elements=["client_id", "kind", "ref"]
        )
        programs = insert(t.programs)
        self.program_upsert = programs.on_conflict_do_update(
            index_elements=["client_id", "bridge_program_id"],
            set_={
                name: programs.excluded[name]
                for name in (
                    "therapist_id",
                    "key_id",
                    "program_version",
                    "routine",
                    "device_kind",
                    "received_at",
                    "expires_at",
                    "installed_on",
                    "pending_on",
                    "seq",
                )
            },
            where=t.programs.c.seq < programs.excluded.seq,
        )


# --------------------------------------------------------------------------- the MQTT side


@dataclass(frozen=True, slots=True)
class IngestSettings:
    mqtt: MqttSettings
    console_id: str = "console"  # the persistent session's client id: devicebridge-clinic-<id>
    reconnect_s: float = 2.0


class Ingester:
    """Subscribes to every bridge, applies what arrives, and sends queued pushes."""

    def __init__(self, store: IngestStore, settings: IngestSettings) -> None:
        self.store = store
        self.settings = settings
        self.connected = asyncio.Event()
        self.connections = 0
        self._wake_pushes = asyncio.Event()
        self.last_error: str | None = None

    @property
    def client_identifier(self) -> str:
        return f"devicebridge-clinic-{self.settings.console_id}"

    def push_queued(self) -> None:
        """New pushes are waiting in the database."""
        self._wake_pushes.set()

    async def run(self) -> None:
        """Connect, ingest and push; reconnect forever until cancelled."""
        import aiomqtt

        from devicebridge.integrations.mqtt import make_client

        root = self.settings.mqtt.topic_root
        protocol = aiomqtt.ProtocolVersion.V5
        while True:
            client = make_client(
                self.settings.mqtt,
                protocol=protocol,
                identifier=self.client_identifier,
                persistent=True,
            )
            # Acknowledge each message only once its batch is committed (see the docstring).
            client._client.manual_ack_set(True)
            try:
                async with client:
                    for topic in console_topics(root):
                        await client.subscribe(topic, qos=1)
                    self.connections += 1
                    self.connected.set()
                    self.last_error = None
                    LOG.info(
                        "ingesting from %s:%d", self.settings.mqtt.host, self.settings.mqtt.port
                    )
                    pushes = asyncio.create_task(self._send_pushes(client))
                    try:
                        await self._receive(client)
                    finally:
                        pushes.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await pushes
            except aiomqtt.MqttCodeError as exc:
                if (
                    exc.rc in CONNACK_UNSUPPORTED_PROTOCOL
                    and protocol is aiomqtt.ProtocolVersion.V5
                ):
                    LOG.info("broker refuses MQTT 5; falling back to 3.1.1")
                    protocol = aiomqtt.ProtocolVersion.V311
                    continue
                self.last_error = str(exc)
                LOG.warning("MQTT broker refused the console (%s); retrying", exc)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                LOG.warning("MQTT broker unreachable (%s); retrying", exc)
            except (SQLAlchemyError, OSError) as exc:
                # The database is down or full: unacknowledged messages come again.
                self.last_error = str(exc)
                LOG.error("ingestion stopped by the database (%s); reconnecting", exc)
            finally:
                self.connected.clear()
            await asyncio.sleep(self.settings.reconnect_s)  # wall time: a real broker

    async def _receive(self, client: Any) -> None:
        messages = client.messages
        paho = client._client
        iterator = aiter(messages)
        while True:
            # A batch is what has arrived by now: while one commits, the next arrives.
            # A read is never cancelled (aiomqtt would drop the message it had taken off
            # its queue), so there is no waiting for more with a timeout.
            batch = [_incoming(await anext(iterator))]
            while len(messages) and len(batch) < BATCH_MAX:
                batch.append(_incoming(await anext(iterator)))
            await asyncio.to_thread(self.store.apply, batch)
            for message in batch:
                if message.qos > 0:
                    paho.ack(message.mid, message.qos)

    async def _send_pushes(self, client: Any) -> None:
        while True:
            # Cleared before looking: a push queued while the query runs wakes the next wait.
            self._wake_pushes.clear()
            queued = await asyncio.to_thread(self.store.queued_pushes)
            if not queued:
                # Also look now and then: another process may queue pushes in the database.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PUSH_POLL_S):
                        await self._wake_pushes.wait()
                continue
            sent = []
            for push_id, bridge_id, envelope in queued:
                await client.publish(
                    Topics(bridge_id, self.settings.mqtt.topic_root).program_push,
                    envelope,
                    qos=1,
                )
                sent.append(push_id)
            await asyncio.to_thread(self.store.mark_sent, sent)


def _incoming(message: Any) -> Incoming:
    payload = message.payload
    data = payload if isinstance(payload, bytes) else str(payload).encode()
    return Incoming(str(message.topic), data, int(message.mid), int(message.qos))
