"""Device programs from the host: build one from a routine, install it, start it.

A device with the PROGRAM_TRANSFER capability runs a routine by itself, with hard limits
taken from the safety policy, so the routine ends safely when the laptop sleeps or the
link drops (``docs/protocol.md`` section 7). The steps here:

1. :func:`program_from_routine` turns a checked :class:`~devicebridge.core.routine.Routine`
   into a :class:`protocols.Program`, filling the device's hard limits from the policy;
2. :func:`install_program` sends it: ``PROGRAM_BEGIN``, chunks sized to the link (a BLE
   write with response, or a serial frame), ``PROGRAM_COMMIT``; a chunk write that times
   out is retried once, and when the device reports missing bytes at commit the rest is
   sent once more;
3. :func:`start_program` starts it; :func:`abort_program` ends it.

While the program runs the device reports ``PROGRAM_STEP``, ``HARD_LIMIT`` and finally
``PROGRAM_FINISHED`` events (payloads in :mod:`protocols.program`). Events that happen
while the link is down are kept by the device and delivered after the host's first
command on the next link, and the samples come back by backfill, so the session record
is complete after a reconnect.

Every failure is a :class:`~devicebridge.errors.ProgramTransferError` naming the stage.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from typing import Final

from devicebridge.clock import wait_for
from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy
from devicebridge.core.routine import DeviceKindName, LedStep, MassageStep, Routine
from devicebridge.device.session import DeviceSession
from devicebridge.errors import (
    CommandRejectedError,
    CommandTimeoutError,
    DeviceBridgeError,
    ProgramTransferError,
)
from protocols import (
    Ack,
    CommandBody,
    DeviceKind,
    EncodeError,
    LedProgramStep,
    MassageMode,
    MassageProgramStep,
    Program,
    ProgramAbort,
    ProgramBegin,
    ProgramChunk,
    ProgramCommit,
    ProgramLimits,
    ProgramRejection,
    ProgramRejectReason,
    ProgramStart,
    ProtocolError,
    program_crc32,
)
from protocols.constants import (
    CENTI_C_PER_C,
    CENTI_J_CM2_PER_J_CM2,
    CENTI_MW_CM2_PER_MW_CM2,
    DAPA_PER_KPA,
    DECI_HZ_PER_HZ,
    DS_PER_S,
    U16_MAX,
    zone_named,
)

_LOGGER = logging.getLogger(__name__)

# Header of a program chunk message: type, transfer id, byte offset (docs/protocol.md 7).
CHUNK_HEADER_BYTES: Final = 7
# A chunk write with response that takes longer has failed (as a command without its ack).
DEFAULT_CHUNK_TIMEOUT_S: Final = 2.0
CHUNK_WRITE_ATTEMPTS: Final = 2  # the first write and one retry
_TRANSFER_IDS: Final = itertools.count(1)


# --------------------------------------------------------------------------- routine -> program


def _floor_units(value: float, per_unit: int) -> int:
    """A limit in wire units, rounded towards the safe side (never above the policy)."""
    return min(U16_MAX, math.floor(value * per_unit + 1e-9))


def program_from_routine(
    routine: Routine,
    policy: SafetyPolicy,
    *,
    dose_today_j_cm2: Mapping[str, float] | None = None,
) -> Program:
    """The device program of a checked routine, with hard limits from ``policy``.

    Massage steps get their zone's pressure cap; LED steps get, per channel, a dose cap of
    the smaller of the policy's per-session cap (less what was delivered today, when
    ``dose_today_j_cm2`` is given, against the daily cap) and the routine's planned dose,
    so the device never delivers more than was planned. Limits are rounded to the safe
    side. Raises :class:`ProgramTransferError` (stage ``"encode"``) for a routine that
    does not fit the program format.
    """
    limits_kind = routine.device_kind
    session_cap = (
        policy.massage_length_cap_s
        if limits_kind is DeviceKindName.MASSAGER
        else policy.led_length_cap_s
    )
    limits = ProgramLimits(
        session_length_cap_s=max(1, _floor_units(session_cap.value, 1)),
        skin_temperature_stop_centi_c=math.floor(policy.temperature_stop_c.value * CENTI_C_PER_C),
        no_contact_pause_ds=max(1, _floor_units(policy.no_contact_pause_s.value, DS_PER_S)),
    )
    try:
        if limits_kind is DeviceKindName.MASSAGER:
            massage = [s for s in routine.steps if isinstance(s, MassageStep)]
            program = Program(
                DeviceKind.MASSAGER, limits, tuple(_massage_step(s, policy) for s in massage)
            )
        else:
            caps = _dose_caps(routine, policy, dose_today_j_cm2 or {})
            light = [s for s in routine.steps if isinstance(s, LedStep)]
            program = Program(DeviceKind.LED_MASK, limits, tuple(_led_step(s, caps) for s in light))
        program.validate()
    except (EncodeError, KeyError, ValueError) as exc:
        raise ProgramTransferError(
            f"does not fit the program format: {exc}",
            device=f"routine {routine.name!r}",
            stage="encode",
        ) from exc
    return program


def _massage_step(step: MassageStep, policy: SafetyPolicy) -> MassageProgramStep:
    cap_dapa = _floor_units(policy.zones[step.policy_zone].cap_kpa.value, DAPA_PER_KPA)
    return MassageProgramStep(
        zone=zone_named(step.zone),
        mode=MassageMode[step.mode.upper()],
        intensity=step.intensity,
        contact_time_ds=max(1, round(step.contact_time_s * DS_PER_S)),
        pressure_min_dapa=round(step.pressure_min_kpa * DAPA_PER_KPA),
        # The routine's band is already within the cap; rounding must not lift it above.
        pressure_max_dapa=min(cap_dapa, round(step.pressure_max_kpa * DAPA_PER_KPA)),
        pressure_cap_dapa=cap_dapa,
    )


def _dose_caps(
    routine: Routine, policy: SafetyPolicy, dose_today_j_cm2: Mapping[str, float]
) -> tuple[int, int, int]:
    caps: list[int] = []
    for channel in LED_CHANNELS:
        limits = policy.led[channel]
        allowed_j_cm2 = min(
            limits.dose_cap_session_j_cm2.value,
            limits.dose_cap_day_j_cm2.value - dose_today_j_cm2.get(channel, 0.0),
        )
        allowed = _floor_units(max(0.0, allowed_j_cm2), CENTI_J_CM2_PER_J_CM2)
        # Rounded up so that the planned dose itself is never cut by rounding.
        planned = math.ceil(routine.dose_j_cm2(channel) * CENTI_J_CM2_PER_J_CM2 - 1e-9)
        caps.append(min(allowed, planned))
    return caps[0], caps[1], caps[2]


def _led_step(step: LedStep, caps: tuple[int, int, int]) -> LedProgramStep:
    return LedProgramStep(
        red_centi_mw_cm2=round(step.red_mw_cm2 * CENTI_MW_CM2_PER_MW_CM2),
        near_infrared_centi_mw_cm2=round(step.near_infrared_mw_cm2 * CENTI_MW_CM2_PER_MW_CM2),
        blue_centi_mw_cm2=round(step.blue_mw_cm2 * CENTI_MW_CM2_PER_MW_CM2),
        duration_s=max(1, round(step.duration_s)),
        pulse_deci_hz=round(step.pulse_hz * DECI_HZ_PER_HZ),
        red_dose_cap_centi_j_cm2=caps[0],
        near_infrared_dose_cap_centi_j_cm2=caps[1],
        blue_dose_cap_centi_j_cm2=caps[2],
    )


# --------------------------------------------------------------------------- transfer


async def install_program(
    session: DeviceSession,
    program: Program,
    *,
    transfer_id: int | None = None,
    chunk_data_bytes: int | None = None,
) -> None:
    """Send ``program`` to the device and commit it (it does not start yet).

    ``chunk_data_bytes`` caps the data per chunk below what the link allows (tests).
    Raises :class:`ProgramTransferError` when the device refuses or the link fails.
    """
    try:
        data = program.encode()
    except EncodeError as exc:
        raise ProgramTransferError(str(exc), device=session.name, stage="encode") from exc
    await transfer_program_bytes(
        session, data, transfer_id=transfer_id, chunk_data_bytes=chunk_data_bytes
    )


async def transfer_program_bytes(
    session: DeviceSession,
    data: bytes,
    *,
    crc32: int | None = None,
    transfer_id: int | None = None,
    chunk_data_bytes: int | None = None,
) -> None:
    """The transfer itself, for any bytes (``crc32`` defaults to the bytes' own CRC-32)."""
    tid = transfer_id if transfer_id is not None else next(_TRANSFER_IDS) & U16_MAX
    size = session.transport.max_program_chunk_bytes - CHUNK_HEADER_BYTES
    if chunk_data_bytes is not None:
        size = min(size, chunk_data_bytes)
    if size < 1:
        raise ProgramTransferError(
            f"the link carries no program data per write ({size} bytes)",
            device=session.name,
            stage="chunk",
            transfer_id=tid,
        )
    crc = program_crc32(data) if crc32 is None else crc32
    await _command(session, ProgramBegin(tid, len(data), crc), "begin", tid)
    await _send_chunks(session, data, tid, size, 0)
    try:
        await _command(session, ProgramCommit(tid), "commit", tid)
    except ProgramTransferError as exc:
        if exc.reason != ProgramRejectReason.INCOMPLETE or exc.detail is None:
            raise
        # A chunk got lost on the way (a serial frame dropped as corrupt): send the rest
        # again from the first missing byte, once.
        _LOGGER.info("%s: program bytes from %d missing; resending", session.name, exc.detail)
        await _send_chunks(session, data, tid, size, exc.detail)
        await _command(session, ProgramCommit(tid), "commit", tid)
    _LOGGER.info("%s: program of %d bytes installed (transfer %d)", session.name, len(data), tid)


async def start_program(session: DeviceSession) -> None:
    """Start the committed program: from now on the device runs it by itself."""
    await _command(session, ProgramStart(), "start", None)


async def abort_program(session: DeviceSession) -> None:
    """End a running program now (``PROGRAM_FINISHED`` with STOPPED_BY_HOST follows)."""
    await _command(session, ProgramAbort(), "abort", None)


async def _send_chunks(
    session: DeviceSession, data: bytes, transfer_id: int, size: int, start: int
) -> None:
    for offset in range(start - start % size, len(data), size):
        message = ProgramChunk(transfer_id, offset, data[offset : offset + size]).encode()
        await _write_chunk(session, message, transfer_id, offset)


async def _write_chunk(
    session: DeviceSession, message: bytes, transfer_id: int, offset: int
) -> None:
    for attempt in range(1, CHUNK_WRITE_ATTEMPTS + 1):
        try:
            await wait_for(
                session.clock,
                session.transport.write_program_chunk(message),
                DEFAULT_CHUNK_TIMEOUT_S,
            )
        except TimeoutError:
            _LOGGER.warning(
                "%s: program chunk at %d timed out (attempt %d)", session.name, offset, attempt
            )
            continue
        except DeviceBridgeError as exc:
            raise ProgramTransferError(
                f"chunk at byte {offset}: {exc}",
                device=session.name,
                stage="chunk",
                transfer_id=transfer_id,
            ) from exc
        return
    raise ProgramTransferError(
        f"chunk at byte {offset} not written within {DEFAULT_CHUNK_TIMEOUT_S:g} s, "
        f"{CHUNK_WRITE_ATTEMPTS} times",
        device=session.name,
        stage="chunk",
        transfer_id=transfer_id,
    )


async def _command(
    session: DeviceSession, body: CommandBody, stage: str, transfer_id: int | None
) -> Ack:
    try:
        return await session.send(body)
    except CommandRejectedError as exc:
        rejection = _rejection(exc.payload)
        reason = rejection.reason if rejection else None
        detail = rejection.detail if rejection else None
        why = getattr(exc.result, "name", exc.result)
        if rejection is not None:
            why = f"{why}: {getattr(reason, 'name', reason)}, detail {detail}"
        raise ProgramTransferError(
            f"refused ({why})",
            device=session.name,
            stage=stage,
            transfer_id=transfer_id,
            result=exc.result,
            reason=reason,
            detail=detail,
        ) from exc
    except CommandTimeoutError as exc:
        raise ProgramTransferError(
            f"no acknowledgement within {exc.timeout_s:g} s",
            device=session.name,
            stage=stage,
            transfer_id=transfer_id,
        ) from exc
    except DeviceBridgeError as exc:
        raise ProgramTransferError(
            str(exc), device=session.name, stage=stage, transfer_id=transfer_id
        ) from exc


def _rejection(payload: bytes) -> ProgramRejection | None:
    if not payload:
        return None
    try:
        return ProgramRejection.decode(payload)
    except ProtocolError:
        return None
