"""Faults for simulated devices: link, frame, device and sensor, each on a seeded schedule.

A :class:`FaultInjector` decorates one device *instance* (never its class, and without
editing the device model): it wraps every link the device attaches in a
:class:`FaultyLink`, post-processes the samples its firmware takes, wraps its command
execution and its clock, and runs scheduled events (disconnects, reboots, a battery that
runs out) on the virtual clock. Faults can be added and removed while the device runs
(:mod:`simulators.control` does so over a socket).

Fault classes and kinds (parameters in :data:`FAULT_PARAMETERS`):

=======  ===============  ============================================================
class    kind             what happens
=======  ===============  ============================================================
link     drop             notifications lost, one at a time or ``burst`` in a row
link     latency          every notification arrives ``delay_s`` (+ jitter) later
link     disconnect       the link drops; the device stays out of range ``out_of_range_s``
link     mtu              a smaller ATT MTU: fewer samples per batch
frame    corrupt          bits flipped (on a framed link the CRC catches them; on BLE
                          the message type is damaged, see :func:`corrupt_message`)
frame    truncate         the end of a frame is cut off
frame    duplicate        a frame arrives twice
frame    reorder          a frame arrives after the one sent after it
device   brownout         power dips: RAM (the ring, the count) lost, boot after ``down_s``
device   reboot           the firmware restarts: it sends what it holds, then reboots; its
                          BOOT reports the old count (kept in retained RAM)
device   low_battery      the charge drops to ``percent``; empty ``empty_after_s`` later
device   stuck_sensor     the pressure reading freezes (firmware/ADC fault)
device   clock_drift      the device's clock runs ``ppm`` parts per million fast/slow
device   ignore_commands  the listed opcodes are acknowledged OK but not applied
sensor   noise            extra Gaussian noise of ``sigma`` (kPa, or °C for temperature)
sensor   drift            the reading drifts by ``per_s`` per second
sensor   saturation       the reading is clipped at ``max``
sensor   dropout          the sensor reads 0 (``rate``: chance per sample block)
=======  ===============  ============================================================

Every random choice of a fault comes from its own generator, seeded by the world seed,
the device index and the fault's position, so a seed replays a run exactly.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from protocols import Ack, Command, Opcode, ResetReason, ResultCode, StopAll, encode_frame
from protocols.telemetry import (
    MASSAGER_FLAG_CONTACT,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)
from simulators.clock import VirtualClock
from simulators.device import SimulatedDevice
from simulators.link import Channel, DeviceLink

# Seeds the fault generators apart from the device's own streams (simulators.device).
FAULT_STREAM: Final = 0xFA17
# How far a repeated event may move around its nominal time, as a fraction of every_s.
EVENT_JITTER_FRACTION: Final = 0.25
# The message type byte has its high bit clear for every OFCP message; setting it makes a
# type no receiver knows, which is how a damaged BLE notification shows itself.
TYPE_DAMAGE_MASK: Final = 0x80
DEFAULT_REBOOT_DOWN_S: Final = 1.5
DEFAULT_OUT_OF_RANGE_S: Final = 2.0
CONTACT_ON_KPA: Final = 0.3  # simulators.massager.CONTACT_ON_KPA (the firmware's threshold)


class FaultError(ValueError):
    """A fault description is invalid; the message says which fault and which parameter."""


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


def corrupt_message(message: bytes, rng: np.random.Generator, bits: int) -> bytes:
    """A damaged unframed message (BLE): the type byte gets an unknown value, plus bit flips.

    Bit errors on air never reach a BLE host (the link layer's CRC makes the packet be
    sent again), so what a host meets is a message damaged before it was sent. Setting
    the type byte's high bit guarantees the damage is detectable by the receiver.
    """
    damaged = bytearray(message)
    damaged[0] ^= TYPE_DAMAGE_MASK
    for _ in range(max(0, bits - 1)):
        if len(damaged) > 1:
            index = int(rng.integers(1, len(damaged)))
            damaged[index] ^= 1 << int(rng.integers(0, 8))
    return bytes(damaged)


def corrupt_frame(frame: bytes, rng: np.random.Generator, bits: int) -> bytes:
    """A serial frame with ``bits`` bits flipped (never the trailing delimiter)."""
    damaged = bytearray(frame)
    body = len(damaged) - 1
    for _ in range(max(1, bits)):
        index = int(rng.integers(0, body))
        damaged[index] ^= 1 << int(rng.integers(0, 8))
    return bytes(damaged)


class _ActiveFault:
    """A fault as installed on one device: its generator and its running state."""

    def __init__(self, fault: Fault, rng: np.random.Generator, ordinal: int) -> None:
        self.fault = fault
        self.rng = rng
        self.ordinal = ordinal
        self.burst_left = 0
        self.stuck_raw: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.hits = 0


class FaultyLink:
    """A :class:`~simulators.link.DeviceLink` that applies an injector's message faults.

    Framed links (the pty and TCP ports, which have ``send_frame``) get their faults
    applied to the encoded frame bytes; other links (BLE) to the message.
    """

    def __init__(self, inner: DeviceLink, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector
        self._held: tuple[Channel, bytes] | None = None
        self._delayed: collections.deque[tuple[float, Channel, bytes]] = collections.deque()
        self._delivery: asyncio.Task[None] | None = None
        self._release_s = 0.0
        self.closed = False
        # The inner link is fixed for the wrapper's life, and so is whether it is framed.
        self._framed = hasattr(inner, "send_frame")

    @property
    def max_payload_bytes(self) -> int:
        return self.inner.max_payload_bytes

    @property
    def framed(self) -> bool:
        return self._framed

    def send(self, channel: Channel, message: bytes) -> None:
        if self.closed:
            return
        injector = self.injector
        payload = encode_frame(message) if self._framed else message
        if not injector.has_faults and not self._delayed:
            # No fault to drop, damage or delay it, nothing delayed to queue behind: what
            # the way below does then, without its lists.
            self._deliver(channel, payload)
            return
        now_s = injector.clock.now_s()
        payloads = [payload]
        for active in injector.active_faults(now_s, MESSAGE_FAULTS):
            fault = active.fault
            if channel not in fault.channels or not payloads:
                continue
            payloads = self._apply(active, channel, payloads, now_s)
        delay_s = self._latency_s(channel, now_s)
        for payload in payloads:
            if delay_s > 0 or self._delayed:
                self._delay(channel, payload, now_s + delay_s)
            else:
                self._deliver(channel, payload)

    def _apply(
        self, active: _ActiveFault, channel: Channel, payloads: list[bytes], now_s: float
    ) -> list[bytes]:
        fault, rng = active.fault, active.rng
        kind = fault.kind
        if kind is FaultKind.LATENCY:
            return payloads
        if kind is FaultKind.DROP:
            if active.burst_left == 0 and rng.random() < float(fault.param("rate")):
                active.burst_left = int(fault.param("burst"))
            if active.burst_left > 0:
                active.burst_left -= 1
                self.injector.record(active, f"{channel.value} notification dropped")
                return []
            return payloads
        out: list[bytes] = []
        for payload in payloads:
            if rng.random() >= float(fault.param("rate")):
                out.append(payload)
                continue
            if kind is FaultKind.CORRUPT:
                bits = int(fault.param("bits"))
                damaged = (
                    corrupt_frame(payload, rng, bits)
                    if self.framed
                    else corrupt_message(payload, rng, bits)
                )
                out.append(damaged)
                self.injector.record(active, f"{channel.value} frame corrupted")
            elif kind is FaultKind.TRUNCATE:
                body = payload[:-1] if self.framed else payload
                if len(body) < 2:
                    out.append(payload)
                    continue
                cut = body[: int(rng.integers(1, len(body)))]
                out.append(cut + b"\x00" if self.framed else cut)
                self.injector.record(active, f"{channel.value} frame truncated to {len(cut)} B")
            elif kind is FaultKind.DUPLICATE:
                out += [payload, payload]
                self.injector.record(active, f"{channel.value} frame duplicated")
            elif kind is FaultKind.REORDER:
                if self._held is None:
                    self._held = (channel, payload)
                    self.injector.record(active, f"{channel.value} frame held back")
                else:
                    out.append(payload)
        return out

    def _latency_s(self, channel: Channel, now_s: float) -> float:
        delay_s = 0.0
        for active in self.injector.active_faults(now_s, {FaultKind.LATENCY}):
            if channel in active.fault.channels:
                jitter_s = float(active.fault.param("jitter_s"))
                delay_s += float(active.fault.param("delay_s"))
                if jitter_s > 0:
                    delay_s += float(active.rng.uniform(0.0, jitter_s))
                if active.hits == 0:
                    self.injector.record(active, f"{channel.value} notifications delayed")
                else:
                    active.hits += 1
        return delay_s

    def _deliver(self, channel: Channel, payload: bytes) -> None:
        self._send_inner(channel, payload)
        # A held frame goes out right after the one that overtook it.
        if self._held is not None and self._held[0] is channel:
            held, self._held = self._held, None
            self._send_inner(*held)

    def _send_inner(self, channel: Channel, payload: bytes) -> None:
        if self._framed:
            self.inner.send_frame(channel, payload)  # type: ignore[attr-defined]
        else:
            self.inner.send(channel, payload)

    def _delay(self, channel: Channel, payload: bytes, due_s: float) -> None:
        # In order: a later notification never overtakes an earlier one (one radio queue).
        self._release_s = max(self._release_s, due_s)
        self._delayed.append((self._release_s, channel, payload))
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.get_running_loop().create_task(
                self._deliver_delayed(), name="FaultyLink latency"
            )

    async def _deliver_delayed(self) -> None:
        clock = self.injector.clock
        while self._delayed and not self.closed:
            due_s, channel, payload = self._delayed[0]
            await clock.sleep_until(due_s)
            if not self._delayed or self._delayed[0][2] is not payload:
                return  # closed while waiting: the link dropped what it had
            self._delayed.popleft()
            self._deliver(channel, payload)

    def device_closed(self) -> None:
        self.close()
        self.inner.device_closed()

    def close(self) -> None:
        """The link is gone: what is held or delayed is lost with it."""
        self.closed = True
        self._held = None
        self._delayed.clear()
        if self._delivery is not None and not self._delivery.done():
            self._delivery.cancel()
        self._delivery = None

    # Ports compare ``device.link is self``; let the wrapper answer for its inner link.
    def wraps(self, link: object) -> bool:
        return self.inner is link


class DriftingClock:
    """The device's view of time: ``base`` running ``1 + ppm / 1e6`` times as fast."""

    def __init__(self, base: VirtualClock, ppm: float, anchor_s: float) -> None:
        self.base = base
        self.factor = 1.0 + ppm / 1e6
        self.anchor_s = anchor_s

    def now_s(self) -> float:
        return self.anchor_s + (self.base.now_s() - self.anchor_s) * self.factor

    def base_time_s(self, device_s: float) -> float:
        return self.anchor_s + (device_s - self.anchor_s) / self.factor

    async def sleep(self, delay_s: float) -> None:
        await self.sleep_until(self.now_s() + delay_s)

    async def sleep_until(self, t_s: float) -> None:
        await self.base.sleep_until(self.base_time_s(t_s))


class FaultInjector:
    """Faults of one device; see the module docstring.

    ``world`` (optional) lets a disconnect take the device out of BLE range; without it a
    disconnect closes the link the device is attached to.
    """

    def __init__(
        self,
        device: SimulatedDevice,
        *,
        seed: int,
        clock: VirtualClock | None = None,
        world: Any = None,
        faults: Iterable[Fault] = (),
        on_record: Callable[[FaultRecord], None] | None = None,
    ) -> None:
        self.device = device
        self.seed = seed
        self.clock: VirtualClock = clock if clock is not None else device.clock
        self.world = world
        self.records: list[FaultRecord] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self._on_record = on_record
        self._faults: list[_ActiveFault] = []
        self._ordinal = 0
        self._installed = False
        self._running = False
        self._saved: dict[str, Any] = {}
        self._base_clock: Any = None
        self.reboots = 0
        # What the device still held when it went down (for "no sample lost" checks).
        self.held_before_reboot: list[tuple[int, int]] = []
        for fault in faults:
            self.add(fault)

    # ------------------------------------------------------------------ the fault list

    @property
    def faults(self) -> list[Fault]:
        return [a.fault for a in self._faults]

    def add(self, fault: Fault) -> Fault:
        """Add a fault now (its schedule counts in clock time, like ``at_s``)."""
        rng = np.random.default_rng([self.seed, self.device.index, self._ordinal, FAULT_STREAM])
        active = _ActiveFault(fault, rng, self._ordinal)
        self._ordinal += 1
        self._faults.append(active)
        if self._running:
            self._start_schedule(active)
        return fault

    def remove(self, fault: Fault) -> None:
        for active in list(self._faults):
            if active.fault is fault:
                self._stop_active(active)

    def clear(self, kind: FaultKind | None = None) -> int:
        """Remove every fault (of ``kind``); returns how many were removed."""
        removed = [a for a in self._faults if kind is None or a.fault.kind is kind]
        for active in removed:
            self._stop_active(active)
        return len(removed)

    def _stop_active(self, active: _ActiveFault) -> None:
        if active in self._faults:
            self._faults.remove(active)
        if active.task is not None and not active.task.done():
            active.task.cancel()
        if active.fault.kind is FaultKind.MTU and "mtu_size" in self._saved:
            self.device.mtu_size = self._saved.pop("mtu_size")
        if active.fault.kind is FaultKind.CLOCK_DRIFT:
            self._restore_clock()

    @property
    def has_faults(self) -> bool:
        """Whether any fault is installed (none can act while this is ``False``)."""
        return bool(self._faults)

    def active_faults(self, t_s: float, kinds: Iterable[FaultKind]) -> list[_ActiveFault]:
        if not self._faults:
            return []
        wanted = kinds if isinstance(kinds, (set, frozenset)) else set(kinds)
        return [a for a in self._faults if a.fault.kind in wanted and a.fault.active(t_s)]

    def record(self, active: _ActiveFault, detail: str) -> None:
        active.hits += 1
        self.counts[active.fault.kind.value] += 1
        entry = FaultRecord(
            round(self.clock.now_s(), 6), self.device.serial_number, active.fault.kind, detail
        )
        self.records.append(entry)
        if self._on_record is not None:
            self._on_record(entry)

    # ------------------------------------------------------------------ installation

    def install(self) -> FaultInjector:
        """Decorate the device instance (idempotent); call before or after it starts."""
        if self._installed:
            return self
        self._installed = True
        device = self.device
        # Earlier instance-level wrappers (a scenario's hand) are put back on uninstall.
        self._saved_methods = {
            name: device.__dict__.get(name)
            for name in ("attach_link", "detach_link", "_generate", "execute")
        }
        original_attach = device.attach_link
        original_generate = device._generate
        original_execute = device.execute
        original_detach = device.detach_link

        def attach_link(link: DeviceLink) -> None:
            original_attach(link if isinstance(link, FaultyLink) else FaultyLink(link, self))

        def detach_link() -> None:
            link = device.link
            original_detach()
            if isinstance(link, FaultyLink):
                link.close()  # what it held back or delayed is lost with the link

        def generate(times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.void]:
            return self._sensor(times_s, original_generate(times_s))

        def execute(command: Command) -> Ack:
            return self._execute(command, original_execute)

        device.attach_link = attach_link  # type: ignore[method-assign]
        device.detach_link = detach_link  # type: ignore[method-assign]
        device._generate = generate  # type: ignore[method-assign]
        device.execute = execute  # type: ignore[method-assign]
        link = device.link
        if link is not None and not isinstance(link, FaultyLink):
            device._link = FaultyLink(link, self)
        return self

    def uninstall(self) -> None:
        if not self._installed:
            return
        self.stop()
        for active in list(self._faults):
            self._stop_active(active)
        device = self.device
        for name, saved in self._saved_methods.items():
            if saved is None:
                device.__dict__.pop(name, None)
            else:
                setattr(device, name, saved)
        link = device.link
        if isinstance(link, FaultyLink):
            link.close()
            device._link = link.inner
        self._installed = False

    def start(self) -> None:
        """Start the scheduled events (a running event loop is needed)."""
        self.install()
        if self._running:
            return
        self._running = True
        for active in self._faults:
            self._start_schedule(active)

    def stop(self) -> None:
        self._running = False
        for active in self._faults:
            if active.task is not None and not active.task.done():
                active.task.cancel()
            active.task = None

    def _start_schedule(self, active: _ActiveFault) -> None:
        kind = active.fault.kind
        if kind in EVENT_FAULTS or kind in (FaultKind.MTU, FaultKind.CLOCK_DRIFT):
            active.task = asyncio.get_running_loop().create_task(
                self._schedule(active), name=f"fault {kind.value} {self.device.serial_number}"
            )

    async def _schedule(self, active: _ActiveFault) -> None:
        fault = active.fault
        clock = self.clock
        await clock.sleep_until(fault.at_s)
        if fault.kind in (FaultKind.MTU, FaultKind.CLOCK_DRIFT):
            self._begin_state(active)
            if fault.duration_s is not None:
                await clock.sleep_until(fault.end_s)
                self._stop_active(active)
            return
        done = 0
        nominal_s = fault.at_s
        while True:
            await self._event(active)
            done += 1
            if fault.every_s is None or (fault.count is not None and done >= fault.count):
                return
            nominal_s += fault.every_s
            jitter_s = float(active.rng.uniform(-1.0, 1.0)) * EVENT_JITTER_FRACTION * fault.every_s
            next_s = max(clock.now_s(), nominal_s + jitter_s)
            if next_s >= fault.end_s:
                return
            await clock.sleep_until(next_s)

    def _begin_state(self, active: _ActiveFault) -> None:
        fault = active.fault
        device = self.device
        if fault.kind is FaultKind.MTU:
            self._saved.setdefault("mtu_size", device.mtu_size)
            device.mtu_size = int(fault.param("mtu_size"))
            self.record(active, f"MTU now {device.mtu_size}")
        elif fault.kind is FaultKind.CLOCK_DRIFT:
            device.catch_up()  # samples due so far were taken on the true clock
            self._base_clock = device.clock
            drifting = DriftingClock(self.clock, float(fault.param("ppm")), self.clock.now_s())
            device.clock = drifting  # type: ignore[assignment]
            self.record(active, f"device clock off by {float(fault.param('ppm')):g} ppm")

    def _restore_clock(self) -> None:
        if self._base_clock is not None:
            self.device.clock = self._base_clock
            self._base_clock = None

    # ------------------------------------------------------------------ events

    async def _event(self, active: _ActiveFault) -> None:
        kind = active.fault.kind
        device = self.device
        if kind is FaultKind.DISCONNECT:
            out_of_range_s = float(active.fault.param("out_of_range_s"))
            if not device.is_connected:
                return
            self.record(active, f"link dropped, out of range for {out_of_range_s:g} s")
            if self.world is not None and hasattr(self.world, "drop_link"):
                self.world.drop_link(device, out_of_range_s=out_of_range_s)
            else:
                link = device.link
                device.detach_link()
                if link is not None:
                    link.device_closed()
        elif kind in (FaultKind.REBOOT, FaultKind.BROWNOUT):
            await self._reboot(active, graceful=kind is FaultKind.REBOOT)
        elif kind is FaultKind.LOW_BATTERY:
            await self._low_battery(active)

    async def _reboot(self, active: _ActiveFault, *, graceful: bool) -> None:
        device = self.device
        if not device.is_powered:
            return
        device.catch_up()
        if graceful:
            # A firmware-initiated restart sends what it holds before it goes.
            device._tick()
        self.held_before_reboot.append((device.ring.oldest_sequence, device.ring.next_sequence))
        self.record(
            active,
            f"{'reboot' if graceful else 'brown-out'} at sample {device.ring.next_sequence}",
        )
        # The power (or the firmware) is gone: no SHUTDOWN event, no goodbye. A warm reset
        # keeps the sample count in retained RAM for the next BOOT; a brown-out does not.
        device.lose_power(keeps_count=graceful)
        await device.stop()
        self.reboots += 1
        await self.clock.sleep(float(active.fault.param("down_s")))
        # RAM is lost: actuators off, then boot (sequence numbers start again at 0).
        device.execute(Command.of(0, StopAll()))
        self._restore_clock()
        device.start(ResetReason.SOFTWARE if graceful else ResetReason.BROWN_OUT)

    async def _low_battery(self, active: _ActiveFault) -> None:
        device = self.device
        if not device.is_powered:
            return
        device.catch_up()
        percent = float(active.fault.param("percent"))
        device._battery_charge_percent = min(device.battery_charge_percent, percent)
        # No charge used: only the BATTERY_LOW check and the level notification run.
        device._drain_battery(0.0, device.uptime_s)
        self.record(active, f"battery at {device.battery_percent} %")
        empty_after_s = active.fault.param("empty_after_s")
        if empty_after_s is None:
            return
        await self.clock.sleep(float(empty_after_s))
        if not _powered(device):
            return
        device.catch_up()
        device._tick()  # what the firmware holds goes out before the battery gives up
        device._battery_charge_percent = 0.0
        self.record(active, "battery empty: shutting down")
        # The next sample finds the battery empty and the firmware shuts down (SHUTDOWN).
        await self.clock.sleep(1.0 / device.sample_rate_hz)
        device.catch_up()

    # ------------------------------------------------------------------ commands and sensors

    def _execute(self, command: Command, original: Callable[[Command], Ack]) -> Ack:
        now_s = self.clock.now_s()
        for active in self.active_faults(now_s, {FaultKind.IGNORE_COMMANDS}):
            names = active.fault.param("opcodes")
            if isinstance(command.opcode, Opcode) and command.opcode.name in names:
                self.record(active, f"{command.opcode.name} acknowledged but not applied")
                return Ack(command.command_id, command.opcode, ResultCode.OK)
        return original(command)

    def _sensor(
        self, times_s: npt.NDArray[np.float64], samples: npt.NDArray[np.void]
    ) -> npt.NDArray[np.void]:
        if not self._faults:
            return samples
        count = int(samples.shape[0])
        distorting = [a for a in self._faults if a.fault.kind in SAMPLE_FAULTS]
        if count == 0 or not distorting:
            return samples
        device = self.device
        boot_s = self.clock.now_s() - device.uptime_s
        clock_times = times_s[:count] + boot_s
        for active in distorting:
            fault = active.fault
            mask = (clock_times >= fault.at_s) & (clock_times < fault.end_s)
            if not mask.any():
                continue
            column, unit = SENSOR_FIELDS[str(fault.param("field"))]
            if column not in samples.dtype.names:  # type: ignore[operator]
                continue
            samples = self._distort(active, samples, column, unit, mask, clock_times)
        return samples

    def _distort(
        self,
        active: _ActiveFault,
        samples: npt.NDArray[np.void],
        column: str,
        unit: float,
        mask: npt.NDArray[np.bool_],
        clock_times: npt.NDArray[np.float64],
    ) -> npt.NDArray[np.void]:
        fault = active.fault
        info = np.iinfo(samples.dtype[column])
        raw = samples[column].astype(np.float64)
        kind = fault.kind
        first_hit = active.hits == 0
        if kind is FaultKind.STUCK_SENSOR:
            if active.stuck_raw is None:
                value = fault.param("value")
                index = int(np.argmax(mask))
                active.stuck_raw = (
                    round(float(value) / unit) if value is not None else int(raw[index])
                )
            raw = np.where(mask, active.stuck_raw, raw)
            if column == "pressure_dapa" and "flags" in samples.dtype.names:  # type: ignore[operator]
                contact = active.stuck_raw * unit >= CONTACT_ON_KPA
                flags = samples["flags"]
                stuck_flags = (
                    (flags | MASSAGER_FLAG_CONTACT)
                    if contact
                    else (flags & ~np.uint8(MASSAGER_FLAG_CONTACT))
                )
                samples["flags"] = np.where(mask, stuck_flags, flags)
            detail = f"{column} stuck at raw {active.stuck_raw}"
        elif kind is FaultKind.NOISE:
            noise = active.rng.standard_normal(raw.shape[0]) * float(fault.param("sigma")) / unit
            raw = np.where(mask, raw + noise, raw)
            detail = f"{column} noise sigma {fault.param('sigma')}"
        elif kind is FaultKind.DRIFT:
            offset = (clock_times - fault.at_s) * float(fault.param("per_s")) / unit
            raw = np.where(mask, raw + offset, raw)
            detail = f"{column} drifting {fault.param('per_s')} per s"
        elif kind is FaultKind.SATURATION:
            top = float(fault.param("max")) / unit
            raw = np.where(mask, np.minimum(raw, top), raw)
            detail = f"{column} saturates at {fault.param('max')}"
        else:  # DROPOUT: per block of samples, the sensor answers 0 (an I2C read that failed)
            if active.rng.random() >= float(fault.param("rate")):
                return samples
            raw = np.where(mask, 0.0, raw)
            if column == "pressure_dapa" and "flags" in samples.dtype.names:  # type: ignore[operator]
                samples["flags"] = np.where(
                    mask, samples["flags"] & ~np.uint8(MASSAGER_FLAG_CONTACT), samples["flags"]
                )
            detail = f"{column} dropped out"
        samples[column] = np.clip(np.round(raw), info.min, info.max)
        if first_hit:
            self.record(active, detail)
        else:
            active.hits += 1
        return samples


def _powered(device: SimulatedDevice) -> bool:
    # A function, not the property, so type checkers do not keep a narrowing across awaits.
    return device.is_powered


def inject(
    device: SimulatedDevice,
    faults: Iterable[Fault],
    *,
    seed: int | None = None,
    world: Any = None,
    on_record: Callable[[FaultRecord], None] | None = None,
) -> FaultInjector:
    """Install faults on ``device`` and start their schedule (inside a running loop)."""
    injector = FaultInjector(
        device,
        seed=device.seed if seed is None else seed,
        world=world,
        faults=faults,
        on_record=on_record,
    )
    injector.start()
    return injector
