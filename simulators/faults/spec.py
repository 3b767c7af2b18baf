"""What a fault is: its kind, class, parameters and schedule (``make_fault``)."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from protocols import Opcode
from protocols.telemetry import (
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)
from simulators.devices.link import Channel
from simulators.errors import FaultError

# Seeds the fault generators apart from the device's own streams (simulators.devices.device).
FAULT_STREAM: Final = 0xFA17
# How far a repeated event may move around its nominal time, as a fraction of every_s.
EVENT_JITTER_FRACTION: Final = 0.25
# The message type byte has its high bit clear for every OFCP message; setting it makes a
# type no receiver knows, which is how a damaged BLE notification shows itself.
TYPE_DAMAGE_MASK: Final = 0x80
DEFAULT_REBOOT_DOWN_S: Final = 1.5
DEFAULT_OUT_OF_RANGE_S: Final = 2.0


class FaultClass(enum.StrEnum):
    LINK = "link"
    FRAME = "frame"
    DEVICE = "device"
    SENSOR = "sensor"


class FaultKind(enum.StrEnum):
    DROP = "drop"
    LATENCY = "latency"
    DISCONNECT = "disconnect"
    MTU = "mtu"
    CORRUPT = "corrupt"
    TRUNCATE = "truncate"
    DUPLICATE = "duplicate"
    REORDER = "reorder"
    BROWNOUT = "brownout"
    REBOOT = "reboot"
    LOW_BATTERY = "low_battery"
    STUCK_SENSOR = "stuck_sensor"
    CLOCK_DRIFT = "clock_drift"
    IGNORE_COMMANDS = "ignore_commands"
    NOISE = "noise"
    DRIFT = "drift"
    SATURATION = "saturation"
    DROPOUT = "dropout"


FAULT_CLASS: Final[Mapping[FaultKind, FaultClass]] = {
    FaultKind.DROP: FaultClass.LINK,
    FaultKind.LATENCY: FaultClass.LINK,
    FaultKind.DISCONNECT: FaultClass.LINK,
    FaultKind.MTU: FaultClass.LINK,
    FaultKind.CORRUPT: FaultClass.FRAME,
    FaultKind.TRUNCATE: FaultClass.FRAME,
    FaultKind.DUPLICATE: FaultClass.FRAME,
    FaultKind.REORDER: FaultClass.FRAME,
    FaultKind.BROWNOUT: FaultClass.DEVICE,
    FaultKind.REBOOT: FaultClass.DEVICE,
    FaultKind.LOW_BATTERY: FaultClass.DEVICE,
    FaultKind.STUCK_SENSOR: FaultClass.DEVICE,
    FaultKind.CLOCK_DRIFT: FaultClass.DEVICE,
    FaultKind.IGNORE_COMMANDS: FaultClass.DEVICE,
    FaultKind.NOISE: FaultClass.SENSOR,
    FaultKind.DRIFT: FaultClass.SENSOR,
    FaultKind.SATURATION: FaultClass.SENSOR,
    FaultKind.DROPOUT: FaultClass.SENSOR,
}

# Parameters per kind with their defaults; anything else is an error.
FAULT_PARAMETERS: Final[Mapping[FaultKind, Mapping[str, Any]]] = {
    FaultKind.DROP: {"rate": 0.05, "burst": 1},
    FaultKind.LATENCY: {"delay_s": 0.05, "jitter_s": 0.0},
    FaultKind.DISCONNECT: {"out_of_range_s": DEFAULT_OUT_OF_RANGE_S},
    FaultKind.MTU: {"mtu_size": 23},
    FaultKind.CORRUPT: {"rate": 0.05, "bits": 1},
    FaultKind.TRUNCATE: {"rate": 0.05},
    FaultKind.DUPLICATE: {"rate": 0.05},
    FaultKind.REORDER: {"rate": 0.05},
    FaultKind.BROWNOUT: {"down_s": DEFAULT_REBOOT_DOWN_S},
    FaultKind.REBOOT: {"down_s": DEFAULT_REBOOT_DOWN_S},
    FaultKind.LOW_BATTERY: {"percent": 8.0, "empty_after_s": None},
    FaultKind.STUCK_SENSOR: {"value": None, "field": "pressure"},
    FaultKind.CLOCK_DRIFT: {"ppm": 20_000.0},
    FaultKind.IGNORE_COMMANDS: {"opcodes": ("SET_INTENSITY", "SET_MODE")},
    FaultKind.NOISE: {"sigma": 0.5, "field": "pressure"},
    FaultKind.DRIFT: {"per_s": 0.05, "field": "pressure"},
    FaultKind.SATURATION: {"max": 10.0, "field": "pressure"},
    FaultKind.DROPOUT: {"rate": 1.0, "field": "pressure"},
}
MESSAGE_FAULTS: Final = frozenset(
    {
        FaultKind.DROP,
        FaultKind.LATENCY,
        FaultKind.CORRUPT,
        FaultKind.TRUNCATE,
        FaultKind.DUPLICATE,
        FaultKind.REORDER,
    }
)
EVENT_FAULTS: Final = frozenset(
    {FaultKind.DISCONNECT, FaultKind.BROWNOUT, FaultKind.REBOOT, FaultKind.LOW_BATTERY}
)
# Faults that change the samples the firmware takes.
SAMPLE_FAULTS: Final = frozenset(
    {
        FaultKind.STUCK_SENSOR,
        FaultKind.NOISE,
        FaultKind.DRIFT,
        FaultKind.SATURATION,
        FaultKind.DROPOUT,
    }
)
SENSOR_FIELDS: Final[Mapping[str, tuple[str, float]]] = {
    # field name -> (sample column, units per raw count)
    "pressure": ("pressure_dapa", PRESSURE_KPA_PER_UNIT),
    "temperature": ("skin_temperature_centi_c", TEMPERATURE_C_PER_UNIT),
}
DEFAULT_CHANNELS: Final = frozenset({Channel.TELEMETRY})


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault with its parameters and its schedule.

    Active from ``at_s`` (clock seconds) for ``duration_s`` (``None``: until removed).
    Events (disconnect, brownout, reboot, low battery) happen at ``at_s`` and then every
    ``every_s`` (moved by up to a quarter period, drawn from the seed) while the window
    lasts, at most ``count`` times. Message faults touch only ``channels``.
    """

    kind: FaultKind
    at_s: float = 0.0
    duration_s: float | None = None
    every_s: float | None = None
    count: int | None = None
    channels: frozenset[Channel] = DEFAULT_CHANNELS
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fault_class(self) -> FaultClass:
        return FAULT_CLASS[self.kind]

    @property
    def end_s(self) -> float:
        return math.inf if self.duration_s is None else self.at_s + self.duration_s

    def active(self, t_s: float) -> bool:
        return self.at_s <= t_s < self.end_s

    def param(self, name: str) -> Any:
        return self.params.get(name, FAULT_PARAMETERS[self.kind][name])

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.params.items())]
        window = f"at {self.at_s:g} s" + (
            f" for {self.duration_s:g} s" if self.duration_s is not None else ""
        )
        return f"{self.kind.value}({', '.join(parts)}) {window}"


def make_fault(
    kind: str,
    *,
    at_s: float = 0.0,
    duration_s: float | None = None,
    every_s: float | None = None,
    count: int | None = None,
    channels: Iterable[str] | str | None = None,
    where: str = "fault",
    **params: Any,
) -> Fault:
    """Build and check a :class:`Fault` from plain values (TOML, JSON, keyword arguments).

    Raises :class:`FaultError` naming ``where`` and the bad key.
    """
    try:
        fault_kind = FaultKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in FaultKind)
        raise FaultError(f"{where}: unknown fault kind {kind!r} (known: {known})") from None
    known_params = FAULT_PARAMETERS[fault_kind]
    for name in params:
        if name not in known_params:
            raise FaultError(
                f"{where}: fault {kind!r} has no parameter {name!r} "
                f"(known: {', '.join(known_params) or 'none'})"
            )
    if at_s < 0 or not math.isfinite(at_s):
        raise FaultError(f"{where}: at_s must be a non-negative number, got {at_s!r}")
    if duration_s is not None and duration_s <= 0:
        raise FaultError(f"{where}: duration_s must be positive, got {duration_s!r}")
    if every_s is not None and every_s <= 0:
        raise FaultError(f"{where}: every_s must be positive, got {every_s!r}")
    if count is not None and count < 1:
        raise FaultError(f"{where}: count must be at least 1, got {count!r}")
    if (every_s is not None or count is not None) and fault_kind not in EVENT_FAULTS:
        raise FaultError(f"{where}: every_s/count only apply to events, not to {kind!r}")
    rate = params.get("rate")
    if rate is not None and not 0.0 <= float(rate) <= 1.0:
        raise FaultError(f"{where}: rate must be between 0 and 1, got {rate!r}")
    burst = params.get("burst")
    if burst is not None and int(burst) < 1:
        raise FaultError(f"{where}: burst must be at least 1, got {burst!r}")
    field_name = params.get("field")
    if field_name is not None and field_name not in SENSOR_FIELDS:
        raise FaultError(
            f"{where}: field must be one of {', '.join(SENSOR_FIELDS)}, got {field_name!r}"
        )
    mtu_size = params.get("mtu_size")
    if mtu_size is not None and int(mtu_size) < 23:
        raise FaultError(f"{where}: mtu_size must be at least 23 (the ATT minimum)")
    if fault_kind is FaultKind.IGNORE_COMMANDS:
        names = params.get("opcodes", known_params["opcodes"])
        names = (names,) if isinstance(names, str) else tuple(names)
        for name in names:
            if name not in Opcode.__members__:
                raise FaultError(f"{where}: unknown opcode {name!r} in opcodes")
        params["opcodes"] = names
    if channels is None:
        channel_set = DEFAULT_CHANNELS
    else:
        names = [channels] if isinstance(channels, str) else list(channels)
        if names == ["all"]:
            channel_set = frozenset(Channel)
        else:
            try:
                channel_set = frozenset(Channel(n) for n in names)
            except ValueError:
                known = ", ".join(c.value for c in Channel)
                raise FaultError(
                    f"{where}: unknown channel in {names!r} (known: {known}, or 'all')"
                ) from None
    return Fault(fault_kind, float(at_s), duration_s, every_s, count, channel_set, dict(params))


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """One thing a fault did, for the event timeline."""

    t_s: float
    device: str
    kind: str
    detail: str
