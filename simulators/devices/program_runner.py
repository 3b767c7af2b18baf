"""Device-side programs: receiving a transfer, and running a program with no host.

:class:`ProgramReceiver` is the firmware's transfer buffer: ``PROGRAM_BEGIN`` opens it,
chunks fill it at byte offsets (duplicates and any order are fine; a chunk beyond the
announced size is refused), and ``PROGRAM_COMMIT`` accepts it only when every byte
arrived, the CRC-32 matches and the bytes decode as a program this device can run.

:class:`MassagerProgramRun` and :class:`MaskProgramRun` run a committed program sample by
sample on the device's own clock, from inside the device's sampling loop, so that they
keep going whether or not a host is connected. They enforce the program's hard limits
(session cap, temperature stop, no-contact pause, pressure cap, dose caps) and report
what they do with ``PROGRAM_STEP``, ``HARD_LIMIT``, ``OVER_TEMPERATURE`` and
``PROGRAM_FINISHED`` events (layouts in :mod:`protocols.program`).
"""

from __future__ import annotations

import abc
import logging
import math
import struct
from collections.abc import Callable
from typing import Final

from protocols import (
    MAX_PROGRAM_BYTES,
    DeviceKind,
    EventCode,
    HardLimit,
    HardLimitEvent,
    LedProgramStep,
    MassageProgramStep,
    Program,
    ProgramBegin,
    ProgramChunk,
    ProgramCommit,
    ProgramEndReason,
    ProgramFinishedEvent,
    ProgramRejection,
    ProgramRejectReason,
    ProgramStepEvent,
    ProgramStepReason,
    ProtocolError,
    ResultCode,
    ShutdownReason,
    program_crc32,
)
from protocols.constants import CENTI_J_CM2_PER_J_CM2, CENTI_MW_CM2_PER_MW_CM2, DS_PER_S, MJ_PER_J
from protocols.program import (
    DOSE_CAP_LIMITS,
    LED_CHANNEL_NAMES,
)

_LOGGER = logging.getLogger(__name__)

# After a temperature stop the next step waits until the skin has cooled this far below
# the stop level (43 -> 41 degC with the default policy: its warn level, domain-safety.md).
TEMPERATURE_RESUME_MARGIN_CENTI_C: Final = 200
# As the host engine: the third time the pressure goes above the cap, the program stops.
CAP_EVENTS_BEFORE_STOP: Final = 3
# The LEDs' duty cycle while pulsing.
PULSE_DUTY: Final = 0.5
# How a running program ends when the device powers off.
PROGRAM_END_OF_SHUTDOWN: Final = {
    ShutdownReason.BATTERY_EMPTY: ProgramEndReason.LOW_BATTERY,
    ShutdownReason.BUTTON: ProgramEndReason.BUTTON,
    ShutdownReason.HOST: ProgramEndReason.STOPPED_BY_HOST,
}
_CENTI_C: Final = struct.Struct("<h")

EmitEvent = Callable[[EventCode, bytes, float], None]


class ProgramReceiver:
    """The transfer buffer of one device (``device_kind``: which programs it accepts)."""

    def __init__(self, device_kind: DeviceKind) -> None:
        self.device_kind = device_kind
        self.committed: Program | None = None
        self._transfer_id: int | None = None
        self._crc32 = 0
        self._buffer = bytearray()
        self._received = bytearray()  # one flag per byte: idempotent by offset
        self._refused_offset: int | None = None
        self.chunks_accepted = 0
        self.chunks_refused = 0
        self.last_rejection: ProgramRejection | None = None

    @property
    def transfer_open(self) -> bool:
        return self._transfer_id is not None

    def begin(self, body: ProgramBegin) -> tuple[ResultCode, bytes]:
        if not 0 < body.total_bytes <= MAX_PROGRAM_BYTES:
            _LOGGER.warning(
                "PROGRAM_BEGIN refused: %d bytes (1..%d)", body.total_bytes, MAX_PROGRAM_BYTES
            )
            return ResultCode.INVALID_PARAMETER, b""
        # A new BEGIN replaces an open transfer: the host restarted it.
        self._transfer_id = body.transfer_id
        self._crc32 = body.crc32
        self._buffer = bytearray(body.total_bytes)
        self._received = bytearray(body.total_bytes)
        self._refused_offset = None
        return ResultCode.OK, b""

    def chunk(self, chunk: ProgramChunk) -> bool:
        """Store one chunk; ``False`` when refused (no such transfer, beyond the end)."""
        if chunk.transfer_id != self._transfer_id:
            self.chunks_refused += 1
            _LOGGER.info("program chunk for transfer %d refused: not open", chunk.transfer_id)
            return False
        if not chunk.data:
            self.chunks_refused += 1
            return False
        end = chunk.offset + len(chunk.data)
        if end > len(self._buffer):
            self.chunks_refused += 1
            if self._refused_offset is None:
                self._refused_offset = chunk.offset
            _LOGGER.warning(
                "program chunk at %d (+%d bytes) refused: the program has %d bytes",
                chunk.offset,
                len(chunk.data),
                len(self._buffer),
            )
            return False
        self._buffer[chunk.offset : end] = chunk.data
        self._received[chunk.offset : end] = b"\x01" * len(chunk.data)
        self.chunks_accepted += 1
        return True

    def commit(
        self, body: ProgramCommit, check: Callable[[Program], ProgramRejection | None]
    ) -> tuple[ResultCode, bytes]:
        """Validate the transfer; ``check`` adds the device's own limits."""
        program = self._validate(body)
        rejection = program if isinstance(program, ProgramRejection) else check(program)
        if rejection is not None:
            self.last_rejection = rejection
            _LOGGER.warning(
                "PROGRAM_COMMIT %d refused: %s (detail %d)",
                body.transfer_id,
                getattr(rejection.reason, "name", rejection.reason),
                rejection.detail,
            )
            result = (
                ResultCode.LIMIT_EXCEEDED
                if rejection.reason == ProgramRejectReason.HARDWARE_LIMIT
                else ResultCode.INVALID_PARAMETER
            )
            return result, rejection.encode()
        assert isinstance(program, Program)
        self.committed = program
        self._transfer_id = None
        return ResultCode.OK, b""

    def _validate(self, body: ProgramCommit) -> Program | ProgramRejection:
        if self._transfer_id is None or body.transfer_id != self._transfer_id:
            return ProgramRejection(ProgramRejectReason.NO_TRANSFER)
        if self._refused_offset is not None:
            return ProgramRejection(ProgramRejectReason.CHUNK_REFUSED, self._refused_offset)
        missing = self._received.find(0)
        if missing >= 0:
            return ProgramRejection(ProgramRejectReason.INCOMPLETE, missing)
        data = bytes(self._buffer)
        actual = program_crc32(data)
        if actual != self._crc32:
            return ProgramRejection(ProgramRejectReason.CRC_MISMATCH, actual)
        try:
            program = Program.decode(data)
        except ProtocolError as exc:
            _LOGGER.warning("committed bytes are not a program: %s", exc)
            return ProgramRejection(ProgramRejectReason.MALFORMED)
        if program.device_kind != self.device_kind:
            return ProgramRejection(ProgramRejectReason.WRONG_DEVICE_KIND, int(program.device_kind))
        return program

    def discard_transfer(self) -> None:
        self._transfer_id = None
        self._buffer = bytearray()
        self._received = bytearray()
        self._refused_offset = None


class _ProgramRun(abc.ABC):
    """What both kinds share: step index, session cap, the skin temperature stop, events,
    the end."""

    def __init__(
        self,
        program: Program,
        sample_rate_hz: int,
        emit: EmitEvent,
        start_s: float,
        temperature_stop_centi_c: int,
    ) -> None:
        self.program = program
        self.sample_rate_hz = sample_rate_hz
        self.emit = emit
        self.start_s = start_s
        self.index = 0
        self.end_reason: ProgramEndReason | None = None
        self._stop_centi_c = temperature_stop_centi_c
        self._cooling = False
        self._samples = 0
        self._cap_samples = program.limits.session_length_cap_s * sample_rate_hz
        self._pause_samples = max(
            1, math.ceil(program.limits.no_contact_pause_ds * sample_rate_hz / DS_PER_S)
        )

    @property
    def finished(self) -> bool:
        return self.end_reason is not None

    def _step_event(self, reason: ProgramStepReason, t_s: float) -> None:
        # The start names the program, so a host can tell which one the user started.
        crc = program_crc32(self.program.encode()) if reason is ProgramStepReason.STARTED else None
        event = ProgramStepEvent(self.index, reason, crc)
        self.emit(EventCode.PROGRAM_STEP, event.encode(), t_s)

    def _hard_limit(self, limit: HardLimit, t_s: float) -> None:
        self.emit(EventCode.HARD_LIMIT, HardLimitEvent(limit, self.index).encode(), t_s)

    def _count_sample(self, t_s: float) -> bool:
        """One more sample of program time; ``False`` (and the end) at the session cap."""
        self._samples += 1
        if self._samples <= self._cap_samples:
            return True
        self._hard_limit(HardLimit.SESSION_LENGTH, t_s)
        self.stop(ProgramEndReason.SESSION_CAP, t_s)
        return False

    def _temperature_holds(self, t_s: float, temperature_centi_c: int) -> bool:
        """The skin temperature stop; ``True`` when the step may not run on this sample.

        At or above the stop, ``OVER_TEMPERATURE`` and the step ends (the program, at its
        last step); the next step waits until the skin has cooled
        ``TEMPERATURE_RESUME_MARGIN_CENTI_C`` below the stop, and starts with
        ``PROGRAM_STEP`` (over-temperature).
        """
        if self._cooling:
            if temperature_centi_c >= self._stop_centi_c - TEMPERATURE_RESUME_MARGIN_CENTI_C:
                return True
            self._cooling = False
            self._step_event(ProgramStepReason.OVER_TEMPERATURE, t_s)
            self._cooled(t_s)
        if temperature_centi_c >= self._stop_centi_c:
            self.emit(EventCode.OVER_TEMPERATURE, _CENTI_C.pack(temperature_centi_c), t_s)
            self._over_temperature(t_s)
            return True
        return False

    def _cooled(self, t_s: float) -> None:  # noqa: B027 - optional hook
        """Hook: the skin has cooled and the step after a temperature stop starts."""

    @abc.abstractmethod
    def _over_temperature(self, t_s: float) -> None:
        """The step ends at the temperature stop (``OVER_TEMPERATURE`` is out): the next
        step waits for the skin to cool (set ``_cooling``), or the program ends."""

    def stop(self, reason: ProgramEndReason, t_s: float) -> None:
        """End now: actuators off, ``PROGRAM_FINISHED``."""
        if self.finished:
            return
        self._actuators_off()
        self.emit(EventCode.PROGRAM_FINISHED, ProgramFinishedEvent(reason).encode(), t_s)
        self.end_reason = reason

    @abc.abstractmethod
    def _actuators_off(self) -> None:
        """Switch every actuator of the device off (motor, or every LED channel)."""


class MassagerProgramRun(_ProgramRun):
    """A massage program: per step, effective contact time under the step's pressure cap.

    Per sample, as the host engine does: no contact counts nothing and pauses the motor
    after the no-contact pause; pressure above the step's cap stops the motor at once
    (``HARD_LIMIT``) until it is back at or below the band's top (the gap between the
    band and the cap keeps the motor from chattering at the cap), and the third time
    ends the program; the skin temperature stop ends the step. The device cannot tell
    zones apart by itself, so any contact counts for the current step.
    """

    def __init__(
        self,
        program: Program,
        sample_rate_hz: int,
        emit: EmitEvent,
        start_s: float,
        apply: Callable[[MassageProgramStep | None, float], None],
    ) -> None:
        super().__init__(
            program, sample_rate_hz, emit, start_s, program.limits.skin_temperature_stop_centi_c
        )
        self._steps = [s for s in program.steps if isinstance(s, MassageProgramStep)]
        self._apply = apply
        self._contact_samples = 0
        self._no_contact_samples = 0
        self._paused = False
        self._above_cap = False
        self._cap_events = 0

    @property
    def step(self) -> MassageProgramStep:
        return self._steps[self.index]

    def begin(self, t_s: float) -> None:
        self._step_event(ProgramStepReason.STARTED, t_s)
        self._apply(self.step, t_s)

    def _actuators_off(self) -> None:
        self._apply(None, self.start_s)

    def _samples_for(self, contact_time_ds: int) -> int:
        return max(1, round(contact_time_ds * self.sample_rate_hz / DS_PER_S))

    def on_sample(
        self, t_s: float, pressure_dapa: int, contact: bool, temperature_centi_c: int
    ) -> None:
        """One sensor reading at ``t_s``; the device applies what this decides to it."""
        if self.finished or not self._count_sample(t_s):
            return
        if self._temperature_holds(t_s, temperature_centi_c):
            return
        if not contact:
            self._no_contact_samples += 1
            if self._no_contact_samples >= self._pause_samples and not self._paused:
                self._paused = True
                self._apply(None, t_s)
                self._step_event(ProgramStepReason.PAUSED, t_s)
            return
        self._no_contact_samples = 0
        step = self.step
        if pressure_dapa > step.pressure_cap_dapa:
            if not self._above_cap:
                self._above_cap = True
                self._cap_events += 1
                self._apply(None, t_s)
                self._hard_limit(HardLimit.PRESSURE_CAP, t_s)
                if self._cap_events >= CAP_EVENTS_BEFORE_STOP:
                    self.stop(ProgramEndReason.HARD_LIMIT, t_s)
            return
        if self._above_cap:
            if pressure_dapa > step.pressure_max_dapa:
                return  # below the cap but above the band: the motor stays off
            self._above_cap = False
            self._resume(t_s)
        elif self._paused:
            self._resume(t_s)
        self._contact_samples += 1
        if self._contact_samples >= self._samples_for(step.contact_time_ds):
            self._advance(t_s)

    def _resume(self, t_s: float) -> None:
        self._paused = False
        self._step_event(ProgramStepReason.RESUMED, t_s)
        self._apply(self.step, t_s)

    def _advance(self, t_s: float) -> None:
        self.index += 1
        self._contact_samples = 0
        if self.index >= len(self._steps):
            self.index = len(self._steps) - 1
            self.stop(ProgramEndReason.COMPLETED, t_s)
            return
        self._step_event(ProgramStepReason.STEP_DONE, t_s)
        self._apply(self.step, t_s)

    def _cooled(self, t_s: float) -> None:
        self._apply(self.step, t_s)

    def _over_temperature(self, t_s: float) -> None:
        self._apply(None, t_s)
        self._contact_samples = 0
        if self.index + 1 >= len(self._steps):
            self.stop(ProgramEndReason.OVER_TEMPERATURE, t_s)
            return
        self.index += 1
        self._cooling = True


class MaskProgramRun(_ProgramRun):
    """An LED program: timed steps, per-channel dose caps, temperature stop, not-worn pause.

    The dose is integrated in whole units (0.01 mW/cm² x one sample period) from the
    irradiance the device drives, so a channel stops on the same sample every run: a
    channel whose next sample would take it past its cap stays dark for the rest of the
    program (``HARD_LIMIT``); a step whose lit channels are all at their caps ends.
    """

    def __init__(
        self,
        program: Program,
        sample_rate_hz: int,
        emit: EmitEvent,
        start_s: float,
        *,
        temperature_stop_centi_c: int,
    ) -> None:
        super().__init__(program, sample_rate_hz, emit, start_s, temperature_stop_centi_c)
        self._steps = [s for s in program.steps if isinstance(s, LedProgramStep)]
        channels = range(len(LED_CHANNEL_NAMES))
        self.dose_units = [0 for _ in channels]
        self.capped = [False for _ in channels]
        self._step_samples = 0
        self._not_worn_samples = 0
        self._paused = False
        # Only the three levels are needed per sample: the rest is read from the step.
        self.levels_mw_cm2: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.mean_total_mw_cm2 = 0.0
        self.lit = False

    @property
    def step(self) -> LedProgramStep:
        return self._steps[self.index]

    def dose_j_cm2(self, channel: int) -> float:
        return self.dose_units[channel] / (CENTI_MW_CM2_PER_MW_CM2 * self.sample_rate_hz * MJ_PER_J)

    def _cap_units(self, channel: int) -> int:
        # dose J/cm2 = sum(level 0.01 mW/cm2) / (100 x rate x 1000); cap in 0.01 J/cm2.
        return (
            self.step.dose_cap_centi_j_cm2(channel)
            * self.sample_rate_hz
            * MJ_PER_J
            * CENTI_MW_CM2_PER_MW_CM2
            // CENTI_J_CM2_PER_J_CM2
        )

    def begin(self, t_s: float) -> None:
        self._step_event(ProgramStepReason.STARTED, t_s)

    def _actuators_off(self) -> None:
        self._dark()

    def _dark(self) -> None:
        self.levels_mw_cm2 = (0.0, 0.0, 0.0)
        self.mean_total_mw_cm2 = 0.0
        self.lit = False

    def on_sample(self, t_s: float, temperature_centi_c: int, worn: bool) -> None:
        """Decide this sample's light; read :attr:`levels_mw_cm2` afterwards."""
        self._dark()
        if self.finished or not self._count_sample(t_s):
            return
        if self._temperature_holds(t_s, temperature_centi_c):
            return
        if not worn:
            self._not_worn_samples += 1
            if self._not_worn_samples >= self._pause_samples:
                if not self._paused:
                    self._paused = True
                    self._step_event(ProgramStepReason.PAUSED, t_s)
                return
        else:
            self._not_worn_samples = 0
            if self._paused:
                self._paused = False
                self._step_event(ProgramStepReason.RESUMED, t_s)
        self._light(t_s)

    def _light(self, t_s: float) -> None:
        step = self.step
        channels = range(len(LED_CHANNEL_NAMES))
        wanted = [ch for ch in channels if step.irradiance_centi_mw_cm2(ch) > 0]
        for ch in wanted:
            if self.capped[ch]:
                continue
            if self.dose_units[ch] + step.irradiance_centi_mw_cm2(ch) > self._cap_units(ch):
                self.capped[ch] = True
                self._hard_limit(DOSE_CAP_LIMITS[ch], t_s)
        active = [ch for ch in wanted if not self.capped[ch]]
        if not active:
            self._end_step(t_s, ProgramStepReason.DOSE_CAP)
            return
        pulse_hz = step.pulse_hz
        phase = (self._step_samples / self.sample_rate_hz * pulse_hz) % 1.0
        on = pulse_hz <= 0 or phase < PULSE_DUTY
        duty = PULSE_DUTY if pulse_hz > 0 else 1.0
        levels = [0.0, 0.0, 0.0]
        mean_total = 0.0
        for ch in active:
            level = step.irradiance_centi_mw_cm2(ch)
            mean_total += level / CENTI_MW_CM2_PER_MW_CM2 * duty
            if on:
                levels[ch] = level / CENTI_MW_CM2_PER_MW_CM2
                self.dose_units[ch] += level
        self.levels_mw_cm2 = (levels[0], levels[1], levels[2])
        self.mean_total_mw_cm2 = mean_total
        self.lit = True
        self._step_samples += 1
        if self._step_samples >= step.duration_s * self.sample_rate_hz:
            self._end_step(t_s, ProgramStepReason.STEP_DONE)

    def _over_temperature(self, t_s: float) -> None:
        self._end_step(t_s, ProgramStepReason.OVER_TEMPERATURE)

    def _end_step(self, t_s: float, reason: ProgramStepReason) -> None:
        self._step_samples = 0
        if self.index + 1 >= len(self._steps):
            end = {
                ProgramStepReason.STEP_DONE: ProgramEndReason.COMPLETED,
                ProgramStepReason.OVER_TEMPERATURE: ProgramEndReason.OVER_TEMPERATURE,
            }.get(reason, ProgramEndReason.HARD_LIMIT)
            self.stop(end, t_s)
            return
        self.index += 1
        if reason is ProgramStepReason.OVER_TEMPERATURE:
            self._cooling = True  # the step event follows when the skin has cooled
            return
        self._step_event(reason, t_s)
