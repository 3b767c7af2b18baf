"""Signed programs: every way a program can be wrong is rejected with its reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicebridge.core.signed_program import (
    MAX_ENVELOPE_BYTES,
    ProgramRejectedError,
    RejectReason,
    SignedProgram,
    key_id,
    parse_envelope,
    sign_program,
    verify,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PROGRAM = b'[routine]\nname = "x"\n'
THERAPIST = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()
TRUSTED = {key_id(THERAPIST.public_key()): THERAPIST.public_key()}


def signed(key: Ed25519PrivateKey = THERAPIST, **overrides: object) -> SignedProgram:
    arguments: dict[str, object] = {
        "therapist_id": "dr-lee",
        "client_id": "bridge-7",
        "program_version": "3",
        "issued_at": NOW - timedelta(minutes=1),
        "valid_for": timedelta(days=7),
    }
    arguments.update(overrides)
    return sign_program(key, PROGRAM, **arguments)  # type: ignore[arg-type]


def check(envelope: bytes, seen: set[str] | None = None, now: datetime = NOW) -> None:
    nonces = seen if seen is not None else set()
    program = parse_envelope(envelope)
    verify(
        program, trusted_keys=TRUSTED, bridge_id="bridge-7", now=now, nonce_seen=nonces.__contains__
    )


def reason(envelope: bytes, **kwargs: object) -> RejectReason:
    with pytest.raises(ProgramRejectedError) as info:
        check(envelope, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def test_a_trusted_signature_verifies_and_survives_the_envelope() -> None:
    program = signed()
    decoded = parse_envelope(program.to_json())
    assert decoded == program
    meta = verify(
        decoded, trusted_keys=TRUSTED, bridge_id="bridge-7", now=NOW, nonce_seen=lambda _: False
    )
    assert meta.therapist_id == "dr-lee"


def test_unsigned_is_rejected() -> None:
    raw = json.loads(signed().to_json())
    raw["signature"] = ""
    assert reason(json.dumps(raw).encode()) is RejectReason.UNSIGNED


def test_unknown_key_is_rejected() -> None:
    assert reason(signed(STRANGER).to_json()) is RejectReason.UNKNOWN_KEY


def test_altered_program_or_metadata_is_rejected() -> None:
    raw = json.loads(signed().to_json())
    raw["program"] = raw["program"].replace("x", "y")
    assert reason(json.dumps(raw).encode()) is RejectReason.BAD_SIGNATURE
    raw = json.loads(signed().to_json())
    raw["metadata"]["expires_at"] = "2099-01-01T00:00:00+00:00"
    assert reason(json.dumps(raw).encode()) is RejectReason.BAD_SIGNATURE


def test_expired_and_future_programs_are_rejected() -> None:
    assert reason(signed().to_json(), now=NOW + timedelta(days=8)) is RejectReason.EXPIRED
    future = signed(issued_at=NOW + timedelta(hours=1))
    assert reason(future.to_json()) is RejectReason.NOT_YET_VALID


def test_replay_is_rejected() -> None:
    program = signed()
    seen = {program.metadata.nonce}
    assert reason(program.to_json(), seen=seen) is RejectReason.REPLAYED


def test_program_for_another_bridge_is_rejected() -> None:
    assert reason(signed(client_id="bridge-8").to_json()) is RejectReason.WRONG_CLIENT


@pytest.mark.parametrize(
    "envelope",
    [b"not json", b"[]", b'{"format": "other"}', b'{"format": "devicebridge-signed-program/1"}'],
)
def test_malformed_envelopes_are_rejected(envelope: bytes) -> None:
    assert reason(envelope) is RejectReason.MALFORMED


def test_oversized_envelope_is_rejected_before_parsing() -> None:
    assert reason(b" " * (MAX_ENVELOPE_BYTES + 1)) is RejectReason.OVERSIZED
