"""Whether a routine fits what a device can do and measure, and which checks then apply.

Pure. :func:`device_problems` is the validator's device check: a step that needs a
measurement the device cannot give (a pressure band and time on the skin, on a device with
no pressure or contact sensor) is refused unless it says it runs by time, and so is a mode
or LED channel the device does not have. :func:`checks_applied` is what the session record
says of every safety check: applied, and how, or not measured by this device.
"""

from __future__ import annotations

from typing import Final

from devicebridge.core.catalogue import (
    CONTACT,
    IRRADIANCE,
    PRESSURE,
    SKIN_TEMPERATURE,
    KindSupport,
)
from devicebridge.core.routine import LedStep, MassageStep, Routine
from devicebridge.core.tomlpath import Problem, locate

NOT_MEASURED: Final = "not measured by this device"


def device_problems(routine: Routine, support: KindSupport, device: str) -> list[Problem]:
    """Every step of ``routine`` that ``device`` (a name for messages) cannot run, with its
    place in the routine file; empty when the routine fits."""
    problems: list[Problem] = []

    def add(path: str, message: str) -> None:
        problems.append(Problem(path, message, locate(routine.source_text, path)))

    if routine.device_kind is not support.kind:
        add(
            "routine.device_kind",
            f"the routine is for a {routine.device_kind.value}, {device} is a {support.kind.value}",
        )
        return problems
    for number, step in enumerate(routine.steps, start=1):
        path = f"steps[{number}]"
        if isinstance(step, MassageStep):
            if step.mode not in support.modes:
                add(
                    f"{path}.mode",
                    f"{device} has no {step.mode} mode (it has {', '.join(support.modes)})",
                )
            if not step.by_time and not support.senses_skin:
                missing = [w for w in (PRESSURE, CONTACT) if w not in support.measures]
                add(
                    f"{path}.pressure_kpa",
                    f"{device} does not measure {' or '.join(missing)}: the pressure band and "
                    "the time on the skin cannot be checked; to run the step by the clock "
                    'instead, write timing = "time" and duration_s',
                )
        elif isinstance(step, LedStep):
            for channel in ("red", "near_infrared", "blue"):
                if step.irradiance_mw_cm2(channel) > 0 and channel not in support.led_channels:
                    add(
                        f"{path}.{channel}_mw_cm2",
                        f"{device} has no {channel.replace('_', '-')} light",
                    )
    return problems


def checks_applied(routine: Routine, support: KindSupport, *, by_time: bool) -> dict[str, str]:
    """Which safety checks ran in a session of ``routine`` on a device with ``support``,
    and how (stored in the session summary as ``checks``). ``by_time``: the session ran on
    the host clock (a device without contact sensing)."""
    measured = support.measures
    if routine.device_kind.value == "led_mask":
        return {
            "dose": "integrated from the irradiance the mask reports, capped per session and day"
            if IRRADIANCE in measured
            else NOT_MEASURED,
            "skin_temperature": "warn and stop levels"
            if SKIN_TEMPERATURE in measured
            else NOT_MEASURED,
        }
    checks = {
        "pressure": "band and per-zone cap" if PRESSURE in measured else NOT_MEASURED,
        "contact": "time counts on the skin only" if CONTACT in measured else NOT_MEASURED,
        "skin_temperature": "warn and stop levels"
        if SKIN_TEMPERATURE in measured
        else NOT_MEASURED,
        "intensity": "capped per zone by the policy",
    }
    if by_time:
        checks["time"] = "by the host clock: per-zone pass and session caps, session cap"
    else:
        checks["time"] = "by the device's sample clock: per-zone pass and session caps, session cap"
    return checks
