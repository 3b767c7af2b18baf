"""The program inbox: what arrives on ``programs/push`` becomes an acknowledgement, or is
dropped with a log line. Nothing raises out of it.

A payload is parsed once, then verified (docs/mqtt.md, "Program push and
acknowledgement"): size, format, a signature by a trusted key, the bridge it is for, the
therapist the key is trusted for, the validity window (instants in UTC, no longer than the
maximum validity), the nonce, and last the program against the bridge's own safety
policy. An accepted program is stored with its nonce before it is acknowledged. A payload
whose nonce cannot be read (not JSON, nested too deeply, binary, over the size limit, no
nonce of the expected form) is dropped unanswered: nobody could match the answer to a
push. Log lines are throttled per kind, so a flood of bad payloads costs a few lines.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import Routine, RoutineError, parse_routine
from devicebridge.core.signed_program import (
    DEFAULT_MAX_VALIDITY,
    ProgramRejectedError,
    RejectReason,
    SignedProgram,
    TrustedSigner,
    VerifiedProgram,
    load_public_key,
    parse_envelope,
    verify,
)
from devicebridge.errors import ProgramStoreError
from devicebridge.logthrottle import ThrottledLog
from devicebridge.storage.programs import ProgramStore

LOG = logging.getLogger(__name__)
RECENT_ACKS: Final = 100  # acknowledgements kept in memory (for status and tests)


@dataclass(frozen=True, slots=True)
class AcceptedProgram:
    """A program the inbox stored and acknowledged as accepted."""

    program_id: int
    therapist_id: str
    routine_name: str
    program_version: str
    device_kind: str


class ProgramInbox:
    """Verifies, checks, stores and answers programs pushed to one bridge.

    ``on_accepted`` is called with each stored program (to install it on devices and
    republish what is installed where); ``now`` is the time validity is judged by.
    """

    def __init__(
        self,
        store: ProgramStore,
        *,
        bridge_id: str,
        policy: SafetyPolicy,
        now: Callable[[], datetime],
        max_validity: timedelta = DEFAULT_MAX_VALIDITY,
        on_accepted: Callable[[AcceptedProgram], None] | None = None,
    ) -> None:
        self.store = store
        self.bridge_id = bridge_id
        self.policy = policy
        self.now = now
        self.max_validity = max_validity
        self.on_accepted = on_accepted
        self.received = 0
        self.answered = 0  # acknowledgements returned (accepted or rejected)
        self.accepted = 0
        self.dropped = 0  # payloads nobody can be answered for
        self.recent_acks: deque[dict[str, Any]] = deque(maxlen=RECENT_ACKS)
        self._log = ThrottledLog(LOG)

    def receive(self, payload: bytes) -> dict[str, Any] | None:
        """The acknowledgement to publish for ``payload``, or None when it is dropped
        because its nonce cannot be read. Never raises."""
        self.received += 1
        try:
            ack = self._accept(payload)
        except ProgramRejectedError as exc:
            if exc.nonce is None:
                self.dropped += 1
                self._log.log(
                    logging.WARNING,
                    "unanswerable push",
                    "dropped a push of %d bytes with no readable nonce, unanswered (%s: %s)",
                    len(payload),
                    exc.reason.value,
                    exc.message,
                )
                return None
            self._log.log(
                logging.WARNING,
                f"{exc.reason.value} rejection",
                "program %s rejected (%s): %s",
                exc.nonce,
                exc.reason.value,
                exc.message,
            )
            ack = {
                "nonce": exc.nonce,
                "status": "rejected",
                "reason": exc.reason.value,
                "detail": exc.message,
            }
        except Exception:
            # A bug: the payload cannot be answered, but the next one will be.
            self.dropped += 1
            self._log.log(
                logging.ERROR,
                "inbox failure",
                "the program inbox failed on a push of %d bytes; dropped",
                len(payload),
                exc_info=True,
            )
            return None
        self.answered += 1
        self.recent_acks.append(ack)
        return ack

    def _accept(self, payload: bytes) -> dict[str, Any]:
        signed = parse_envelope(payload)
        nonce = signed.metadata.nonce
        try:
            verified = self._verify(signed)
            routine = self._check(verified)
            program_id = self.store.accept(
                therapist_id=verified.metadata.therapist_id,
                key_id=verified.key_id,
                program_version=verified.metadata.program_version,
                routine_name=routine.name,
                device_kind=routine.device_kind.value,
                program_text=verified.program.decode("utf-8"),
                nonce=nonce,
                expires_at=verified.expires_at,
                now=self.now(),
            )
        except ProgramStoreError as exc:
            self._log.log(logging.ERROR, "program store failure", "program %s: %s", nonce, exc)
            raise ProgramRejectedError(
                RejectReason.INTERNAL_ERROR,
                "the bridge could not read or write its program store; push again later",
                nonce=nonce,
            ) from exc
        accepted = AcceptedProgram(
            program_id=program_id,
            therapist_id=verified.metadata.therapist_id,
            routine_name=routine.name,
            program_version=verified.metadata.program_version,
            device_kind=routine.device_kind.value,
        )
        self.accepted += 1
        LOG.info(
            "program %d accepted from %r: %r v%r",
            program_id,
            accepted.therapist_id,
            accepted.routine_name,
            accepted.program_version,
        )
        if self.on_accepted is not None:
            try:
                self.on_accepted(accepted)
            except Exception:
                # Stored is stored: the answer is still "accepted"; devices get it when
                # they next connect.
                LOG.exception("program %d: scheduling its installation failed", program_id)
        return {
            "nonce": nonce,
            "status": "accepted",
            "program_id": program_id,
            "routine": accepted.routine_name,
            "program_version": accepted.program_version,
            "device_kind": accepted.device_kind,
        }

    def _verify(self, signed: SignedProgram) -> VerifiedProgram:
        trusted: dict[str, TrustedSigner] = {}
        record = self.store.trusted_key(signed.key_id)
        if record is not None:
            try:
                trusted[record.key_id] = TrustedSigner(
                    record.therapist_id, load_public_key(record.public_key)
                )
            except ValueError as exc:
                self._log.log(
                    logging.ERROR,
                    "unreadable trusted key",
                    "trusted key %s is unreadable (%s); treated as unknown",
                    record.key_id,
                    exc,
                )
        return verify(
            signed,
            trusted_keys=trusted,
            bridge_id=self.bridge_id,
            now=self.now(),
            nonce_seen=self.store.nonce_seen,
            max_validity=self.max_validity,
        )

    def _check(self, verified: VerifiedProgram) -> Routine:
        """The program as a routine that keeps this bridge's policy (``unsafe`` if not)."""
        nonce = verified.metadata.nonce
        try:
            text = verified.program.decode("utf-8")
            return parse_routine(text, self.policy, label="program")
        except UnicodeDecodeError:
            raise ProgramRejectedError(
                RejectReason.MALFORMED, "the program is not UTF-8", nonce=nonce
            ) from None
        except RecursionError:
            raise ProgramRejectedError(
                RejectReason.MALFORMED, "the program nests too deeply", nonce=nonce
            ) from None
        except RoutineError as exc:
            # A policy rule broken makes it unsafe; otherwise it is not a valid routine.
            reason = (
                RejectReason.UNSAFE if any(p.rule for p in exc.problems) else RejectReason.MALFORMED
            )
            raise ProgramRejectedError(reason, str(exc), nonce=nonce) from exc
