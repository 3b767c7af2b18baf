"""Firmware behaviour shared by every simulated device.

:class:`SimulatedDevice` is the part of a device's firmware that does not
depend on what the device is: boot, the sampling loop on the virtual clock,
the telemetry ring, live streaming sized to the link, paced backfill, the
command dispatcher with its result codes, events, and the battery. Subclasses
(:class:`~simulators.devices.massager.SimulatedMassager`,
:class:`~simulators.devices.mask.SimulatedLedMask`) produce the samples and implement
their own commands.

Output goes through a :class:`~simulators.devices.link.DeviceLink`, so one model serves
the bleak backend and the pty alike.

Event payloads (the protocol leaves them to the device; little-endian):

=====================  ===================================================
BOOT                   :class:`protocols.BootEvent`: reset reason, and the previous boot's
                       sample count when the firmware kept it (see :meth:`SimulatedDevice.start`)
BUTTON                 u8 button (:class:`Button`), u8 press (:class:`Press`)
CONTACT_CHANGED        u8 1 contact / worn, 0 none
ZONE_CHANGED           u8 zone
BATTERY_LOW            u8 battery percent
SHUTDOWN               :class:`protocols.ShutdownEvent`: reason, this boot's sample count
TREATMENT_STARTED      the START_LED parameters (5 x u16)
TREATMENT_FINISHED     u8 :class:`protocols.TreatmentEndReason`
OVER_TEMPERATURE       i16 skin temperature in 0.01 degC
HARD_LIMIT             :class:`protocols.HardLimitEvent` (while a program runs)
PROGRAM_STEP           :class:`protocols.ProgramStepEvent`
PROGRAM_FINISHED       :class:`protocols.ProgramFinishedEvent`
=====================  ===================================================

Programs (``PROGRAM_BEGIN`` .. ``PROGRAM_START``, see :mod:`simulators.devices.program_runner`)
run inside the sampling loop, whether or not a host is connected. Events a running
program causes while no host can hear them (no link, or a new link on which the host has
not sent its first command yet, so its notifications may not be enabled) are kept in a
small backlog and sent right after the acknowledgement of the host's first command on
the next link, so the host's record of the session is complete. ``BOOT`` waits in the
same backlog (when a device boots, no host listens yet).

A restart loses the RAM: the ring and the counter start again at 0. What the firmware
can keep is the previous boot's sample count: saved at an orderly power-off, and kept in
retained RAM through a warm reset (:meth:`SimulatedDevice.lose_power` with
``keeps_count``), but not through a brown-out. The next ``BOOT`` reports it when kept.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import enum
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Final, NamedTuple, Protocol, TypedDict

import numpy as np
import numpy.typing as npt

from protocols import (
    PROTOCOL_VERSION,
    Ack,
    AdvertisedIdentity,
    BackfillReply,
    BootEvent,
    ButtonId,
    ButtonPress,
    Capability,
    Command,
    CommandBody,
    DeviceKind,
    DeviceProfile,
    Event,
    EventCode,
    GetInfo,
    MessageType,
    Opcode,
    Ping,
    Program,
    ProgramAbort,
    ProgramBegin,
    ProgramChunk,
    ProgramCommit,
    ProgramEndReason,
    ProgramFinishedEvent,
    ProgramRejection,
    ProgramStart,
    ProtocolError,
    RequestBackfill,
    ResetReason,
    ResultCode,
    SampleFormat,
    ShutdownEvent,
    ShutdownReason,
    StartStream,
    StopAll,
    StopStream,
    TelemetryBatch,
    max_samples_per_batch,
)
from protocols.constants import ATT_HEADER_BYTES
from protocols.telemetry import SAMPLE_DTYPES, SEQUENCE_MODULUS, encode_batch
from simulators.clock import VirtualClock
from simulators.devices.link import Channel, DeviceLink, LinkLayer, LinkWrapper
from simulators.devices.program_runner import ProgramReceiver
from simulators.devices.ring import TelemetryRing

DEFAULT_MTU_SIZE: Final = 247  # ATT MTU with data length extension (ble-and-ecosystem.md)
DEFAULT_BATCH_INTERVAL_S: Final = 0.1
DEFAULT_RING_DURATION_S: Final = 120.0  # the contract asks for at least 60 s
# Backfill shares the radio with live data: about 0.8 Mbps of application
# throughput with data length extension (ble-and-ecosystem.md, BLE link numbers).
BACKFILL_BYTES_PER_S: Final = 100_000
BATTERY_LOW_PERCENT: Final = 10.0
INITIAL_BATTERY_RANGE_PERCENT: Final = (60.0, 100.0)
MS_PER_S: Final = 1000
DEVICE_TIME_MODULUS: Final = 1 << 32
EVENT_SEQUENCE_MODULUS: Final = 1 << 16
EVENT_LOG_LENGTH: Final = 1000
# Events of a running program kept while no host listens (a routine emits a few dozen).
EVENT_BACKLOG_LENGTH: Final = 256
# _drain_battery_quietly drains shorter runs in plain floats, longer ones with numpy.
QUIET_DRAIN_ARRAY_MIN_SAMPLES: Final = 32
# Guards the sample count against float error in (now - boot) * rate.
SAMPLE_TIME_EPSILON: Final = 1e-6

# What the command line, the control port and scenario files call each kind of device.
KIND_LABELS: Final[Mapping[DeviceKind, str]] = {
    DeviceKind.MASSAGER: "massager",
    DeviceKind.LED_MASK: "mask",
}

MANUFACTURER_NAME: Final = "devicebridge simulator"
HARDWARE_REVISION: Final = "sim-B"
FIRMWARE_REVISION: Final = "1.0.0-sim"

_SIGNED_CENTI: Final = struct.Struct("<h")


class RandomStream(enum.IntEnum):
    """Independent random streams of one device, so that one never shifts another."""

    IDENTITY = 0
    SENSOR = 1
    RADIO = 2
    HAND = 3
    BATTERY = 4


def device_rng(seed: int, index: int, *stream: int) -> np.random.Generator:
    """The generator of one stream of device ``index`` in a world seeded with ``seed``.

    ``stream``: a :class:`RandomStream` for the device's own, or other integers (a fault's
    stream, see :meth:`SimulatedDevice.random_stream`); distinct keys never share numbers.
    """
    return np.random.default_rng([seed, index, *map(int, stream)])


def quiet_charges(
    charges_percent: npt.NDArray[np.float64], drains_percent: npt.NDArray[np.float64], count: int
) -> npt.NDArray[np.float64]:
    """The battery charge of each device before and after each of ``count`` samples, one
    row per device: the charge goes down by that device's drain per sample, one subtraction
    per sample in order (as sample by sample), so every value is the same to the bit."""
    steps = np.empty((charges_percent.shape[0], count + 1), dtype=np.float64)
    steps[:, 0] = charges_percent
    steps[:, 1:] = drains_percent[:, None]
    return np.subtract.accumulate(steps, axis=1)


def derived_seed(seed: int, index: int, stream: RandomStream) -> int:
    """A plain integer seed for a helper (such as a hand script) of one device."""
    return int(device_rng(seed, index, stream).integers(0, 2**63 - 1))


# The event payload codes are the protocol's (docs/protocol.md section 6).
Button = ButtonId
Press = ButtonPress


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What a device is called; stable for a (seed, index) pair."""

    index: int
    address: str
    serial_number: str
    name: str
    base_rssi_dbm: float


RSSI_RANGE_DBM: Final = (-80.0, -45.0)
SERIAL_TAG_LIMIT: Final = 16**6
NAME_TAG_MASK: Final = 0xFFFF
MAX_DEVICE_INDEX: Final = 0xFFFF


def derive_identity(seed: int, index: int, serial_prefix: str, name_prefix: str) -> DeviceIdentity:
    if not 0 <= index <= MAX_DEVICE_INDEX:
        raise ValueError(f"device index {index} outside 0..{MAX_DEVICE_INDEX}")
    rng = device_rng(seed, index, RandomStream.IDENTITY)
    tag = int(rng.integers(0, SERIAL_TAG_LIMIT))
    low_bytes = rng.integers(0, 256, 2)
    # The index is part of both, so devices of one world never collide.
    address = ":".join(
        ["SI", "MU", *(f"{b:02X}" for b in (index >> 8, index & 0xFF, *map(int, low_bytes)))]
    )
    serial = f"{serial_prefix}{index:02d}{tag:06X}"
    name = f"{name_prefix}-{tag & NAME_TAG_MASK:04X}"
    rssi = float(rng.uniform(*RSSI_RANGE_DBM))
    return DeviceIdentity(index, address, serial, name, rssi)


class SampleSpan(NamedTuple):
    """Samples ``start`` up to (not including) ``end`` of a device sampling at ``rate_hz``."""

    start: int
    end: int
    rate_hz: int

    def times_s(self) -> npt.NDArray[np.float64]:
        """The samples' times in seconds since boot."""
        # Float bounds give the same float64 sequence as integer ones with a float64 dtype
        # (every value is a whole number), for a good deal less (numpy's cast path).
        return np.arange(float(self.start), float(self.end)) / self.rate_hz


class FirmwareClock(Protocol):
    """The time a device's firmware counts on (its crystal): the world's
    :class:`~simulators.clock.VirtualClock`, or one that runs fast or slow against it
    (:meth:`SimulatedDevice.set_firmware_clock`)."""

    def now_s(self) -> float: ...

    async def sleep_until(self, t_s: float, /) -> None: ...


# Seams for faults and scenarios (see SimulatedDevice): what a device lets others change
# without replacing any of its methods.
SampleFilter = Callable[[npt.NDArray[np.float64], npt.NDArray[np.void]], npt.NDArray[np.void]]
"""``filter(times_s, samples) -> samples``: changes the samples the firmware takes (what its
sensors read) before they reach the ring. ``times_s`` are the sample times in seconds since
boot; ``samples`` may be fewer than the times (the battery ran out on the way) and may be
changed in place; return as many as were given."""

CommandProceed = Callable[[Command], Ack | None]
"""Passes a command on to the rest of the chain (the next interceptor, then the firmware)."""

CommandInterceptor = Callable[[Command, CommandProceed], Ack | None]
"""``interceptor(command, proceed) -> ack``: one link of the chain around command execution.
Return ``proceed(command)`` to let it through, an :class:`~protocols.Ack` of your own to
answer without applying it, or ``None`` to send no acknowledgement (dropped, or held back
for :meth:`SimulatedDevice.deliver_command`)."""

CommandListener = Callable[[Command, Ack], None]
"""``listener(command, ack)``: told of every command the firmware executed, with its ack."""


class DeviceOptions(TypedDict, total=False):
    """Keyword options every device model accepts (see :class:`SimulatedDevice`)."""

    seed: int
    index: int
    sample_rate_hz: int | None
    batch_interval_s: float
    ring_duration_s: float
    mtu_size: int
    battery_percent: float | None


class SimulatedDevice(abc.ABC):
    """One device's firmware, running on a :class:`VirtualClock`.

    Lifecycle: :meth:`start` boots it (sequence numbers restart at 0, a BOOT
    event is emitted, sampling starts); :meth:`stop` ends its task. A transport
    attaches with :meth:`attach_link` and feeds host writes to :meth:`receive`.

    Seams, through which faults (:mod:`simulators.faults`) and scenarios change what the
    device does without replacing any of its methods; each may change while it runs:

    - :attr:`sample_filters`: functions applied in order to the samples the firmware
      takes, before they reach the ring (:data:`SampleFilter`);
    - :attr:`command_interceptors`: a chain around command execution, first in the list
      outermost: let a command through, answer it without applying it, drop it, or hold it
      back and :meth:`deliver_command` it later (:data:`CommandInterceptor`);
    - :attr:`command_listeners`: told of every command the firmware executed and its ack;
    - :meth:`add_link_wrapper`: every link the device attaches is wrapped in the
      wrappers' layers (:class:`~simulators.devices.link.LinkLayer`); :attr:`link` stays
      the transport's own link;
    - :meth:`set_firmware_clock`: the clock the firmware counts its time on;
    - power and battery events: :meth:`lose_power`, :meth:`power_off`, :meth:`start`,
      :meth:`drop_battery_charge`, :meth:`send_pending`.
    """

    kind: ClassVar[DeviceKind]
    sample_format: ClassVar[SampleFormat]
    model_number: ClassVar[str]
    serial_prefix: ClassVar[str]
    name_prefix: ClassVar[str]
    capabilities: ClassVar[Capability]
    default_sample_rate_hz: ClassVar[int]
    # Opcodes this kind implements beyond the common ones.
    kind_opcodes: ClassVar[frozenset[Opcode]]

    COMMON_OPCODES: ClassVar[frozenset[Opcode]] = frozenset(
        {
            Opcode.GET_INFO,
            Opcode.START_STREAM,
            Opcode.STOP_STREAM,
            Opcode.REQUEST_BACKFILL,
            Opcode.PING,
            Opcode.STOP_ALL,
        }
    )
    # Opcodes of devices with Capability.PROGRAM_TRANSFER.
    PROGRAM_OPCODES: ClassVar[frozenset[Opcode]] = frozenset(
        {
            Opcode.PROGRAM_BEGIN,
            Opcode.PROGRAM_COMMIT,
            Opcode.PROGRAM_START,
            Opcode.PROGRAM_ABORT,
        }
    )

    def __init__(
        self,
        clock: VirtualClock,
        *,
        seed: int = 0,
        index: int = 0,
        sample_rate_hz: int | None = None,
        batch_interval_s: float = DEFAULT_BATCH_INTERVAL_S,
        ring_duration_s: float = DEFAULT_RING_DURATION_S,
        mtu_size: int = DEFAULT_MTU_SIZE,
        battery_percent: float | None = None,
    ) -> None:
        if batch_interval_s <= 0:
            raise ValueError(f"batch interval must be positive, got {batch_interval_s}")
        self.clock = clock
        self.seed = seed
        self.index = index
        self.identity = derive_identity(seed, index, self.serial_prefix, self.name_prefix)
        self.sample_rate_hz = sample_rate_hz or self.default_sample_rate_hz
        self.batch_interval_s = batch_interval_s
        self.mtu_size = mtu_size
        self.sample_dtype: np.dtype[np.void] = SAMPLE_DTYPES[self.sample_format]
        self.ring = TelemetryRing(
            self.sample_dtype, max(1, math.ceil(ring_duration_s * self.sample_rate_hz))
        )
        self.sensor_rng = device_rng(seed, index, RandomStream.SENSOR)
        self.radio_rng = device_rng(seed, index, RandomStream.RADIO)
        if battery_percent is None:
            battery_rng = device_rng(seed, index, RandomStream.BATTERY)
            battery_percent = float(battery_rng.uniform(*INITIAL_BATTERY_RANGE_PERCENT))
        if not 0 < battery_percent <= 100:
            raise ValueError(f"battery must be in (0, 100] percent, got {battery_percent}")
        self._battery_charge_percent = float(battery_percent)
        self._battery_low_sent = self._battery_charge_percent <= BATTERY_LOW_PERCENT
        self._powered = False
        # The last boot's sample count, when the firmware kept it for the next BOOT.
        self._retained_sequence_end: int | None = None
        self._boot_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._firmware_clock: FirmwareClock = clock
        # The transport's link; the wrappers' layers around it, innermost first; and the
        # outermost of them (or the link itself), through which messages go.
        self._link: DeviceLink | None = None
        self._link_wrappers: list[LinkWrapper] = []
        self._link_layers: list[LinkLayer] = []
        self._outbound: DeviceLink | None = None
        self.sample_filters: list[SampleFilter] = []
        self.command_interceptors: list[CommandInterceptor] = []
        self.command_listeners: list[CommandListener] = []
        # Called when the device powers on or off or a link comes or goes (what decides
        # whether it advertises): the world's advertiser sleeps while nobody advertises.
        self.presence_listeners: list[Callable[[], None]] = []
        self._streaming = False
        self._stream_next_sequence = 0
        self._backfill_queue: collections.deque[tuple[int, npt.NDArray[np.void]]] = (
            collections.deque()
        )
        self._event_sequence = 0
        self._deferred: list[tuple[Channel, bytes]] | None = None
        self.events: collections.deque[Event] = collections.deque(maxlen=EVENT_LOG_LENGTH)
        self._event_backlog: collections.deque[Event] = collections.deque(
            maxlen=EVENT_BACKLOG_LENGTH
        )
        # The host on this link has sent a command, so it listens to notifications.
        self._host_listening = False
        self.program_receiver = ProgramReceiver(self.kind)
        # Why the last program ended (from its PROGRAM_FINISHED); None while one runs.
        self.program_end_reason: ProgramEndReason | int | None = None
        self.ignored_frames = 0
        self.commands_received = 0
        # What the running image reports; simulators.smp changes it after an update.
        self.firmware_revision: str = FIRMWARE_REVISION

    # ------------------------------------------------------------------ identity

    @property
    def address(self) -> str:
        return self.identity.address

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def serial_number(self) -> str:
        return self.identity.serial_number

    @property
    def kind_label(self) -> str:
        """What the command line and the control port call this kind (:data:`KIND_LABELS`)."""
        return KIND_LABELS.get(self.kind, self.kind.name.lower())

    @property
    def profile(self) -> DeviceProfile:
        return DeviceProfile(
            protocol_version=PROTOCOL_VERSION,
            device_kind=self.kind,
            capabilities=self.capabilities,
            sample_rate_hz=self.sample_rate_hz,
            ring_capacity_samples=self.ring.capacity,
            serial_number=self.serial_number,
            model_number=self.model_number,
            firmware_revision=self.firmware_revision,
            hardware_revision=HARDWARE_REVISION,
            manufacturer_name=MANUFACTURER_NAME,
        )

    @property
    def device_information(self) -> dict[str, str]:
        """Device Information Service strings, by field name."""
        return {
            "manufacturer_name": MANUFACTURER_NAME,
            "model_number": self.model_number,
            "serial_number": self.serial_number,
            "hardware_revision": HARDWARE_REVISION,
            "firmware_revision": self.firmware_revision,
        }

    def advertised_identity(self) -> AdvertisedIdentity:
        return AdvertisedIdentity(
            protocol_version=PROTOCOL_VERSION,
            device_kind=self.kind,
            battery_percent=self.battery_percent,
            busy=self.busy,
            pairing_mode=False,
            serial_number=self.serial_number,
        )

    # ------------------------------------------------------------------ state

    @property
    def next_sequence(self) -> int:
        return self.ring.next_sequence

    @property
    def battery_percent(self) -> int:
        """Battery as the device reports it (rounded up: 0 only when empty)."""
        return min(100, math.ceil(self._battery_charge_percent))

    @property
    def battery_charge_percent(self) -> float:
        """The exact model charge (for tests; the device reports :attr:`battery_percent`)."""
        return self._battery_charge_percent

    @property
    def is_connected(self) -> bool:
        return self._link is not None

    @property
    def link(self) -> DeviceLink | None:
        """The transport attached now (a BLE connection or a serial port)."""
        return self._link

    @property
    def is_powered(self) -> bool:
        return self._powered

    @property
    def is_streaming(self) -> bool:
        return self._streaming

    @property
    def uptime_s(self) -> float:
        return self._firmware_clock.now_s() - self._boot_s

    @property
    def boot_s(self) -> float:
        """When the device last booted, on its firmware clock."""
        return self._boot_s

    @property
    def firmware_clock(self) -> FirmwareClock:
        """The clock the firmware counts its time on (:attr:`clock` unless set otherwise)."""
        return self._firmware_clock

    def set_firmware_clock(self, clock: FirmwareClock | None) -> None:
        """Count the firmware's time on ``clock`` from now on (``None``: the world's clock).

        Samples already due are not taken again: call :meth:`catch_up` first to take them
        on the clock they were due on.
        """
        self._firmware_clock = self.clock if clock is None else clock

    def random_stream(self, *key: int) -> np.random.Generator:
        """A generator of this device's own for ``key`` (a fault, a helper), seeded by the
        world's seed and the device's index, so that a seed replays it and it never shifts
        the device's own streams (keep ``key`` away from :class:`RandomStream`'s values)."""
        return device_rng(self.seed, self.index, *key)

    @property
    @abc.abstractmethod
    def busy(self) -> bool:
        """An actuator or treatment is running (advertised as the busy flag)."""

    @property
    def program_running(self) -> bool:
        """A committed program is running on the device's own clock."""
        return False

    def press_program_button(self) -> bool:
        """A long press of the mode button: the user starts the program installed on the
        device, with or without a host (docs/protocol.md 7.4). True when it started."""
        program = self.program_receiver.committed
        if not self.is_powered or self.program_running or program is None:
            return False
        self.catch_up()
        self._emit(EventCode.BUTTON, bytes([Button.MODE, Press.LONG]))
        return self._start_program(program) is ResultCode.OK

    # ------------------------------------------------------------------ lifecycle

    def start(self, reset_reason: ResetReason = ResetReason.POWER_ON) -> None:
        """Boot: sequence numbers from 0, BOOT event, sampling on the clock.

        The BOOT event gives ``reset_reason`` and the previous boot's sample count when it
        was kept (:meth:`power_off`, :meth:`lose_power`); it waits for a host to listen.
        """
        if self._task is not None and not self._task.done():
            return
        self._powered = True
        self._boot_s = self._firmware_clock.now_s()
        self.ring = TelemetryRing(self.sample_dtype, self.ring.capacity)
        self._stream_next_sequence = 0
        previous_end, self._retained_sequence_end = self._retained_sequence_end, None
        self._emit(EventCode.BOOT, BootEvent(reset_reason, previous_end).encode(), hold=True)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"simulated {self.kind.name.lower()} {self.serial_number}"
        )
        self._presence_changed()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # The cancellation we asked for; a crash is reported by task_exception().
        await asyncio.gather(task, return_exceptions=True)

    def task_exception(self) -> BaseException | None:
        """The exception that ended the sampling task, if it crashed."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def power_off(self, reason: ShutdownReason) -> None:
        """Emit SHUTDOWN, stop sampling and drop the link (the radio goes off).

        An orderly power-off: the sample count goes into the SHUTDOWN event and is saved
        for the next BOOT.
        """
        if not self.is_powered:
            return
        self._on_power_off(reason)
        sequence_end = self.ring.next_sequence
        self._emit(EventCode.SHUTDOWN, ShutdownEvent(reason, _u32(sequence_end)).encode())
        self._retained_sequence_end = _u32(sequence_end)
        self._powered = False
        link = self._link
        self.detach_link()
        if link is not None:
            link.device_closed()
        self._presence_changed()

    def lose_power(self, *, keeps_count: bool) -> None:
        """Stop at once, with no SHUTDOWN and no goodbye (a reset, a power dip).

        ``keeps_count``: the sample count survives in retained RAM for the next BOOT (a
        warm reset: watchdog, software); a brown-out clears it. Restart with :meth:`stop`
        and :meth:`start`.
        """
        if not self.is_powered:
            return
        self._retained_sequence_end = _u32(self.ring.next_sequence) if keeps_count else None
        self._powered = False
        link = self._link
        self.detach_link()
        if link is not None:
            link.device_closed()

    async def _run(self) -> None:
        await self.sample_from_tick(1)

    async def sample_from_tick(self, tick: int) -> None:
        """The sampling loop, from tick ``tick`` after boot on, until the device is off."""
        while self.is_powered:
            # Multiply rather than accumulate, so float error never drifts the rate.
            await self._firmware_clock.sleep_until(self._boot_s + tick * self.batch_interval_s)
            self.send_pending()
            tick += 1

    def _flush(self) -> None:
        self._flush_stream()
        self._flush_backfill()

    def send_pending(self) -> None:
        """Now, what a tick of the sampling loop does: take the samples due, send the stream
        and one interval's share of backfill (what a firmware flushes before it restarts)."""
        if self.catch_up():
            self._flush()

    # ------------------------------------------------------------------ links

    def attach_link(self, link: DeviceLink) -> None:
        if self._link is not None:
            raise RuntimeError(f"{self.serial_number} is already connected")
        if not self.is_powered:
            raise RuntimeError(f"{self.serial_number} is powered off")
        self._link = link
        self._wrap_link(0)
        self._reset_session()
        self._presence_changed()

    def detach_link(self) -> None:
        """The link is gone: firmware forgets streaming and pending backfill."""
        self._unwrap_link(0)
        self._link = None
        self._outbound = None
        self._reset_session()
        self._presence_changed()

    @property
    def link_wrappers(self) -> tuple[LinkWrapper, ...]:
        """The link wrappers, innermost first."""
        return tuple(self._link_wrappers)

    def add_link_wrapper(self, wrapper: LinkWrapper) -> None:
        """Wrap every link the device attaches, the one attached now included, in
        ``wrapper(link)``, outside the wrappers added before."""
        self._link_wrappers.append(wrapper)
        if self._link is not None:
            self._wrap_link(len(self._link_layers))

    def remove_link_wrapper(self, wrapper: LinkWrapper) -> None:
        """Stop wrapping links in ``wrapper``. On the link attached now, its layer and the
        layers outside it are detached (what they held back is lost) and those outside it
        are made again around what remains."""
        index = self._link_wrappers.index(wrapper)
        del self._link_wrappers[index]
        if self._link is not None:
            self._unwrap_link(index)
            self._wrap_link(index)

    def _wrap_link(self, start: int) -> None:
        """Layers of the wrappers from ``start`` on around the attached link's layers."""
        outbound = self._link_layers[start - 1] if start else self._link
        assert outbound is not None
        for wrapper in self._link_wrappers[start:]:
            layer = wrapper(outbound)
            self._link_layers.append(layer)
            outbound = layer
        self._outbound = outbound

    def _unwrap_link(self, keep: int) -> None:
        """Detach the layers beyond the innermost ``keep``, the outermost first."""
        layers = self._link_layers
        while len(layers) > keep:
            layers.pop().detached()
        self._outbound = layers[-1] if layers else self._link

    def _presence_changed(self) -> None:
        for listener in self.presence_listeners:
            listener()

    def _reset_session(self) -> None:
        self._streaming = False
        self._backfill_queue.clear()
        self._host_listening = False

    def receive(self, channel: Channel, data: bytes) -> None:
        """A write from the host on ``channel``."""
        if not self.is_powered:
            return
        # Over serial every message shares one line: a chunk is told apart by its type.
        if channel is Channel.PROGRAM or (data[:1] == bytes([MessageType.PROGRAM_CHUNK])):
            self._receive_chunk(bytes(data))
            return
        if channel is not Channel.CONTROL:
            self.ignored_frames += 1
            return
        try:
            command = Command.decode(bytes(data))
        except ProtocolError:
            self.ignored_frames += 1
            return
        self.commands_received += 1
        self._handle_command(command, 0)

    def deliver_command(self, command: Command, *, after: CommandInterceptor) -> None:
        """A command that the interceptor ``after`` held back goes on now, as if it had just
        arrived: through the interceptors after ``after`` (all of them if ``after`` was
        removed meanwhile) to the firmware, and its ack is sent. Nothing happens when the
        device is off."""
        try:
            position = self.command_interceptors.index(after) + 1
        except ValueError:
            position = 0
        self._handle_command(command, position)

    def _handle_command(self, command: Command, position: int) -> None:
        """``command`` through the interceptors from ``position`` on and the firmware;
        the ack is sent, then what the command caused."""
        # Samples up to now were taken under the old state: take them first.
        if not self.catch_up():
            return
        outer, self._deferred = self._deferred, []
        try:
            ack = self._intercepted(command, position)
        finally:
            deferred, self._deferred = self._deferred, outer
        if ack is not None:
            self._send(Channel.CONTROL, ack.encode())
        # A host that writes a command listens, whether or not the command got through.
        if not self._host_listening and self._link is not None:
            self._host_listening = True
            backlog = list(self._event_backlog)
            self._event_backlog.clear()
            for event in backlog:
                self._send(Channel.EVENTS, event.encode())
        for channel_out, message in deferred:
            self._send(channel_out, message)

    def _receive_chunk(self, data: bytes) -> None:
        if Capability.PROGRAM_TRANSFER not in self.capabilities:
            self.ignored_frames += 1
            return
        try:
            chunk = ProgramChunk.decode(data)
        except ProtocolError:
            self.ignored_frames += 1
            return
        if not self.program_receiver.chunk(chunk):
            self.ignored_frames += 1

    def _send(self, channel: Channel, message: bytes) -> None:
        if self._deferred is not None:
            # Inside a command: the ack goes first, then what the command caused.
            self._deferred.append((channel, message))
            return
        link = self._outbound
        if link is not None:
            link.send(channel, message)

    def _max_payload_bytes(self) -> int:
        link = self._outbound
        if link is None:
            return self.mtu_size - ATT_HEADER_BYTES
        return link.max_payload_bytes

    # ------------------------------------------------------------------ commands

    @property
    def supported_opcodes(self) -> frozenset[Opcode]:
        opcodes = self.COMMON_OPCODES | self.kind_opcodes
        if Capability.PROGRAM_TRANSFER in self.capabilities:
            opcodes |= self.PROGRAM_OPCODES
        return opcodes

    def _intercepted(self, command: Command, position: int) -> Ack | None:
        """``command`` through the interceptors from ``position`` on, then the firmware."""
        interceptors = self.command_interceptors
        if position >= len(interceptors):
            return self.execute(command)
        return interceptors[position](
            command, lambda passed: self._intercepted(passed, position + 1)
        )

    def execute(self, command: Command) -> Ack:
        """Run one command in the firmware and return its acknowledgement.

        No interceptor sees it (:meth:`receive` passes commands through them); the
        :attr:`command_listeners` are told.
        """
        ack = self._execute(command)
        for listener in self.command_listeners:
            listener(command, ack)
        return ack

    def _execute(self, command: Command) -> Ack:
        opcode = command.opcode
        if not isinstance(opcode, Opcode):
            return Ack(command.command_id, opcode, ResultCode.UNKNOWN_OPCODE)
        if opcode not in self.supported_opcodes:
            return Ack(command.command_id, opcode, ResultCode.NOT_SUPPORTED)
        try:
            body = command.body()
        except ProtocolError:
            return Ack(command.command_id, opcode, ResultCode.INVALID_PARAMETER)
        result, payload = self._execute_body(body)
        return Ack(command.command_id, opcode, result, payload)

    def _execute_body(self, body: CommandBody) -> tuple[ResultCode, bytes]:
        match body:
            case GetInfo():
                return ResultCode.OK, self.profile.encode()
            case Ping():
                return ResultCode.OK, b""
            case StartStream():
                if not self._streaming:
                    self._streaming = True
                    self._stream_next_sequence = self.ring.next_sequence
                return ResultCode.OK, b""
            case StopStream():
                self._streaming = False
                return ResultCode.OK, b""
            case RequestBackfill(first_sequence=first, sample_count=count):
                return self._start_backfill(first, count)
            case StopAll():
                self._stop_all()
                return ResultCode.OK, b""
            case ProgramBegin():
                if self.program_running:
                    return ResultCode.BUSY, b""
                return self.program_receiver.begin(body)
            case ProgramCommit():
                if self.program_running:
                    return ResultCode.BUSY, b""
                return self.program_receiver.commit(body, self._check_program)
            case ProgramStart():
                if self.program_running:
                    return ResultCode.BUSY, b""
                program = self.program_receiver.committed
                if program is None:
                    return ResultCode.INVALID_PARAMETER, b""  # nothing committed to run
                result = self._start_program(program)
                if result is ResultCode.OK:
                    self.program_end_reason = None
                return result, b""
            case ProgramAbort():
                self.program_receiver.discard_transfer()
                self._stop_program(ProgramEndReason.STOPPED_BY_HOST)
                return ResultCode.OK, b""
            case _:
                return self._execute_kind(body)

    def _check_program(self, program: Program) -> ProgramRejection | None:
        """Hook: refuse a decoded program beyond this device's hardware (kind checked)."""
        del program
        return None

    def _start_program(self, program: Program) -> ResultCode:
        """Hook: start running ``program`` now (only devices with PROGRAM_TRANSFER)."""
        del program
        return ResultCode.NOT_SUPPORTED

    def _stop_program(self, reason: ProgramEndReason) -> None:  # noqa: B027 - optional hook
        """Hook: end a running program now (``PROGRAM_FINISHED`` with ``reason``)."""

    @abc.abstractmethod
    def _execute_kind(self, body: CommandBody) -> tuple[ResultCode, bytes]:
        """Commands of this device kind (only opcodes in ``kind_opcodes`` arrive here)."""

    @abc.abstractmethod
    def _stop_all(self) -> None:
        """Every actuator off at once."""

    def _on_power_off(self, reason: ShutdownReason) -> None:  # noqa: B027 - optional hook
        """Hook: the device is about to power off (actuators stop here)."""

    # ------------------------------------------------------------------ backfill and streaming

    def _start_backfill(self, first_sequence: int, sample_count: int) -> tuple[ResultCode, bytes]:
        if sample_count == 0:
            return ResultCode.INVALID_PARAMETER, b""
        first_available, samples = self.ring.range(first_sequence, sample_count)
        if samples.shape[0] == 0:
            reply = BackfillReply(self.ring.oldest_sequence, 0)
            return ResultCode.DATA_UNAVAILABLE, reply.encode()
        # A snapshot: what the ack promises is what gets sent, even if the ring
        # moves on while the backfill is paced out.
        self._backfill_queue.append((first_available, samples))
        return ResultCode.OK, BackfillReply(first_available, int(samples.shape[0])).encode()

    def _samples_per_batch(self) -> int:
        return max(1, max_samples_per_batch(self.sample_format, self._max_payload_bytes()))

    def _batch(self, first_sequence: int, samples: npt.NDArray[np.void], backfill: bool) -> bytes:
        return TelemetryBatch(
            self.sample_format,
            first_sequence,
            self.device_time_ms_of_sequence(first_sequence),
            samples,
            backfill,
        ).encode()

    def _flush_stream(self) -> None:
        if not self._streaming or self._link is None:
            return
        ring = self.ring
        # Never older than the ring holds (a stream that fell behind skips ahead).
        start = max(self._stream_next_sequence, ring.oldest_sequence)
        count = ring.next_sequence - start
        if count <= 0:
            return
        # The samples go out as the ring holds them: raw bytes, cut into batches.
        first, data = ring.range_bytes(start, count)
        sample_bytes = ring.sample_bytes
        per_batch = self._samples_per_batch()
        batch_bytes = per_batch * sample_bytes
        for offset in range(0, len(data), batch_bytes):
            first_sequence = first + offset // sample_bytes
            message = encode_batch(
                self.sample_format,
                first_sequence,
                self.device_time_ms_of_sequence(first_sequence),
                data[offset : offset + batch_bytes],
            )
            self._send(Channel.TELEMETRY, message)
        self._stream_next_sequence = first + len(data) // sample_bytes

    def _flush_backfill(self) -> None:
        if self._link is None:
            self._backfill_queue.clear()
            return
        if not self._backfill_queue:
            return
        budget_bytes = BACKFILL_BYTES_PER_S * self.batch_interval_s
        per_batch = self._samples_per_batch()
        while self._backfill_queue and budget_bytes > 0:
            first, samples = self._backfill_queue[0]
            chunk = samples[:per_batch]
            message = self._batch(first, chunk, backfill=True)
            self._send(Channel.TELEMETRY, message)
            budget_bytes -= len(message)
            remaining = samples[per_batch:]
            if remaining.shape[0]:
                self._backfill_queue[0] = (first + per_batch, remaining)
            else:
                self._backfill_queue.popleft()

    @property
    def backfill_pending_samples(self) -> int:
        return sum(int(samples.shape[0]) for _, samples in self._backfill_queue)

    # ------------------------------------------------------------------ sampling

    def device_time_ms_of_sequence(self, sequence: int) -> int:
        return round(sequence * MS_PER_S / self.sample_rate_hz) % DEVICE_TIME_MODULUS

    def device_time_ms(self, t_s: float | None = None) -> int:
        """Milliseconds since boot (of ``t_s`` seconds since boot, or of now)."""
        elapsed_s = self.uptime_s if t_s is None else t_s
        return round(elapsed_s * MS_PER_S) % DEVICE_TIME_MODULUS

    def catch_up(self) -> bool:
        """Take every sample due by now (sample ``s`` is taken at ``s / rate`` after boot).

        Returns whether the device is still powered afterwards.
        """
        if not self.is_powered:
            return False
        span = self.due_span()
        if span is None:
            return True
        times_s = span.times_s()
        return self.take_samples(times_s, self._generate(times_s))

    def due_span(self) -> SampleSpan | None:
        """The samples due by now and not taken yet (``None``: none)."""
        rate_hz = self.sample_rate_hz
        due = math.ceil(self.uptime_s * rate_hz - SAMPLE_TIME_EPSILON)
        start = self.ring.next_sequence
        return SampleSpan(start, due, rate_hz) if due > start else None

    def take_samples(self, times_s: npt.NDArray[np.float64], samples: npt.NDArray[np.void]) -> bool:
        """What the firmware does with the samples it generated at ``times_s`` (fewer when
        the battery ran out): through the sample filters into the ring. Returns whether
        the device is still powered."""
        for sample_filter in self.sample_filters:
            samples = sample_filter(times_s, samples)
        self.ring.extend(samples)
        if samples.shape[0] < times_s.shape[0]:
            self.power_off(ShutdownReason.BATTERY_EMPTY)
            return False
        return True

    @property
    def tick_cohort(self) -> tuple[int, float, float]:
        """Devices with the same cohort tick at the same moments: the same firmware clock,
        booted at the same time, the same batch interval (see :meth:`_run`)."""
        return (id(self._firmware_clock), self._boot_s, self.batch_interval_s)

    @property
    def is_sampling(self) -> bool:
        """Powered, with its sampling loop running."""
        return self._powered and self._task is not None and not self._task.done()

    @abc.abstractmethod
    def _generate(self, times_s: npt.NDArray[np.float64]) -> npt.NDArray[np.void]:
        """Samples at ``times_s`` (seconds since boot), updating firmware state.

        Returns fewer samples than asked when the battery ran out on the way.
        """

    # ------------------------------------------------------------------ events and battery

    def _emit(
        self, code: EventCode, payload: bytes = b"", t_s: float | None = None, *, hold: bool = False
    ) -> None:
        """Send an event; one a host must not miss (``hold``, or while a program runs) waits
        in the backlog while no host listens."""
        event = Event(self._event_sequence, self.device_time_ms(t_s), code, payload)
        self._event_sequence = (self._event_sequence + 1) % EVENT_SEQUENCE_MODULUS
        self.events.append(event)
        if code is EventCode.PROGRAM_FINISHED:
            self.program_end_reason = ProgramFinishedEvent.decode(payload).reason
        if (hold or self.program_running) and (self._link is None or not self._host_listening):
            self._event_backlog.append(event)
            return
        self._send(Channel.EVENTS, event.encode())

    @property
    def event_backlog(self) -> list[Event]:
        """Program events waiting for a host to listen (oldest first)."""
        return list(self._event_backlog)

    def drop_battery_charge(self, percent: float, *, report_now: bool = True) -> None:
        """The cell's charge falls to ``percent`` at once (a failing or sagging cell; a
        charge below it stays). ``report_now``: the battery monitor reads it on the spot
        (the level notification, BATTERY_LOW); otherwise the next sample finds it (at 0 the
        firmware then shuts down)."""
        self._battery_charge_percent = min(self._battery_charge_percent, percent)
        if report_now:
            # No charge used: only the BATTERY_LOW check and the level notification run.
            self._drain_battery(0.0, self.uptime_s)

    def _drain_battery(self, drain_percent: float, t_s: float) -> bool:
        """Use ``drain_percent`` of charge at ``t_s``; ``False`` when the battery is empty."""
        reported_before = self.battery_percent
        self._battery_charge_percent = max(0.0, self._battery_charge_percent - drain_percent)
        reported = self.battery_percent
        if reported != reported_before:
            self._send(Channel.BATTERY, bytes([reported]))
        if not self._battery_low_sent and self._battery_charge_percent <= BATTERY_LOW_PERCENT:
            self._battery_low_sent = True
            self._emit(EventCode.BATTERY_LOW, bytes([reported]), t_s)
        return self._battery_charge_percent > 0

    def _battery_quiet_floor_percent(self) -> float:
        """The charge above which :meth:`_drain_battery` reports nothing: no new percent, no
        BATTERY_LOW, not empty.

        The charge only goes down, so the reported percent changes when the charge reaches
        that percent minus one.
        """
        floor_percent = float(max(self.battery_percent - 1, 0))
        if not self._battery_low_sent:
            floor_percent = max(floor_percent, BATTERY_LOW_PERCENT)
        return floor_percent

    def _drain_battery_quietly(
        self, drain_percent: float, count: int, floor_percent: float | None = None
    ) -> int:
        """Drain up to ``count`` samples' worth at once while :meth:`_drain_battery` would
        report nothing (see :meth:`_battery_quiet_floor_percent`); how many samples it took.

        The charge goes down by one subtraction per sample, in order, as it does sample by
        sample, so the charge (and when the next report comes) is the same to the bit.
        ``floor_percent``: what :meth:`_battery_quiet_floor_percent` gives now, when the
        caller keeps it at hand.
        """
        if count <= 0:
            return 0
        if floor_percent is None:
            floor_percent = self._battery_quiet_floor_percent()
        if count < QUIET_DRAIN_ARRAY_MIN_SAMPLES:
            # A few samples (a live tick): plain floats cost less than the numpy calls.
            charge_percent = self._battery_charge_percent
            taken = 0
            while taken < count:
                next_percent = charge_percent - drain_percent
                if not next_percent > floor_percent:
                    break
                charge_percent = next_percent
                taken += 1
            self._battery_charge_percent = charge_percent
            return taken
        charges = quiet_charges(
            np.array([self._battery_charge_percent]), np.array([drain_percent]), count
        )[0]
        if drain_percent >= 0.0 and charges[count] > floor_percent:
            # The charge never goes up: when the last sample is quiet, all of them are.
            taken = count
        else:
            quiet = charges[1:] > floor_percent
            taken = count if bool(quiet.all()) else int(np.argmin(quiet))
        if taken:
            self._battery_charge_percent = float(charges[taken])
        return taken

    @staticmethod
    def encode_centi_celsius(temperature_c: float) -> bytes:
        return _SIGNED_CENTI.pack(round(temperature_c * 100))


def _u32(sequence: int) -> int:
    """A sample count as the firmware's u32 counter holds it."""
    return sequence % SEQUENCE_MODULUS
