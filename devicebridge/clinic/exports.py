"""FHIR exports of the console: one session, or a client's sessions over a date range."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devicebridge.clinic import schema as t
from devicebridge.clinic.auth import User
from devicebridge.clinic.errors import NotFoundError
from devicebridge.clinic.fhir import (
    DeviceFacts,
    ProgramFacts,
    bundle,
    session_facts_from_summary,
)
from devicebridge.clinic.queries import Queries, aware

if TYPE_CHECKING:
    from devicebridge.clinic.app import Console, Handler


def client_bundle(
    engine: Engine,
    user: User,
    client_id: int,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    session_id: int | None = None,
    generated_at: datetime | None = None,
) -> dict[str, Any]:
    """The Bundle of a client's finished sessions (one, or those started in [start, end))."""
    queries = Queries(engine)
    with engine.connect() as db:
        client = queries.visible(db, user, client_id)
        query = select(t.sessions).where(
            t.sessions.c.client_id == client_id, t.sessions.c.status != "running"
        )
        if session_id is not None:
            query = query.where(t.sessions.c.id == session_id)
        if start is not None:
            query = query.where(t.sessions.c.started_at >= start)
        if end is not None:
            query = query.where(t.sessions.c.started_at < end)
        sessions = db.execute(query.order_by(t.sessions.c.started_at, t.sessions.c.id)).all()
        if session_id is not None and not sessions:
            raise NotFoundError(f"no finished session {session_id}")
        serials = {s.serial for s in sessions if s.serial}
        devices = [
            DeviceFacts(d.serial, d.kind, d.model, d.firmware, d.name)
            for d in db.execute(
                select(t.devices)
                .where(t.devices.c.client_id == client_id, t.devices.c.serial.in_(serials))
                .order_by(t.devices.c.serial)
            )
        ]
        program_ids = {s.bridge_program_id for s in sessions if s.bridge_program_id is not None}
        programs = []
        for program_id in sorted(program_ids):
            installed = db.execute(
                select(t.programs).where(
                    t.programs.c.client_id == client_id,
                    t.programs.c.bridge_program_id == program_id,
                )
            ).first()
            push = db.execute(
                select(t.pushes).where(
                    t.pushes.c.client_id == client_id,
                    t.pushes.c.bridge_program_id == program_id,
                    t.pushes.c.status == "accepted",
                )
            ).first()
            programs.append(
                ProgramFacts(
                    key=str(program_id),
                    routine=(installed.routine if installed else None)
                    or (push.routine if push else None),
                    therapist_id=(installed.therapist_id if installed else None)
                    or (push.therapist_id if push else None),
                    program_version=(installed.program_version if installed else None)
                    or (push.program_version if push else None),
                    max_sessions=push.schedule_max_sessions if push else None,
                    per_days=push.schedule_per_days if push else None,
                )
            )
        facts = []
        for s in sessions:
            rows = [
                dict(r._mapping)
                for r in db.execute(
                    select(t.session_series).where(t.session_series.c.session_id == s.id)
                )
            ]
            facts.append(
                session_facts_from_summary(
                    key=str(s.bridge_session_id),
                    status=s.status,
                    routine=s.routine,
                    started_at=aware(s.started_at),
                    ended_at=aware(s.ended_at),
                    device_serial=s.serial,
                    program_key=str(s.bridge_program_id) if s.bridge_program_id else None,
                    summary=json.loads(s.summary) if s.summary else {},
                    rows=rows,
                )
            )
    return bundle(
        client_pseudonym=client.label or client.bridge_id,
        devices=devices,
        programs=programs,
        sessions=facts,
        generated_at=generated_at or datetime.now(UTC),
    )


def export_routes(console: Console, page: Callable[..., Handler]) -> list[Route]:
    from devicebridge.clinic.app import _int, _login, _range

    engine = console.config.engine

    def respond(data: dict[str, Any], filename: str) -> Response:
        return Response(
            json.dumps(data, indent=1),
            media_type="application/fhir+json",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    async def client_export(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        start, end = _range(request)
        user = _login(request).user
        data = await run_in_threadpool(
            lambda: client_bundle(engine, user, client_id, start=start, end=end)
        )
        return respond(data, f"client-{client_id}-sessions.fhir.json")

    async def session_export(request: Request) -> Response:
        client_id = _int(request.path_params["client_id"], "client")
        session_id = _int(request.path_params["session_id"], "session")
        user = _login(request).user
        data = await run_in_threadpool(
            lambda: client_bundle(engine, user, client_id, session_id=session_id)
        )
        return respond(data, f"session-{session_id}.fhir.json")

    return [
        Route("/clients/{client_id}/fhir", page(console, client_export)),
        Route("/clients/{client_id}/sessions/{session_id}/fhir", page(console, session_export)),
    ]
