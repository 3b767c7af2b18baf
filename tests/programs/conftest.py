"""Fixtures of the device-program tests: simulated devices on a fast virtual clock.

The host side runs for real: the bleak API over the simulator backend, or pyserial on a
real pty served by the simulator.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pytest

from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.routine import Routine, parse_routine
from devicebridge.device.session import DeviceSession, Subscription, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport, find_device
from devicebridge.device.transport.serial import SerialTransport
from protocols import (
    Ack,
    Command,
    CommandBody,
    Event,
    EventCode,
    MassageProgramStep,
    Program,
    ProgramFinishedEvent,
    ProgramStepEvent,
    decode_message,
)
from simulators import (
    Channel,
    HandScript,
    HandSegment,
    SimulatedDevice,
    SimulatedWorld,
    VirtualClock,
)
from simulators.links.serial_port import PtySerialPort

SEED = 424242


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def world(clock: VirtualClock) -> AsyncIterator[SimulatedWorld]:
    """An empty world; tests add devices, then enter it."""
    yield SimulatedWorld(seed=SEED, clock=clock)
    if clock.is_running:
        await clock.stop()


@pytest.fixture
def policy() -> SafetyPolicy:
    return default_policy()


def library_routine(name: str, policy: SafetyPolicy) -> Routine:
    text = (resources.files("devicebridge") / "data" / "routines" / f"{name}.toml").read_text()
    return parse_routine(text, policy, label=f"{name}.toml")


async def ble_session(world: SimulatedWorld, device: SimulatedDevice) -> DeviceSession:
    """A session to ``device`` over the real bleak API (not started)."""
    backends = BleBackends(world.scanner_backend, world.client_backend)
    found = await find_device(
        world.clock, lambda d: d.serial_number == device.serial_number, 5.0, backends.scanner
    )
    transport = BleTransport(world.clock, device=found, backends=backends)
    return session_class_for(found.kind)(
        transport, world.clock, rng=random.Random(SEED), name=found.name
    )


# A pty round trip takes real time while the fast clock jumps from deadline to deadline;
# a long virtual timeout keeps a loaded machine from turning that into a timeout.
SERIAL_COMMAND_TIMEOUT_S = 30.0


def serial_session(port: PtySerialPort, clock: VirtualClock) -> DeviceSession:
    return session_class_for(port.device.kind)(
        SerialTransport(port.path, clock, info_timeout_s=SERIAL_COMMAND_TIMEOUT_S),
        clock,
        rng=random.Random(SEED),
        name="serial",
        command_timeout_s=SERIAL_COMMAND_TIMEOUT_S,
    )


def follow_program(
    program: Program,
    *,
    start_s: float,
    extra_s: float = 0.5,
    lift_s: float = 1.0,
    pressure_kpa: Sequence[float] | None = None,
) -> HandScript:
    """A hand that does each massage step on its zone, mid-band, a little longer than asked."""
    segments: list[HandSegment] = []
    t_s = start_s
    for index, step in enumerate(program.steps):
        assert isinstance(step, MassageProgramStep)
        mid_kpa = (step.pressure_min_dapa + step.pressure_max_dapa) / 200
        press_kpa = pressure_kpa[index] if pressure_kpa is not None else mid_kpa
        duration_s = step.contact_time_s + extra_s
        segments.append(HandSegment(t_s, duration_s, step.zone, press_kpa))
        t_s += duration_s + lift_s
    return HandScript(segments)


def step_done_times_s(
    hand: HandScript, program: Program, *, from_s: float, rate_hz: int, until_s: float
) -> list[float]:
    """When each step's effective contact time is done: the device counts touching samples."""
    first = int(np.ceil(from_s * rate_hz))
    times = np.arange(first, int(until_s * rate_hz)) / rate_hz
    counted = np.cumsum(hand.evaluate(times).touching)
    needed = np.cumsum(
        [
            round(s.contact_time_s * rate_hz)
            for s in program.steps
            if isinstance(s, MassageProgramStep)
        ]
    )
    return [float(times[int(np.searchsorted(counted, n))]) for n in needed]


@dataclass
class EventLog:
    """Every event a session delivered, kept by a background reader."""

    events: list[Event]

    def of(self, code: EventCode) -> list[Event]:
        return [e for e in self.events if e.code == code]

    def steps(self) -> list[tuple[int, int, int]]:
        """(device time ms, step index, reason) of every PROGRAM_STEP."""
        out = []
        for event in self.of(EventCode.PROGRAM_STEP):
            payload = ProgramStepEvent.decode(event.payload)
            out.append((event.device_time_ms, payload.step_index, int(payload.reason)))
        return out

    def finished(self) -> list[tuple[int, int]]:
        return [
            (e.device_time_ms, int(ProgramFinishedEvent.decode(e.payload).reason))
            for e in self.of(EventCode.PROGRAM_FINISHED)
        ]


async def collect_events(subscription: Subscription[Event], log: EventLog) -> None:
    async for event in subscription:
        log.events.append(event)


class RecordingLink:
    """A DeviceLink that keeps what the device sends (device-level tests, no host)."""

    def __init__(self, max_payload_bytes: int = 244) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.messages: list[tuple[Channel, bytes]] = []

    def send(self, channel: Channel, message: bytes) -> None:
        self.messages.append((channel, message))

    def device_closed(self) -> None:
        """Nothing to do: the test looks at what was sent."""

    def events(self) -> list[Event]:
        return [
            m
            for c, m in ((c, decode_message(b)) for c, b in self.messages if c is Channel.EVENTS)
            if isinstance(m, Event)
        ]


def command(device: SimulatedDevice, link: RecordingLink, body: CommandBody, cid: int = 1) -> Ack:
    """Send one command straight to a device model and return its ack."""
    before = len(link.messages)
    device.receive(Channel.CONTROL, Command.of(cid, body).encode())
    acks = [decode_message(m) for c, m in link.messages[before:] if c is Channel.CONTROL]
    assert len(acks) == 1
    ack = acks[0]
    assert isinstance(ack, Ack)
    return ack
