"""Routine programs signed by a therapist with Ed25519, bound to one bridge.

What is signed is the exact canonical bytes of the program plus its metadata::

    b"devicebridge-signed-program/1\\n"
    + u32 length + canonical JSON of the metadata (sorted keys, no spaces, UTF-8)
    + u32 length + the program file's exact bytes

The metadata carries the therapist id, the client (bridge) id, the program version, the
issue and expiry times and a random nonce, so a signature cannot be moved to another
bridge, replayed, or kept past its expiry. A trusted key signs for exactly one therapist,
and no program is valid for longer than the bridge's maximum validity. Times are compared
as instants in UTC, whatever offset the signer wrote. Verification returns a typed
rejection reason for every failure (with the envelope's nonce whenever it could be read,
so that the pusher can be answered); nothing unverified reaches the routine parser, let
alone a device.

cryptography loads when a key is read or a signature checked, not on import, so the
configuration (which names the default maximum validity) stays light to load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

from devicebridge.errors import ProgramRejectedError as ProgramRejectedError  # re-exported

FORMAT: Final = "devicebridge-signed-program/1"
DOMAIN_TAG: Final = (FORMAT + "\n").encode()
MAX_ENVELOPE_BYTES: Final = 64 * 1024
MAX_PROGRAM_BYTES: Final = 32 * 1024
ALLOWED_CLOCK_SKEW: Final = timedelta(minutes=5)
NONCE_BYTES: Final = 16
# A nonce is the key of the replay check and is echoed in acknowledgements: short, plain
# text, and long enough not to collide (sign_program makes 32 hex digits).
NONCE_PATTERN: Final = re.compile(r"[0-9A-Za-z_-]{16,128}")
KEY_ID_PATTERN: Final = re.compile(r"[0-9a-f]{16,64}")  # key_id() gives 16 hex digits
# How long a program may be valid (issued_at to expires_at) unless the bridge's
# configuration says otherwise ([programs] max_validity_days): a course of treatment is
# planned in weeks; a leaked envelope or key should not outlive that. It also bounds how
# long a bridge keeps nonces.
DEFAULT_MAX_VALIDITY_DAYS: Final = 30
DEFAULT_MAX_VALIDITY: Final = timedelta(days=DEFAULT_MAX_VALIDITY_DAYS)
MAX_VALIDITY_SETTING: Final = "[programs] max_validity_days"
_LENGTH: Final = struct.Struct(">I")

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )


class RejectReason(StrEnum):
    """The ``reason`` of a rejected program's acknowledgement (docs/mqtt.md)."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CLIENT = "wrong_client"
    WRONG_THERAPIST = "wrong_therapist"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    VALIDITY_TOO_LONG = "validity_too_long"
    REPLAYED = "replayed"
    UNSAFE = "unsafe"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class TrustedSigner:
    """A key this bridge trusts, and the one therapist it signs for."""

    therapist_id: str
    public_key: Ed25519PublicKey


@dataclass(frozen=True, slots=True)
class ProgramMetadata:
    therapist_id: str
    client_id: str
    program_version: str
    issued_at: str  # ISO 8601 with a UTC offset (sign_program writes UTC)
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
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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
    if nonce is not None and not NONCE_PATTERN.fullmatch(nonce):
        raise ValueError(f"nonce {nonce!r} does not match {NONCE_PATTERN.pattern}")
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
    """Decode an envelope received over MQTT; raise a typed rejection when malformed.

    The rejection carries the envelope's nonce when it could be read. An envelope over
    :data:`MAX_ENVELOPE_BYTES` is not parsed at all (so its nonce is not read).
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ProgramRejectedError(
            RejectReason.OVERSIZED, f"{len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}"
        )
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:
        # ValueError: not UTF-8, not JSON, or an integer beyond Python's digit limit;
        # RecursionError: nesting deeper than the parser's recursion limit.
        raise ProgramRejectedError(RejectReason.MALFORMED, f"not JSON: {exc}") from None
    nonce = readable_nonce(raw)

    def rejected(reason: RejectReason, message: str) -> ProgramRejectedError:
        return ProgramRejectedError(reason, message, nonce=nonce)

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise rejected(RejectReason.MALFORMED, f"format is not {FORMAT!r}")
    program = raw.get("program")
    if not isinstance(program, str):
        raise rejected(RejectReason.MALFORMED, "no program text")
    try:
        program_bytes = program.encode("utf-8")
    except UnicodeEncodeError:
        raise rejected(RejectReason.MALFORMED, "the program is not valid Unicode text") from None
    if len(program_bytes) > MAX_PROGRAM_BYTES:
        raise rejected(
            RejectReason.OVERSIZED,
            f"program of {len(program_bytes)} bytes exceeds {MAX_PROGRAM_BYTES}",
        )
    signature, kid = raw.get("signature"), raw.get("key_id")
    if not signature or not kid:
        raise rejected(RejectReason.UNSIGNED, "the envelope carries no signature")
    if not isinstance(signature, str) or not isinstance(kid, str):
        raise rejected(RejectReason.MALFORMED, "signature and key_id must be strings")
    if not KEY_ID_PATTERN.fullmatch(kid):
        raise rejected(RejectReason.MALFORMED, f"key_id must match {KEY_ID_PATTERN.pattern}")
    metadata = _metadata(raw.get("metadata"), rejected)
    try:
        signature_bytes = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise rejected(RejectReason.MALFORMED, "signature is not base64") from None
    return SignedProgram(metadata, program_bytes, kid, signature_bytes)


def readable_nonce(raw: Any) -> str | None:
    """The nonce of a decoded envelope, if it has one of the expected form."""
    metadata = raw.get("metadata") if isinstance(raw, dict) else None
    nonce = metadata.get("nonce") if isinstance(metadata, dict) else None
    return nonce if isinstance(nonce, str) and NONCE_PATTERN.fullmatch(nonce) else None


def _metadata(
    raw: Any, rejected: Callable[[RejectReason, str], ProgramRejectedError]
) -> ProgramMetadata:
    fields = ProgramMetadata.__dataclass_fields__
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise rejected(
            RejectReason.MALFORMED, f"metadata must have exactly: {', '.join(sorted(fields))}"
        )
    if not all(isinstance(v, str) and v for v in raw.values()):
        raise rejected(RejectReason.MALFORMED, "metadata values must be non-empty strings")
    if not NONCE_PATTERN.fullmatch(raw["nonce"]):
        raise rejected(RejectReason.MALFORMED, f"nonce must match {NONCE_PATTERN.pattern}")
    return ProgramMetadata(**raw)


def instant(text: str, name: str = "time", *, nonce: str | None = None) -> datetime:
    """An ISO 8601 time with its UTC offset, as the instant it names (in UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ProgramRejectedError(
            RejectReason.MALFORMED, f"{name} is not ISO 8601", nonce=nonce
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ProgramRejectedError(RejectReason.MALFORMED, f"{name} has no time zone", nonce=nonce)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ProgramRejectedError(
            RejectReason.MALFORMED, f"{name} is out of range", nonce=nonce
        ) from None


def _days(period: timedelta) -> str:
    return f"{period / timedelta(days=1):g} days"


def check_validity_period(
    valid_for: timedelta, max_validity: timedelta, *, nonce: str | None = None
) -> None:
    """Refuse a program valid for longer than ``max_validity`` (``VALIDITY_TOO_LONG``)."""
    if valid_for > max_validity:
        raise ProgramRejectedError(
            RejectReason.VALIDITY_TOO_LONG,
            f"valid for {_days(valid_for)}, longer than the maximum of {_days(max_validity)}"
            f" ({MAX_VALIDITY_SETTING})",
            nonce=nonce,
        )


@dataclass(frozen=True, slots=True)
class VerifiedProgram:
    """A program whose signature, binding, validity and nonce were checked."""

    metadata: ProgramMetadata
    key_id: str
    program: bytes
    issued_at: datetime  # UTC
    expires_at: datetime  # UTC


def verify(
    signed: SignedProgram,
    *,
    trusted_keys: Mapping[str, TrustedSigner],
    bridge_id: str,
    now: datetime,
    nonce_seen: Callable[[str], bool],
    max_validity: timedelta = DEFAULT_MAX_VALIDITY,
) -> VerifiedProgram:
    """Check signature, binding, validity window and replay; return the trusted program.

    The order matters: nothing in the metadata is believed before the signature checks.
    Then the client id must be this bridge, the therapist id the one the key is trusted
    for, the window (as instants in UTC) must hold ``now`` and be no longer than
    ``max_validity``, and the nonce must be new.
    """
    from cryptography.exceptions import InvalidSignature

    meta = signed.metadata

    def rejected(reason: RejectReason, message: str) -> ProgramRejectedError:
        return ProgramRejectedError(reason, message, nonce=meta.nonce)

    signer = trusted_keys.get(signed.key_id)
    if signer is None:
        raise rejected(
            RejectReason.UNKNOWN_KEY,
            f"key {signed.key_id!r} is not trusted on this bridge (devicebridge trust add)",
        )
    try:
        signer.public_key.verify(signed.signature, signed_bytes(meta, signed.program))
    except InvalidSignature:
        raise rejected(
            RejectReason.BAD_SIGNATURE, "the signature does not match the program and metadata"
        ) from None
    if meta.client_id != bridge_id:
        raise rejected(
            RejectReason.WRONG_CLIENT,
            f"signed for bridge {meta.client_id!r}, this is {bridge_id!r}",
        )
    if meta.therapist_id != signer.therapist_id:
        raise rejected(
            RejectReason.WRONG_THERAPIST,
            f"signed as {meta.therapist_id!r} with key {signed.key_id}, which this bridge"
            f" trusts for {signer.therapist_id!r} only",
        )
    issued = instant(meta.issued_at, "issued_at", nonce=meta.nonce)
    expires = instant(meta.expires_at, "expires_at", nonce=meta.nonce)
    now = now.astimezone(UTC)
    if expires <= issued:
        raise rejected(RejectReason.MALFORMED, "expires_at is not after issued_at")
    if now >= expires:
        raise rejected(RejectReason.EXPIRED, f"expired at {expires.isoformat()}")
    if issued > now + ALLOWED_CLOCK_SKEW:
        raise rejected(RejectReason.NOT_YET_VALID, f"issued in the future ({issued.isoformat()})")
    check_validity_period(expires - issued, max_validity, nonce=meta.nonce)
    if nonce_seen(meta.nonce):
        raise rejected(RejectReason.REPLAYED, f"nonce {meta.nonce} was already used")
    return VerifiedProgram(meta, signed.key_id, signed.program, issued, expires)
