"""Programs written in the browser: validated, signed in this process, queued for pushing.

Validation is the bridge's own: :func:`devicebridge.core.routine.parse_routine` against
the console's policy (the shipped one unless ``--policy`` names another), so the
browser shows the same problems, lines, rules and sources a bridge would answer with.
Signing uses the therapist's private key from the console's key directory
(:func:`devicebridge.storage.keys.load_private_key`, the key ``devicebridge therapist
keygen`` writes); the key never leaves this process. A push is a database row
(``queued``) until the ingester's MQTT connection hands it to the broker.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Engine, insert

from devicebridge.clinic import schema as t
from devicebridge.clinic.auth import User
from devicebridge.clinic.errors import AuthoringError
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import Routine, RoutineError, parse_routine
from devicebridge.core.signed_program import MAX_PROGRAM_BYTES, sign_program

MAX_VALID_DAYS: Final = 90.0
DEFAULT_VALID_DAYS: Final = 7.0


@dataclass(frozen=True, slots=True)
class Validation:
    routine: Routine | None
    problems: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return self.routine is not None


def validate(text: str, policy: SafetyPolicy) -> Validation:
    """Every problem of a program text, with its line, key path, rule and source."""
    if len(text.encode("utf-8")) > MAX_PROGRAM_BYTES:
        return Validation(
            None,
            [
                {
                    "line": None,
                    "path": "(file)",
                    "message": f"more than {MAX_PROGRAM_BYTES} bytes: a bridge refuses it",
                    "rule": None,
                }
            ],
        )
    try:
        routine = parse_routine(text, policy, label="program")
    except RoutineError as exc:
        return Validation(
            None,
            [
                {"line": p.line, "path": p.path, "message": p.message, "rule": p.rule}
                for p in exc.problems
            ],
        )
    return Validation(routine, [])


def describe_program(text: str, policy: SafetyPolicy) -> dict[str, Any]:
    """Routine name, category and schedule of a program text (None where unreadable)."""
    try:
        routine = parse_routine(text, policy, label="program")
    except RoutineError:
        return {"program_text": text[:MAX_PROGRAM_BYTES], "routine": None}
    schedule = routine.schedule
    return {
        "program_text": text,
        "routine": routine.name[:200],
        "category": routine.category[:64],
        "schedule_max_sessions": schedule.max_sessions if schedule else None,
        "schedule_per_days": schedule.per_days if schedule else None,
    }


def queue_pushes(
    engine: Engine,
    *,
    user: User,
    clients: Sequence[tuple[int, str]],
    program_text: str,
    policy: SafetyPolicy,
    valid_days: float = DEFAULT_VALID_DAYS,
    program_version: str | None = None,
    now: datetime | None = None,
) -> str:
    """Sign ``program_text`` for each (client id, bridge id) and queue it; return the batch.

    The caller has checked that ``user`` may push to every one of ``clients``.
    """
    from devicebridge.storage.keys import load_private_key

    if not clients:
        raise AuthoringError("choose at least one client")
    if not 0 < valid_days <= MAX_VALID_DAYS:
        raise AuthoringError(
            f"a program is valid for more than 0 and at most {MAX_VALID_DAYS:g} days"
        )
    checked = validate(program_text, policy)
    if checked.routine is None:
        raise AuthoringError(
            "the program is not valid: " + "; ".join(p["message"] for p in checked.problems[:3])
        )
    if not user.therapist_id:
        raise AuthoringError(
            f"{user.username} has no signing key: an admin sets a therapist id "
            "(devicebridge clinic user add --therapist-id ID) whose key is in the key directory"
        )
    therapist_id, key = load_private_key(user.therapist_id)
    issued = now or datetime.now(UTC)
    version = (program_version or checked.routine.version or "1")[:32]
    batch = secrets.token_hex(8)
    description = describe_program(program_text, policy)
    rows = []
    for client_id, bridge_id in clients:
        signed = sign_program(
            key,
            program_text.encode("utf-8"),
            therapist_id=therapist_id,
            client_id=bridge_id,
            program_version=version,
            issued_at=issued,
            valid_for=timedelta(days=valid_days),
        )
        rows.append(
            {
                "client_id": client_id,
                "nonce": signed.metadata.nonce,
                "batch": batch,
                "pushed_by": user.id,
                "therapist_id": therapist_id,
                "program_version": version,
                "envelope": signed.to_json().decode(),
                "status": "queued",
                "created_at": issued,
                "expires_at": datetime.fromisoformat(signed.metadata.expires_at),
                **description,
            }
        )
    with engine.begin() as db:
        db.execute(insert(t.pushes), rows)
    return batch
