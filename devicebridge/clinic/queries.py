"""What the console's pages and API read, always through who is asking.

Every query of a client's data goes through :meth:`Queries.visible` (admins see every
client; a therapist only those assigned to them): a client that is not visible is
:class:`NotFoundError`, exactly like one that does not exist, so ids cannot be probed.

Adherence (:func:`adherence`): a program's prescription is its routine's schedule
(``max_sessions`` per ``per_days``). Periods of ``per_days`` run from the day the bridge
received the program; "this period" is the one holding now. A period is met when that
many sessions of the program completed in it; the streak counts the met periods back
from the last one (the current period counts once it is met).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    delete,
    func,
    or_,
    select,
    true,
    update,
)

from devicebridge.clinic import schema as t
from devicebridge.clinic.auth import User
from devicebridge.clinic.errors import NotFoundError

PAGE_SIZE: Final = 50
ADMIN_PAGE_SIZE: Final = 200
RECENT_SESSIONS: Final = 200
ALERT_KINDS: Final = {
    "safety_stop": "safety stop",
    "over_cap": "over cap",
    "refused_start": "refused start",
    "device_fault": "device fault",
    "program_rejected": "program rejected",
}


def aware(moment: datetime | None) -> datetime | None:
    """Times from SQLite come back naive; every stored time is UTC."""
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Adherence:
    program_id: int
    routine: str
    target: int | None  # sessions per period (None: no schedule known)
    per_days: float | None
    done: int  # completed sessions in the current period (or in all, without a schedule)
    streak: int
    period_index: int
    expires_at: datetime | None

    @property
    def period_name(self) -> str:
        if self.per_days == 7:
            return "this week"
        if self.per_days == 1:
            return "today"
        return f"in this {self.per_days:g}-day period" if self.per_days else "so far"

    @property
    def streak_unit(self) -> str:
        unit = "week" if self.per_days == 7 else "period"
        return unit if self.streak == 1 else unit + "s"

    @property
    def met(self) -> bool:
        return self.target is not None and self.done >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "program_id": self.program_id,
            "routine": self.routine,
            "target": self.target,
            "per_days": self.per_days,
            "done": self.done,
            "streak": self.streak,
            "period": self.period_name,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


def adherence(
    *,
    program_id: int,
    routine: str,
    origin: datetime,
    target: int | None,
    per_days: float | None,
    completed_at: Sequence[datetime],
    now: datetime,
    expires_at: datetime | None = None,
) -> Adherence:
    if not target or not per_days or per_days <= 0:
        return Adherence(program_id, routine, None, None, len(completed_at), 0, 0, expires_at)
    period_s = per_days * 86400.0
    current = max(0, math.floor((now - origin).total_seconds() / period_s))
    per_period: dict[int, int] = defaultdict(int)
    for moment in completed_at:
        index = math.floor((moment - origin).total_seconds() / period_s)
        if 0 <= index <= current:
            per_period[index] += 1
    streak = 0
    index = current if per_period[current] >= target else current - 1
    while index >= 0 and per_period[index] >= target:
        streak += 1
        index -= 1
    return Adherence(
        program_id, routine, target, per_days, per_period[current], streak, current, expires_at
    )


@dataclass
class ClientRow:
    id: int
    bridge_id: str
    label: str | None
    availability: str | None
    last_seen_at: datetime | None
    version: str | None
    open_alerts: int
    devices: list[dict[str, Any]] = field(default_factory=list)
    last_session: dict[str, Any] | None = None
    adherence: list[Adherence] = field(default_factory=list)
    newest_alert: dict[str, Any] | None = None
    therapists: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.label or self.bridge_id

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "bridge_id": self.bridge_id,
            "label": self.label,
            "availability": self.availability or "unknown",
            "last_seen_at": _iso(self.last_seen_at),
            "version": self.version,
            "open_alerts": self.open_alerts,
            "newest_alert": self.newest_alert,
            "devices": self.devices,
            "last_session": self.last_session,
            "adherence": [a.as_dict() for a in self.adherence],
        }


def _iso(moment: datetime | None) -> str | None:
    stamped = aware(moment)
    return stamped.isoformat() if stamped is not None else None


def _device(row: Any) -> dict[str, Any]:
    return {
        "serial": row.serial,
        "name": row.name,
        "kind": row.kind,
        "model": row.model,
        "firmware": row.firmware,
        "state": row.state,
        "battery_percent": row.battery_percent,
        "session_id": row.session_id,
        "updated_at": _iso(row.updated_at),
    }


def _session(row: Any) -> dict[str, Any]:
    summary = json.loads(row.summary) if row.summary else {}
    return {
        "id": row.id,
        "bridge_session_id": row.bridge_session_id,
        "serial": row.serial,
        "status": row.status,
        "end_reason": row.end_reason,
        "program_id": row.bridge_program_id,
        "routine": row.routine,
        "started_at": _iso(row.started_at),
        "ended_at": _iso(row.ended_at),
        "completion": row.completion,
        "cap_events": row.cap_events,
        "in_band_fraction": summary.get("in_band_fraction"),
        "summary": summary,
    }


def _alert(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "kind_label": ALERT_KINDS.get(row.kind, row.kind),
        "serial": row.serial,
        "session_id": row.bridge_session_id,
        "message": row.message,
        "rule": row.rule,
        "raised_at": _iso(row.raised_at),
        "acknowledged_at": _iso(row.acknowledged_at),
    }


class Queries:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ visibility

    def _visible_ids(self, user: User) -> Select[tuple[int]]:
        if user.is_admin:
            return select(t.clients.c.id)
        return select(t.assignments.c.client_id).where(t.assignments.c.user_id == user.id)

    def visible(self, db: Connection, user: User, client_id: int) -> Any:
        """The client's row if ``user`` may see it, else :class:`NotFoundError`."""
        query = select(t.clients).where(t.clients.c.id == client_id)
        if not user.is_admin:
            query = query.join(
                t.assignments,
                and_(
                    t.assignments.c.client_id == t.clients.c.id,
                    t.assignments.c.user_id == user.id,
                ),
            )
        row = db.execute(query).first()
        if row is None:
            raise NotFoundError(f"no client {client_id}")
        return row

    def visible_client_ids(self, user: User, client_ids: Sequence[int]) -> list[int]:
        with self.engine.connect() as db:
            rows = db.execute(
                self._visible_ids(user).where(
                    (t.clients.c.id if user.is_admin else t.assignments.c.client_id).in_(
                        list(client_ids)
                    )
                )
            ).all()
        return sorted(int(r.client_id if not user.is_admin else r.id) for r in rows)

    # ------------------------------------------------------------------ client list

    def client_list(
        self, user: User, *, page: int = 1, search: str = "", now: datetime | None = None
    ) -> tuple[list[ClientRow], int]:
        """One page of the visible clients (those needing attention first) and their total."""
        now = now or datetime.now(UTC)
        open_alerts = (
            select(func.count())
            .select_from(t.alerts)
            .where(t.alerts.c.client_id == t.clients.c.id, t.alerts.c.acknowledged_at.is_(None))
            .scalar_subquery()
        )
        name = func.coalesce(t.clients.c.label, t.clients.c.bridge_id)
        query = select(
            t.clients.c.id,
            t.clients.c.bridge_id,
            t.clients.c.label,
            t.clients.c.availability,
            t.clients.c.last_seen_at,
            t.clients.c.version,
            open_alerts.label("open_alerts"),
        ).where(t.clients.c.id.in_(self._visible_ids(user)))
        query = query.where(_matching(search))
        with self.engine.connect() as db:
            total = int(db.execute(select(func.count()).select_from(query.subquery())).scalar_one())
            page = max(1, page)
            rows = db.execute(
                query.order_by(open_alerts.desc(), name, t.clients.c.id)
                .limit(PAGE_SIZE)
                .offset((page - 1) * PAGE_SIZE)
            ).all()
            clients = [
                ClientRow(
                    r.id,
                    r.bridge_id,
                    r.label,
                    r.availability,
                    aware(r.last_seen_at),
                    r.version,
                    int(r.open_alerts),
                )
                for r in rows
            ]
            self._fill(db, clients, now)
        return clients, total

    def _fill(self, db: Connection, clients: list[ClientRow], now: datetime) -> None:
        if not clients:
            return
        by_id = {c.id: c for c in clients}
        ids = list(by_id)
        for row in db.execute(
            select(t.devices).where(t.devices.c.client_id.in_(ids)).order_by(t.devices.c.serial)
        ):
            by_id[row.client_id].devices.append(_device(row))
        ranked = (
            select(
                t.sessions,
                func.row_number()
                .over(
                    partition_by=t.sessions.c.client_id,
                    order_by=(t.sessions.c.started_at.desc(), t.sessions.c.id.desc()),
                )
                .label("rank"),
            )
            .where(t.sessions.c.client_id.in_(ids), t.sessions.c.started_at.is_not(None))
            .subquery()
        )
        for row in db.execute(select(ranked).where(ranked.c.rank == 1)):
            by_id[row.client_id].last_session = _session(row)
        newest = (
            select(
                t.alerts,
                func.row_number()
                .over(partition_by=t.alerts.c.client_id, order_by=t.alerts.c.id.desc())
                .label("rank"),
            )
            .where(t.alerts.c.client_id.in_(ids), t.alerts.c.acknowledged_at.is_(None))
            .subquery()
        )
        for row in db.execute(select(newest).where(newest.c.rank == 1)):
            by_id[row.client_id].newest_alert = _alert(row)
        for client_id, items in self._adherence(db, ids, now).items():
            by_id[client_id].adherence = items

    def _adherence(
        self, db: Connection, client_ids: list[int], now: datetime
    ) -> dict[int, list[Adherence]]:
        programs = db.execute(
            select(t.programs)
            .where(t.programs.c.client_id.in_(client_ids))
            .where(or_(t.programs.c.expires_at.is_(None), t.programs.c.expires_at > now))
            .order_by(t.programs.c.bridge_program_id)
        ).all()
        if not programs:
            return {}
        schedules: dict[tuple[int, int], tuple[int | None, float | None]] = {}
        for row in db.execute(
            select(
                t.pushes.c.client_id,
                t.pushes.c.bridge_program_id,
                t.pushes.c.schedule_max_sessions,
                t.pushes.c.schedule_per_days,
            ).where(
                t.pushes.c.client_id.in_(client_ids),
                t.pushes.c.bridge_program_id.is_not(None),
                t.pushes.c.status == "accepted",
            )
        ):
            schedules[(row.client_id, row.bridge_program_id)] = (
                row.schedule_max_sessions,
                row.schedule_per_days,
            )
        earliest = min((aware(p.received_at) or now for p in programs), default=now) - timedelta(
            days=1
        )
        completed: dict[tuple[int, int], list[datetime]] = defaultdict(list)
        for finished in db.execute(
            select(
                t.sessions.c.client_id, t.sessions.c.bridge_program_id, t.sessions.c.started_at
            ).where(
                t.sessions.c.client_id.in_(client_ids),
                t.sessions.c.bridge_program_id.is_not(None),
                t.sessions.c.status == "completed",
                t.sessions.c.started_at >= earliest,
            )
        ):
            started = aware(finished.started_at)
            if started is not None:
                completed[(finished.client_id, finished.bridge_program_id)].append(started)
        out: dict[int, list[Adherence]] = defaultdict(list)
        for p in programs:
            target, per_days = schedules.get((p.client_id, p.bridge_program_id), (None, None))
            out[p.client_id].append(
                adherence(
                    program_id=p.bridge_program_id,
                    routine=p.routine or f"program {p.bridge_program_id}",
                    origin=aware(p.received_at) or now,
                    target=target,
                    per_days=per_days,
                    completed_at=completed[(p.client_id, p.bridge_program_id)],
                    now=now,
                    expires_at=aware(p.expires_at),
                )
            )
        return out

    # ------------------------------------------------------------------ one client

    def client(self, user: User, client_id: int, *, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        with self.engine.connect() as db:
            row = self.visible(db, user, client_id)
            client = ClientRow(
                row.id,
                row.bridge_id,
                row.label,
                row.availability,
                aware(row.last_seen_at),
                row.version,
                0,
            )
            self._fill(db, [client], now)
            alerts = [
                _alert(a)
                for a in db.execute(
                    select(t.alerts)
                    .where(t.alerts.c.client_id == client_id)
                    .order_by(t.alerts.c.acknowledged_at.is_not(None), t.alerts.c.id.desc())
                    .limit(100)
                )
            ]
            client.open_alerts = sum(1 for a in alerts if a["acknowledged_at"] is None)
            programs = [
                {
                    "program_id": p.bridge_program_id,
                    "routine": p.routine,
                    "program_version": p.program_version,
                    "therapist_id": p.therapist_id,
                    "device_kind": p.device_kind,
                    "received_at": _iso(p.received_at),
                    "expires_at": _iso(p.expires_at),
                    "installed_on": json.loads(p.installed_on),
                    "pending_on": json.loads(p.pending_on),
                }
                for p in db.execute(
                    select(t.programs)
                    .where(t.programs.c.client_id == client_id)
                    .order_by(t.programs.c.bridge_program_id.desc())
                )
            ]
            pushes = [
                _push(p)
                for p in db.execute(
                    select(t.pushes)
                    .where(t.pushes.c.client_id == client_id)
                    .order_by(t.pushes.c.id.desc())
                    .limit(50)
                )
            ]
            sessions = [
                _session(s)
                for s in db.execute(
                    select(t.sessions)
                    .where(t.sessions.c.client_id == client_id)
                    .order_by(t.sessions.c.started_at.desc(), t.sessions.c.id.desc())
                    .limit(RECENT_SESSIONS)
                )
            ]
            therapists = [
                str(r[0])
                for r in db.execute(
                    select(t.users.c.username)
                    .join(t.assignments, t.assignments.c.user_id == t.users.c.id)
                    .where(t.assignments.c.client_id == client_id)
                    .order_by(t.users.c.username)
                )
            ]
        return {
            **client.as_dict(),
            "name": client.name,
            "alerts": alerts,
            "programs": programs,
            "pushes": pushes,
            "sessions": sessions,
            "therapists": therapists,
        }

    def sessions_between(
        self, user: User, client_id: int, start: datetime | None, end: datetime | None
    ) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            self.visible(db, user, client_id)
            query = select(t.sessions).where(t.sessions.c.client_id == client_id)
            if start is not None:
                query = query.where(t.sessions.c.started_at >= start)
            if end is not None:
                query = query.where(t.sessions.c.started_at < end)
            return [
                _session(s)
                for s in db.execute(query.order_by(t.sessions.c.started_at, t.sessions.c.id))
            ]

    def session(self, user: User, client_id: int, session_id: int) -> dict[str, Any]:
        """One session with its series and the program text it ran (if known)."""
        with self.engine.connect() as db:
            client = self.visible(db, user, client_id)
            row = db.execute(
                select(t.sessions).where(
                    t.sessions.c.id == session_id, t.sessions.c.client_id == client_id
                )
            ).first()
            if row is None:
                raise NotFoundError(f"no session {session_id}")
            series = [
                dict(r._mapping)
                for r in db.execute(
                    select(t.session_series)
                    .where(t.session_series.c.session_id == session_id)
                    .order_by(t.session_series.c.first_sequence, t.session_series.c.zone)
                )
            ]
            device = db.execute(
                select(t.devices).where(
                    t.devices.c.client_id == client_id, t.devices.c.serial == row.serial
                )
            ).first()
            program_text = None
            if row.bridge_program_id is not None:
                program_text = db.execute(
                    select(t.pushes.c.program_text)
                    .where(
                        t.pushes.c.client_id == client_id,
                        t.pushes.c.bridge_program_id == row.bridge_program_id,
                        t.pushes.c.status == "accepted",
                    )
                    .limit(1)
                ).scalar_one_or_none()
            alerts = [
                _alert(a)
                for a in db.execute(
                    select(t.alerts).where(
                        t.alerts.c.client_id == client_id,
                        t.alerts.c.bridge_session_id == row.bridge_session_id,
                    )
                )
            ]
        for item in series:
            item.pop("session_id", None)
        return {
            **_session(row),
            "client_id": client_id,
            "bridge_id": client.bridge_id,
            "client_name": client.label or client.bridge_id,
            "device": _device(device) if device else None,
            "series": series,
            "program_text": program_text,
            "alerts": alerts,
        }

    def pushes(self, user: User, batch: str) -> list[dict[str, Any]]:
        with self.engine.connect() as db:
            rows = db.execute(
                select(t.pushes, t.clients.c.bridge_id, t.clients.c.label)
                .join(t.clients, t.clients.c.id == t.pushes.c.client_id)
                .where(t.pushes.c.batch == batch, t.pushes.c.client_id.in_(self._visible_ids(user)))
                .order_by(t.pushes.c.id)
            ).all()
            installed: dict[tuple[int, int], Any] = {}
            for row in rows:
                if row.bridge_program_id is not None:
                    program = db.execute(
                        select(t.programs.c.installed_on, t.programs.c.pending_on).where(
                            t.programs.c.client_id == row.client_id,
                            t.programs.c.bridge_program_id == row.bridge_program_id,
                        )
                    ).first()
                    if program is not None:
                        installed[(row.client_id, row.bridge_program_id)] = program
        out = []
        for row in rows:
            item = _push(row)
            item["client_id"] = row.client_id
            item["client_name"] = row.label or row.bridge_id
            program = installed.get((row.client_id, row.bridge_program_id))
            item["installed_on"] = json.loads(program.installed_on) if program else []
            item["pending_on"] = json.loads(program.pending_on) if program else []
            out.append(item)
        if not out:
            raise NotFoundError(f"no pushes {batch}")
        return out

    # ------------------------------------------------------------------ changes

    def acknowledge_alert(self, user: User, client_id: int, alert_id: int) -> None:
        with self.engine.begin() as db:
            self.visible(db, user, client_id)
            result = db.execute(
                update(t.alerts)
                .where(
                    t.alerts.c.id == alert_id,
                    t.alerts.c.client_id == client_id,
                    t.alerts.c.acknowledged_at.is_(None),
                )
                .values(acknowledged_by=user.id, acknowledged_at=datetime.now(UTC))
            )
            if not result.rowcount:
                raise NotFoundError(f"no open alert {alert_id}")

    def assign(self, client_id: int, user_id: int, *, assigned: bool) -> None:
        """An admin's change: ``user_id`` follows (or no longer follows) the client."""
        with self.engine.begin() as db:
            if (
                db.execute(select(t.clients.c.id).where(t.clients.c.id == client_id)).first()
                is None
            ):
                raise NotFoundError(f"no client {client_id}")
            if db.execute(select(t.users.c.id).where(t.users.c.id == user_id)).first() is None:
                raise NotFoundError(f"no user {user_id}")
            db.execute(
                delete(t.assignments).where(
                    t.assignments.c.client_id == client_id, t.assignments.c.user_id == user_id
                )
            )
            if assigned:
                db.execute(t.assignments.insert().values(client_id=client_id, user_id=user_id))

    def assign_by_name(self, bridge_id: str, username: str, *, assigned: bool = True) -> None:
        with self.engine.begin() as db:
            client = db.execute(
                select(t.clients.c.id).where(t.clients.c.bridge_id == bridge_id)
            ).scalar_one_or_none()
            if client is None:
                # A client may be assigned before its bridge first publishes.
                client = db.execute(
                    t.clients.insert()
                    .values(
                        bridge_id=bridge_id,
                        created_at=datetime.now(UTC),
                        status_seq=0,
                        adherence_seq=0,
                    )
                    .returning(t.clients.c.id)
                ).scalar_one()
            user = db.execute(
                select(t.users.c.id).where(t.users.c.username == username)
            ).scalar_one_or_none()
        if user is None:
            raise NotFoundError(f"no user {username!r}")
        self.assign(int(client), int(user), assigned=assigned)

    def set_label(self, client_id: int, label: str | None) -> None:
        with self.engine.begin() as db:
            db.execute(
                update(t.clients)
                .where(t.clients.c.id == client_id)
                .values(label=(label or None) and label[:128])
            )

    def assignment_table(
        self, *, search: str = "", limit: int = ADMIN_PAGE_SIZE
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """(clients matching ``search`` with the user ids following each, users, how many
        clients match) for the admin page."""
        with self.engine.connect() as db:
            users = [
                {
                    "id": u.id,
                    "username": u.username,
                    "therapist_id": u.therapist_id,
                    "is_admin": u.is_admin,
                }
                for u in db.execute(
                    select(t.users)
                    .where(t.users.c.disabled.is_(False))
                    .order_by(t.users.c.username)
                )
            ]
            query = select(t.clients).where(_matching(search))
            total = int(db.execute(select(func.count()).select_from(query.subquery())).scalar_one())
            rows = db.execute(
                query.order_by(func.coalesce(t.clients.c.label, t.clients.c.bridge_id)).limit(limit)
            ).all()
            following: dict[int, list[int]] = defaultdict(list)
            for a in db.execute(
                select(t.assignments).where(t.assignments.c.client_id.in_([r.id for r in rows]))
            ):
                following[a.client_id].append(a.user_id)
        clients = [
            {
                "id": c.id,
                "bridge_id": c.bridge_id,
                "label": c.label,
                "user_ids": following.get(c.id, []),
            }
            for c in rows
        ]
        return clients, users, total

    def pushable_clients(self, user: User) -> list[dict[str, Any]]:
        """Every client ``user`` may push to (id, name, availability), by name."""
        name = func.coalesce(t.clients.c.label, t.clients.c.bridge_id)
        with self.engine.connect() as db:
            return [
                {"id": r.id, "name": r.name, "availability": r.availability}
                for r in db.execute(
                    select(t.clients.c.id, name.label("name"), t.clients.c.availability)
                    .where(t.clients.c.id.in_(self._visible_ids(user)))
                    .order_by(name, t.clients.c.id)
                )
            ]

    def client_bridge_ids(self, client_ids: Sequence[int]) -> dict[int, str]:
        with self.engine.connect() as db:
            return {
                int(r.id): str(r.bridge_id)
                for r in db.execute(
                    select(t.clients.c.id, t.clients.c.bridge_id).where(
                        t.clients.c.id.in_(list(client_ids))
                    )
                )
            }

    def database_bytes(self) -> int | None:
        """The database's size on disk (PostgreSQL: pg_database_size; SQLite: pages)."""
        with self.engine.connect() as db:
            if self.engine.dialect.name == "postgresql":
                return int(
                    db.execute(select(func.pg_database_size(func.current_database()))).scalar_one()
                )
            from sqlalchemy import text

            pages = db.execute(text("PRAGMA page_count")).scalar_one()
            size = db.execute(text("PRAGMA page_size")).scalar_one()
            return int(pages) * int(size)


def _matching(search: str) -> Any:
    """Clients whose bridge id or label contains ``search`` (everything when it is empty)."""
    if not search:
        return true()
    pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return or_(
        t.clients.c.bridge_id.like(pattern, escape="\\"),
        t.clients.c.label.like(pattern, escape="\\"),
    )


def _push(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "nonce": row.nonce,
        "batch": row.batch,
        "therapist_id": row.therapist_id,
        "routine": row.routine,
        "program_version": row.program_version,
        "schedule": (
            f"{row.schedule_max_sessions} per {row.schedule_per_days:g} days"
            if row.schedule_max_sessions and row.schedule_per_days
            else None
        ),
        "status": row.status,
        "reason": row.reason,
        "detail": row.detail,
        "program_id": row.bridge_program_id,
        "created_at": _iso(row.created_at),
        "sent_at": _iso(row.sent_at),
        "acked_at": _iso(row.acked_at),
        "expires_at": _iso(row.expires_at),
    }
