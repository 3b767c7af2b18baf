"""Routine programs signed by a therapist with Ed25519, bound to one bridge.

What is signed is the exact canonical bytes of the program plus its metadata::

    b"devicebridge-signed-program/1\\n"
    + u32 length + canonical JSON of the metadata (sorted keys, no spaces, UTF-8)
    + u32 length + the program file's exact bytes

The metadata carries the therapist id, the client (bridge) id, the program version, the
issue and expiry times and a random nonce, so a signature cannot be moved to another
bridge, replayed, or kept past its expiry. Verification returns a typed rejection reason
for every failure; nothing unverified reaches the routine parser, let alone a device.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT: Final = "devicebridge-signed-program/1"
DOMAIN_TAG: Final = (FORMAT + "\n").encode()
MAX_ENVELOPE_BYTES: Final = 64 * 1024
MAX_PROGRAM_BYTES: Final = 32 * 1024
ALLOWED_CLOCK_SKEW: Final = timedelta(minutes=5)
NONCE_BYTES: Final = 16
_LENGTH: Final = struct.Struct(">I")


class RejectReason(StrEnum):
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CLIENT = "wrong_client"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REPLAYED = "replayed"
    UNSAFE = "unsafe"


class ProgramRejectedError(ValueError):
    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ProgramMetadata:
    therapist_id: str
    client_id: str
    program_version: str
    issued_at: str  # ISO 8601, UTC
    expires_at: str
    nonce: str  # hex

    def canonical_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class SignedProgram:
    metadata: ProgramMetadata
    program: bytes  # the routine file, exact bytes
    key_id: str
    signature: bytes

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "metadata": asdict(self.metadata),
                "program": self.program.decode("utf-8"),
                "key_id": self.key_id,
                "signature": base64.b64encode(self.signature).decode(),
            },
            sort_keys=True,
        ).encode()


def signed_bytes(metadata: ProgramMetadata, program: bytes) -> bytes:
    meta = metadata.canonical_json()
    return DOMAIN_TAG + _LENGTH.pack(len(meta)) + meta + _LENGTH.pack(len(program)) + program


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable id of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()[:16]


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key written as base64 of its 32 raw bytes (``therapist keygen`` output)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not an Ed25519 public key (base64 of 32 bytes): {exc}") from exc


def sign_program(
    private_key: Ed25519PrivateKey,
    program: bytes,
    *,
    therapist_id: str,
    client_id: str,
    program_version: str,
    issued_at: datetime,
    valid_for: timedelta,
    nonce: str | None = None,
) -> SignedProgram:
    if len(program) > MAX_PROGRAM_BYTES:
        raise ValueError(f"program of {len(program)} bytes exceeds {MAX_PROGRAM_BYTES}")
    metadata = ProgramMetadata(
        therapist_id=therapist_id,
        client_id=client_id,
        program_version=program_version,
        issued_at=issued_at.astimezone(UTC).isoformat(),
        expires_at=(issued_at + valid_for).astimezone(UTC).isoformat(),
        nonce=nonce or secrets.token_hex(NONCE_BYTES),
    )
    signature = private_key.sign(signed_bytes(metadata, program))
    return SignedProgram(metadata, program, key_id(private_key.public_key()), signature)


def parse_envelope(data: bytes) -> SignedProgram:
    """Decode an envelope received over MQTT; raise a typed rejection when malformed."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ProgramRejectedError(
            RejectReason.OVERSIZED, f"{len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}"
        )
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProgramRejectedError(RejectReason.MALFORMED, f"not JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ProgramRejectedError(RejectReason.MALFORMED, f"format is not {FORMAT!r}")
    program = raw.get("program")
    if not isinstance(program, str):
        raise ProgramRejectedError(RejectReason.MALFORMED, "no program text")
    program_bytes = program.encode("utf-8")
    if len(program_bytes) > MAX_PROGRAM_BYTES:
        raise ProgramRejectedError(
            RejectReason.OVERSIZED,
            f"program of {len(program_bytes)} bytes exceeds {MAX_PROGRAM_BYTES}",
        )
    signature, kid = raw.get("signature"), raw.get("key_id")
    if not signature or not kid:
        raise ProgramRejectedError(RejectReason.UNSIGNED, "the envelope carries no signature")
    metadata = _metadata(raw.get("metadata"))
    try:
        signature_bytes = base64.b64decode(str(signature), validate=True)
    except binascii.Error as exc:
        raise ProgramRejectedError(RejectReason.MALFORMED, "signature is not base64") from exc
    return SignedProgram(metadata, program_bytes, str(kid), signature_bytes)


def _metadata(raw: Any) -> ProgramMetadata:
    fields = ProgramMetadata.__dataclass_fields__
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise ProgramRejectedError(
            RejectReason.MALFORMED, f"metadata must have exactly: {', '.join(sorted(fields))}"
        )
    if not all(isinstance(v, str) and v for v in raw.values()):
        raise ProgramRejectedError(RejectReason.MALFORMED, "metadata values must be strings")
    return ProgramMetadata(**raw)


def _time(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ProgramRejectedError(RejectReason.MALFORMED, f"{name} is not ISO 8601") from exc
    if moment.tzinfo is None:
        raise ProgramRejectedError(RejectReason.MALFORMED, f"{name} has no time zone")
    return moment


def verify(
    signed: SignedProgram,
    *,
    trusted_keys: Mapping[str, Ed25519PublicKey],
    bridge_id: str,
    now: datetime,
    nonce_seen: Callable[[str], bool],
) -> ProgramMetadata:
    """Check signature, binding, validity window and replay; return the trusted metadata.

    The order matters: nothing in the metadata is believed before the signature checks.
    """
    key = trusted_keys.get(signed.key_id)
    if key is None:
        raise ProgramRejectedError(
            RejectReason.UNKNOWN_KEY,
            f"key {signed.key_id} is not trusted on this bridge (devicebridge trust add)",
        )
    try:
        key.verify(signed.signature, signed_bytes(signed.metadata, signed.program))
    except InvalidSignature as exc:
        raise ProgramRejectedError(
            RejectReason.BAD_SIGNATURE, "the signature does not match the program and metadata"
        ) from exc
    meta = signed.metadata
    if meta.client_id != bridge_id:
        raise ProgramRejectedError(
            RejectReason.WRONG_CLIENT,
            f"signed for bridge {meta.client_id!r}, this is {bridge_id!r}",
        )
    issued, expires = _time(meta.issued_at, "issued_at"), _time(meta.expires_at, "expires_at")
    if now >= expires:
        raise ProgramRejectedError(RejectReason.EXPIRED, f"expired at {meta.expires_at}")
    if issued - ALLOWED_CLOCK_SKEW > now:
        raise ProgramRejectedError(
            RejectReason.NOT_YET_VALID, f"issued in the future ({meta.issued_at})"
        )
    if nonce_seen(meta.nonce):
        raise ProgramRejectedError(RejectReason.REPLAYED, f"nonce {meta.nonce} was already used")
    return meta
