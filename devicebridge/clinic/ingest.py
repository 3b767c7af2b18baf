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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
        if found is not None:
            return found
        db.execute(
            self._insert(t.clients)
            .values(bridge_id=bridge_id, created_at=self.now(), status_seq=0, adherence_seq=0)
            .on_conflict_do_nothing(index_elements=["bridge_id"])
        )
        client_id = int(
            db.execute(
                select(t.clients.c.id).where(t.clients.c.bridge_id == bridge_id)
            ).scalar_one()
        )
        self._client_ids[bridge_id] = client_id
        return client_id

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
        with self.engine.begin() as db:
            statuses: dict[int, dict[str, Any]] = {}
            for message in batch:
                counted.messages += 1
                place = parse_topic(message.topic, self.topic_root)
                if place is None:
                    counted.skipped += 1
                    continue
                try:
                    if place.kind == "status":
                        # Only the newest status of a bridge in a batch needs writing.
                        body = load_json(message.payload)
                        seq = message_sequence(body, place.bridge_id)
                        client = self.client_id(db, place.bridge_id)
                        if client not in statuses or statuses[client]["seq"] < seq:
                            statuses[client] = {"seq": seq, "body": body}
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
            if statuses:
                self._write_statuses(db, statuses)
        # Counted once committed: a batch applied again message by message counts once.
        self.stats.add(counted)

    def _apply_one(self, db: Connection, place: Place, payload: bytes) -> bool:
        client = self.client_id(db, place.bridge_id)
        if place.kind == "availability":
            return self._availability(db, client, payload)
        if place.kind == "push":
            return self._push_seen(db, client, place.bridge_id, payload)
        body = load_json(payload)
        seq = message_sequence(body, place.bridge_id)
        if place.kind == "device_state":
            return self._device_state(db, client, place.serial or "", seq, body)
        if place.kind == "telemetry":
            return self._telemetry(db, client, place.serial or "", body)
        if place.kind == "events":
            return self._event(db, client, place.serial or "", seq, body)
        if place.kind == "summary":
            return self._summary(db, client, seq, body)
        if place.kind == "ack":
            return self._ack(db, client, seq, body)
        if place.kind == "installed":
            return self._installed(db, client, seq, body)
        return False

    # ------------------------------------------------------------------ bridge state

    def _availability(self, db: Connection, client: int, payload: bytes) -> bool:
        value = payload.strip().decode("ascii", "replace")
        if value not in ("online", "offline"):
            raise RecordError(f"availability {value[:20]!r} is neither online nor offline")
        now = self.now()
        values: dict[str, Any] = {"availability": value, "availability_at": now}
        if value == "online":
            values["last_seen_at"] = now
        db.execute(update(t.clients).where(t.clients.c.id == client).values(**values))
        return True

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

    def _device_state(
        self, db: Connection, client: int, serial: str, seq: int, body: Mapping[str, Any]
    ) -> bool:
        if not serial or len(serial) > 64:
            raise RecordError("bad serial number in the topic")
        session_id = integer(body.get("session_id"))
        updated_at = moment(body.get("updated_at")) or self.now()
        values: dict[str, Any] = {
            "client_id": client,
            "serial": serial,
            "name": text(body.get("name"), 128),
            "kind": text(body.get("kind"), 16),
            "model": text(body.get("model"), 64),
            "firmware": text(body.get("firmware"), 64),
            "state": text(body.get("state"), 32),
            "battery_percent": integer(body.get("battery_percent")),
            "session_id": session_id,
            "seq": seq,
            "updated_at": updated_at,
        }
        result = db.execute(self._sql.device_upsert, values)
        if result.rowcount == 0:
            return False
        if session_id is None:
            self._open_sessions.pop((client, serial), None)
        else:
            self._open_sessions[(client, serial)] = self._session_row(
                db, client, session_id, serial=serial, started_at=updated_at
            )
        return True

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

    def _summary(self, db: Connection, client: int, seq: int, body: Mapping[str, Any]) -> bool:
        return self._session(db, client, seq, body)

    def _session(self, db: Connection, client: int, seq: int, body: Mapping[str, Any]) -> bool:
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
        result = db.execute(self._sql.session_upsert, values)
        if result.rowcount == 0:
            return False
        self._session_alerts(db, client, session_id, values, summary)
        return True

    def _session_alerts(
        self,
        db: Connection,
        client: int,
        session_id: int,
        values: Mapping[str, Any],
        summary: Mapping[str, Any],
    ) -> None:
        ref = f"session:{session_id}"
        when = values["ended_at"] or self.now()
        serial = values["serial"]
        caps = values["cap_events"] or 0
        if caps > 0:
            self._alert(
                db,
                client,
                "over_cap",
                ref,
                message=f"{caps} pressure excursion(s) above the zone cap in session {session_id}"
                f" ({values['routine'] or 'routine'})",
                serial=serial,
                bridge_session_id=session_id,
                raised_at=when,
            )
        stopped_reason = summary.get("stopped_reason") or values["end_reason"]
        if values["status"] == "stopped" and stopped_reason not in ORDINARY_STOPS:
            self._alert(
                db,
                client,
                "safety_stop",
                ref,
                message=f"session {session_id} stopped: {text(stopped_reason, 300)}",
                serial=serial,
                bridge_session_id=session_id,
                raised_at=when,
            )
        if values["status"] == "refused":
            refusals = summary.get("refusals")
            why = (
                "; ".join(str(r.get("message", r)) for r in refusals if isinstance(r, Mapping))
                if isinstance(refusals, list)
                else values["end_reason"]
            )
            self._alert(
                db,
                client,
                "refused_start",
                ref,
                message=f"start of {values['routine'] or 'a routine'} refused: {text(why, 500)}",
                serial=serial,
                bridge_session_id=session_id,
                raised_at=when,
            )

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
                known = db.execute(select(t.pushes.c.id).where(t.pushes.c.nonce == nonce)).first()
                if known is None:
                    db.execute(
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
                    changed = True
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
        for session in sessions:
            if integer(session.get("session_id")) not in finished:
                with contextlib.suppress(RecordError):
                    self._session(db, client, seq, session)
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
        )
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
        )
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
