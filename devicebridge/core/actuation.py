"""What the engine's state means for a device: the one mapping from decisions to commands.

Pure. A runner never turns a decision into commands itself: it asks :func:`massager_target`
or :func:`led_target` what the engine wants the device to do now, keeps what the device last
acknowledged (:class:`MassagerApplied`, :class:`LedApplied`) and sends what
:func:`next_massager_command` or :func:`led_commands` give until the two agree. Because the
target is derived from the engine's state (not from a queue of past decisions), a command
that was lost (a link drop, a timeout) is simply sent again, and a reconnect only has to
forget what was acknowledged.

Safety stops are not commands of this module: a runner sends STOP_ALL at once, from the
telemetry observer, when the engine pauses or stops (``SAFETY_KINDS``); this module only
turns the motor off (STOP_ALL) when the device is not known to be off already.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from devicebridge.core.engine import DecisionKind, LedEngine, MassageEngine
from devicebridge.core.timed import TimedMassageEngine
from protocols import (
    CommandBody,
    MassageMode,
    SetIntensity,
    SetMode,
    SetZone,
    StartLed,
    StopAll,
    StopLed,
    Zone,
)
from protocols.constants import zone_named

# Decisions that stop actuators at once (STOP_ALL from the telemetry observer).
SAFETY_KINDS: Final = frozenset({DecisionKind.PAUSE, DecisionKind.STOP, DecisionKind.STOP_STEP})
# A step's remaining time is sent in whole seconds; a hair above a whole number stays it.
_DURATION_EPSILON_S: Final = 1e-9


def mode_of(name: str) -> MassageMode:
    """The wire mode of a routine mode name (``vibration`` -> ``MassageMode.VIBRATION``)."""
    return MassageMode[name.upper()]


# --------------------------------------------------------------------------- massager


@dataclass(frozen=True, slots=True)
class MassagerTarget:
    """What a massager should be doing now: its zone, and its motor (intensity 0: off)."""

    zone: Zone
    mode: MassageMode
    intensity: int


@dataclass(slots=True)
class MassagerApplied:
    """What the massager last acknowledged; ``None`` where it is not known."""

    zone: Zone | None = None
    mode: MassageMode | None = None
    intensity: int | None = None

    def forget(self) -> None:
        """After a reconnect: the device may have been told or done anything meanwhile."""
        self.zone = self.mode = self.intensity = None

    def acknowledged(self, command: CommandBody) -> None:
        """``command`` was acknowledged by the device."""
        match command:
            case SetZone(zone=zone):
                self.zone = Zone(zone)
            case SetMode(mode=mode):
                self.mode = MassageMode(mode)
            case SetIntensity(level=level):
                self.intensity = level
            case StopAll():
                self.mode, self.intensity = MassageMode.OFF, 0

    @property
    def motor_on(self) -> bool:
        return bool(self.intensity) and self.mode not in (None, MassageMode.OFF)


def massager_target(engine: MassageEngine | TimedMassageEngine) -> MassagerTarget:
    """What either massage engine wants (by contact or by time: the same commands)."""
    step = engine.current_step
    return MassagerTarget(zone_named(step.zone), mode_of(step.mode), engine.intensity)


def next_massager_command(target: MassagerTarget, applied: MassagerApplied) -> CommandBody | None:
    """The next command that brings the device closer to ``target`` (None: it is there).

    Off first (a motor that should be off and is not known to be), then the zone, then
    mode and intensity.
    """
    if target.intensity == 0 and applied.intensity != 0:
        return StopAll()
    if applied.zone != target.zone:
        return SetZone(target.zone)
    if target.intensity > 0:
        if applied.mode != target.mode:
            return SetMode(target.mode)
        if applied.intensity != target.intensity:
            return SetIntensity(target.intensity)
    return None


# --------------------------------------------------------------------------- LED mask


@dataclass(frozen=True, slots=True)
class LedTarget:
    """The treatment a mask should be running: the step and its (possibly lowered) levels."""

    step: int  # 1-based step number
    red_mw_cm2: float
    near_infrared_mw_cm2: float
    blue_mw_cm2: float
    pulse_hz: float


@dataclass(slots=True)
class LedApplied:
    """The treatment the mask last acknowledged: ``running`` (None: none known to run) and
    whether the light is known to be off (a mask refuses START_LED while one runs)."""

    running: LedTarget | None = None
    off: bool = False

    def acknowledged(self, command: CommandBody, target: LedTarget | None) -> None:
        match command:
            case StartLed():
                self.running, self.off = target, False
            case StopLed() | StopAll():
                self.running, self.off = None, True

    def failed(self) -> None:
        """A command failed: whether a treatment runs is no longer known."""
        self.running, self.off = None, False


def led_target(engine: LedEngine) -> LedTarget | None:
    """The treatment of the engine's current step, or None once the routine has ended."""
    if engine.finished:
        return None
    levels = engine.setpoints_mw_cm2()
    return LedTarget(
        engine.step_number,
        levels["red"],
        levels["near_infrared"],
        levels["blue"],
        engine.current_step.pulse_hz,
    )


def next_led_command(engine: LedEngine, applied: LedApplied) -> CommandBody | None:
    """The next command that makes the mask run the engine's current treatment.

    A running treatment is stopped first (no silent restart of a dose: a mask refuses
    START_LED while one runs); the new one runs for what is left of its step.
    """
    target = led_target(engine)
    if target is None or applied.running == target:
        return None
    if not applied.off:
        return StopLed()
    seconds = max(1, math.ceil(engine.step_remaining_s - _DURATION_EPSILON_S))
    return StartLed(
        target.red_mw_cm2,
        target.near_infrared_mw_cm2,
        target.blue_mw_cm2,
        seconds,
        target.pulse_hz,
    )
