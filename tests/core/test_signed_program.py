"""Signed programs: every way a program can be wrong is rejected with its reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicebridge.core.signed_program import (
    DEFAULT_MAX_VALIDITY,
    MAX_ENVELOPE_BYTES,
    ProgramMetadata,
    ProgramRejectedError,
    RejectReason,
    SignedProgram,
    TrustedSigner,
    key_id,
    parse_envelope,
    sign_program,
    signed_bytes,
    verify,
)
from devicebridge.errors import DeviceBridgeError

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
PROGRAM = b'[routine]\nname = "x"\n'
THERAPIST = Ed25519PrivateKey.generate()
STRANGER = Ed25519PrivateKey.generate()
TRUSTED = {key_id(THERAPIST.public_key()): TrustedSigner("dr-lee", THERAPIST.public_key())}


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


def rejection(envelope: bytes, **kwargs: object) -> ProgramRejectedError:
    with pytest.raises(ProgramRejectedError) as info:
        check(envelope, **kwargs)  # type: ignore[arg-type]
    return info.value


def reason(envelope: bytes, **kwargs: object) -> RejectReason:
    return rejection(envelope, **kwargs).reason


def test_a_trusted_signature_verifies_and_survives_the_envelope() -> None:
    program = signed()
    decoded = parse_envelope(program.to_json())
    assert decoded == program
    verified = verify(
        decoded, trusted_keys=TRUSTED, bridge_id="bridge-7", now=NOW, nonce_seen=lambda _: False
    )
    assert verified.metadata.therapist_id == "dr-lee"
    assert verified.expires_at == NOW - timedelta(minutes=1) + timedelta(days=7)


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


def test_a_rejection_is_a_devicebridge_error_and_carries_the_nonce_it_could_read() -> None:
    program = signed(STRANGER)
    error = rejection(program.to_json())
    assert isinstance(error, DeviceBridgeError)
    assert isinstance(error, ValueError)
    assert error.nonce == program.metadata.nonce
    assert rejection(b"{not json").nonce is None
    raw = json.loads(program.to_json())
    raw["metadata"]["nonce"] = "short"
    assert rejection(json.dumps(raw).encode()).nonce is None


def test_a_key_signs_only_for_its_own_therapist() -> None:
    error = rejection(signed(therapist_id="dr-kim").to_json())
    assert error.reason is RejectReason.WRONG_THERAPIST
    assert "'dr-lee'" in error.message


def test_a_validity_beyond_the_maximum_is_rejected() -> None:
    assert reason(signed(valid_for=timedelta(days=36500)).to_json()) is (
        RejectReason.VALIDITY_TOO_LONG
    )
    assert reason(signed(valid_for=DEFAULT_MAX_VALIDITY + timedelta(seconds=1)).to_json()) is (
        RejectReason.VALIDITY_TOO_LONG
    )
    check(signed(valid_for=DEFAULT_MAX_VALIDITY).to_json())
    month = signed(valid_for=timedelta(days=31)).to_json()
    with pytest.raises(ProgramRejectedError):
        check(month)
    verify(
        parse_envelope(month),
        trusted_keys=TRUSTED,
        bridge_id="bridge-7",
        now=NOW,
        nonce_seen=lambda _: False,
        max_validity=timedelta(days=31),
    )


def offset_envelope(issued_at: str, expires_at: str) -> bytes:
    metadata = ProgramMetadata("dr-lee", "bridge-7", "3", issued_at, expires_at, "ab" * 16)
    signature = THERAPIST.sign(signed_bytes(metadata, PROGRAM))
    return SignedProgram(metadata, PROGRAM, key_id(THERAPIST.public_key()), signature).to_json()


def test_times_are_instants_whatever_offset_they_are_written_in() -> None:
    west, east = timezone(timedelta(hours=-12)), timezone(timedelta(hours=14))
    # Issued a minute ago, valid for an hour: written at UTC-12 and at UTC+14.
    issued, expires = NOW - timedelta(minutes=1), NOW + timedelta(hours=1)
    for zone in (west, east):
        envelope = offset_envelope(
            issued.astimezone(zone).isoformat(), expires.astimezone(zone).isoformat()
        )
        verified = verify(
            parse_envelope(envelope),
            trusted_keys=TRUSTED,
            bridge_id="bridge-7",
            now=NOW,
            nonce_seen=lambda _: False,
        )
        assert (verified.issued_at, verified.expires_at) == (issued, expires)
        assert verified.expires_at.utcoffset() == timedelta(0)
        assert reason(envelope, now=expires) is RejectReason.EXPIRED
        assert reason(envelope, now=NOW.astimezone(zone), seen={"ab" * 16}) is (
            RejectReason.REPLAYED
        )


@pytest.mark.parametrize(
    ("issued_at", "expires_at"),
    [
        ("2026-11-23T11:00:00", "2026-11-24T11:00:00"),  # no time zone
        ("yesterday", "2026-11-24T11:00:00+00:00"),
        ("0001-01-01T00:00:00+14:00", "2026-11-24T11:00:00+00:00"),  # before year 1 in UTC
        ("2026-11-23T11:00:00+00:00", "9999-12-31T23:59:59-12:00"),  # after year 9999
        ("2026-11-23T11:00:00+00:00", "2026-11-23T10:00:00+00:00"),  # expires before issue
    ],
)
def test_unreadable_or_impossible_times_are_malformed(issued_at: str, expires_at: str) -> None:
    assert reason(offset_envelope(issued_at, expires_at)) is RejectReason.MALFORMED


@pytest.mark.parametrize(
    "envelope",
    [
        b"[" * 64_000,
        b'{"a":' * 10_000,
        b"9" * 50_000,
        b"\xff\xfe\x00",
        b'"\\ud800"',
        json.dumps({"format": "devicebridge-signed-program/1", "program": "\ud800"}).encode(),
    ],
)
def test_hostile_json_is_malformed_not_an_exception(envelope: bytes) -> None:
    assert reason(envelope) is RejectReason.MALFORMED


def test_wrongly_typed_fields_are_malformed() -> None:
    good = json.loads(signed().to_json())
    for field, value in [
        ("signature", ["x"]),
        ("key_id", {"k": 1}),
        ("key_id", "k" * 20_000),
        ("program", 5),
    ]:
        assert reason(json.dumps({**good, field: value}).encode()) is RejectReason.MALFORMED
    for field, value in [("nonce", 7), ("nonce", "x" * 1000), ("expires_at", None)]:
        changed = {**good, "metadata": {**good["metadata"], field: value}}
        assert reason(json.dumps(changed).encode()) is RejectReason.MALFORMED
