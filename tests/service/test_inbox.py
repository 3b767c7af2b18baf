"""The program inbox through ``BridgeService.handle_push``, on a real SQLite store and no
broker: whatever arrives is answered or dropped, never raised; times are instants; a key
signs only for its own therapist; programs cannot be valid for ever."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from devicebridge.core.signed_program import (
    FORMAT,
    MAX_ENVELOPE_BYTES,
    ProgramMetadata,
    SignedProgram,
    signed_bytes,
)
from devicebridge.service.supervisor import BridgeService
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from tests.service.conftest import BRIDGE, Therapist, routine_text, service_rig


def sign_with_offset(
    therapist: Therapist,
    program: bytes,
    *,
    issued_at: datetime,
    expires_at: datetime,
    utc_offset: timedelta,
) -> bytes:
    """An envelope whose times are written in another UTC offset (as other signers may)."""
    zone = timezone(utc_offset)
    metadata = ProgramMetadata(
        therapist_id=therapist.therapist_id,
        client_id=BRIDGE,
        program_version="3",
        issued_at=issued_at.astimezone(zone).isoformat(),
        expires_at=expires_at.astimezone(zone).isoformat(),
        nonce=secrets.token_hex(16),
    )
    signature = therapist.key.sign(signed_bytes(metadata, program))
    return SignedProgram(metadata, program, therapist.key_id, signature).to_json()


async def with_service(tmp_path: Path, check: Callable[[BridgeService], None]) -> None:
    async with service_rig(tmp_path, with_devices=False) as rig:
        check(rig.service)


def stored(tmp_path: Path) -> list[tuple[str, str]]:
    store = ProgramStore(tmp_path / PROGRAMS_FILENAME)
    try:
        return [(p.therapist_id, p.routine_name) for p in store.programs()]
    finally:
        store.close()


async def test_a_replay_is_refused_whatever_utc_offset_the_signer_wrote(tmp_path: Path) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    now = datetime.now(UTC).replace(microsecond=0)
    # Valid for eight more hours, written at UTC-12: as text it sorts before "now" in UTC.
    late_west = sign_with_offset(
        therapist,
        routine_text("firming"),
        issued_at=now - timedelta(hours=1),
        expires_at=now + timedelta(hours=8),
        utc_offset=timedelta(hours=-12),
    )

    def check(service: BridgeService) -> None:
        assert service.handle_push(late_west)["status"] == "accepted"
        # Another program: storing it prunes the nonces of programs that have expired.
        assert service.handle_push(therapist.sign(routine_text("firming")))["status"] == "accepted"
        again = service.handle_push(late_west)
        assert (again["status"], again["reason"]) == ("rejected", "replayed"), again
        # The program's expiry is kept as the instant it is, in UTC.
        first = service.programs.programs()[0]
        assert first.expires_at == now + timedelta(hours=8)
        assert first.expires_at.utcoffset() == timedelta(0)

    await with_service(tmp_path, check)


async def test_a_key_signs_only_for_the_therapist_it_is_trusted_for(tmp_path: Path) -> None:
    lee = Therapist("dr-lee")
    lee.trust_on(tmp_path)
    posing_as_kim = dataclasses.replace(lee, therapist_id="dr-kim")  # the same key

    def check(service: BridgeService) -> None:
        ack = service.handle_push(posing_as_kim.sign(routine_text("firming")))
        assert (ack["status"], ack["reason"]) == ("rejected", "wrong_therapist"), ack
        assert "dr-lee" in ack["detail"]
        assert "dr-kim" in ack["detail"]
        assert service.handle_push(lee.sign(routine_text("firming")))["status"] == "accepted"

    await with_service(tmp_path, check)
    assert [therapist for therapist, _ in stored(tmp_path)] == ["dr-lee"]


async def test_a_program_valid_for_a_century_is_refused(tmp_path: Path) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)

    def check(service: BridgeService) -> None:
        ack = service.handle_push(
            therapist.sign(routine_text("firming"), valid_for=timedelta(days=36500))
        )
        assert (ack["status"], ack["reason"]) == ("rejected", "validity_too_long"), ack
        assert "30 days" in ack["detail"]
        month = therapist.sign(routine_text("firming"), valid_for=timedelta(days=30))
        assert service.handle_push(month)["status"] == "accepted"

    await with_service(tmp_path, check)
    assert len(stored(tmp_path)) == 1


def _envelope(therapist: Therapist) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(therapist.sign(routine_text("firming")))
    return envelope


def hostile_payloads(therapist: Therapist) -> list[bytes]:
    """Payloads that once escaped the inbox as exceptions, and their relatives."""
    good = _envelope(therapist)

    def variant(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    def metadata(**changes: Any) -> bytes:
        return variant(metadata={**good["metadata"], **changes})

    deep = 64_000
    return [
        b"[" * deep,  # nested lists: RecursionError in the JSON parser
        b"[" * (deep // 2) + b"]" * (deep // 2),
        b'{"a":' * (deep // 5),
        variant(metadata=json.loads("[" * 500 + "]" * 500)),
        json.dumps({"format": FORMAT, "metadata": {"nonce": "ab" * 16}}).encode()[:-1]
        + b',"x":'
        + b"[" * 30_000
        + b"}",
        b"1" * 50_000,  # an integer beyond Python's digit limit: ValueError, not JSON
        variant(program="\ud800 lone surrogate"),  # cannot be encoded to UTF-8
        metadata(therapist_id="\udfff"),
        variant(signature=["not", "base64"]),
        variant(signature={"a": 1}, key_id=["x"]),
        variant(key_id={"k": [1, 2]}),
        metadata(nonce=7),
        metadata(nonce="x" * 60_000),
        metadata(expires_at="tomorrow"),
        metadata(expires_at="2026-11-30T12:00:00"),  # no time zone
        metadata(issued_at="9999-12-31T23:59:59+00:00"),
        metadata(issued_at="0001-01-01T00:00:00+14:00"),
        variant(program=None),
        variant(format=None),
        b"\x00\xff\xfe" * 100,
        b"",
        b"null",
        b'"a string"',
        json.dumps(good)[:-10].encode(),  # truncated
        b"x" * (MAX_ENVELOPE_BYTES + 1),
        variant(signature=base64.b64encode(b"\x00" * 64).decode()),
    ]


async def test_no_payload_escapes_the_inbox(tmp_path: Path) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    payloads = hostile_payloads(therapist)

    def check(service: BridgeService) -> None:
        for payload in payloads:
            ack = service.handle_push(payload)
            assert ack is None or ack["status"] == "rejected", ack
        assert service.handle_push(therapist.sign(routine_text("firming")))["status"] == "accepted"

    await with_service(tmp_path, check)
    assert len(stored(tmp_path)) == 1


@pytest.mark.parametrize("payload", [b"[" * 64_000, b"\xff\x00", b"{not json", b"[]"])
async def test_a_payload_without_a_readable_nonce_is_dropped_unanswered(
    tmp_path: Path, payload: bytes
) -> None:
    def check(service: BridgeService) -> None:
        assert service.handle_push(payload) is None
        assert service.acks == []

    await with_service(tmp_path, check)


async def test_a_signed_program_nested_too_deeply_is_answered_malformed(tmp_path: Path) -> None:
    therapist = Therapist()
    therapist.trust_on(tmp_path)
    program = b"a = " + b"[" * 10_000 + b"]" * 10_000

    def check(service: BridgeService) -> None:
        ack = service.handle_push(therapist.sign(program))
        assert (ack["status"], ack["reason"]) == ("rejected", "malformed"), ack

    await with_service(tmp_path, check)
    assert stored(tmp_path) == []
