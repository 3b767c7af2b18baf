"""Fault injection on its own: parameters, schedules and what each fault does to messages."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import FrameDecoder, ProtocolError, decode_message
from simulators import Channel, SimulatedMassager, VirtualClock
from simulators.errors import FaultError
from simulators.faults.injector import DriftingClock, FaultInjector
from simulators.faults.link import FaultyLink, corrupt_frame
from simulators.faults.spec import FaultKind, make_fault
from tests.simulators.conftest import RecordingLink


class FramedRecordingLink(RecordingLink):
    """A link with serial framing (like the pty and TCP ports): faults hit the frame bytes."""

    def __init__(self) -> None:
        super().__init__(max_payload_bytes=1024)
        self.frames: list[bytes] = []

    def send_frame(self, channel: Channel, frame: bytes) -> None:
        self.frames.append(frame)


def linked(*faults: object, seed: int = 3) -> tuple[FaultInjector, RecordingLink, FaultyLink]:
    device = SimulatedMassager(VirtualClock(), seed=seed)
    injector = FaultInjector(device, seed=seed, faults=faults)  # type: ignore[arg-type]
    link = RecordingLink()
    return injector, link, FaultyLink(link, injector)


def telemetry(i: int) -> bytes:
    return bytes([0x10, 0x01]) + i.to_bytes(4, "little") + bytes(4) + bytes(9)


def test_unknown_kind_and_parameter_are_reported_with_their_place() -> None:
    with pytest.raises(FaultError, match=r"\[\[faults\]\] #2: unknown fault kind 'dorp'"):
        make_fault("dorp", where="[[faults]] #2")
    with pytest.raises(FaultError, match=r"fault 'drop' has no parameter 'rat'.*rate, burst"):
        make_fault("drop", rat=0.1)
    with pytest.raises(FaultError, match="rate must be between 0 and 1"):
        make_fault("corrupt", rate=2)
    with pytest.raises(FaultError, match="every_s/count only apply to events"):
        make_fault("drop", every_s=1.0)
    with pytest.raises(FaultError, match="unknown opcode 'SET_SPEED'"):
        make_fault("ignore_commands", opcodes=["SET_SPEED"])


def test_every_kind_belongs_to_one_of_the_four_classes() -> None:
    classes = {make_fault(kind.value).fault_class.value for kind in FaultKind}
    assert classes == {"link", "frame", "device", "sensor"}


def test_drop_in_bursts_is_seeded_and_counts_what_it_dropped() -> None:
    runs = []
    for _ in range(2):
        injector, link, faulty = linked(make_fault("drop", rate=0.2, burst=3))
        for i in range(200):
            faulty.send(Channel.TELEMETRY, telemetry(i))
        runs.append([int.from_bytes(m[2:6], "little") for _, m in link.messages])
        assert injector.counts["drop"] == 200 - len(link.messages)
    assert runs[0] == runs[1]
    missing = sorted(set(range(200)) - set(runs[0]))
    assert missing
    # Bursts: every run of dropped notifications is whole bursts of three in a row.
    groups: list[list[int]] = [[missing[0]]]
    for sequence in missing[1:]:
        if sequence == groups[-1][-1] + 1:
            groups[-1].append(sequence)
        else:
            groups.append([sequence])
    assert all(len(group) % 3 == 0 for group in groups if group[-1] != 199)  # last may be cut


def test_message_faults_only_touch_their_channels() -> None:
    _, link, faulty = linked(make_fault("drop", rate=1.0))
    faulty.send(Channel.CONTROL, b"\x02\x01\x00\x05\x00")
    faulty.send(Channel.TELEMETRY, telemetry(0))
    assert [c for c, _ in link.messages] == [Channel.CONTROL]


def test_corruption_on_ble_is_always_detectable_by_the_receiver() -> None:
    _, link, faulty = linked(make_fault("corrupt", rate=1.0, bits=4))
    for i in range(20):
        faulty.send(Channel.TELEMETRY, telemetry(i))
    for _, message in link.messages:
        with pytest.raises(ProtocolError):
            decode_message(message)


def test_corruption_on_a_framed_link_is_caught_by_the_crc() -> None:
    device = SimulatedMassager(VirtualClock(), seed=1)
    injector = FaultInjector(device, seed=1, faults=[make_fault("corrupt", rate=1.0)])
    link = FramedRecordingLink()
    faulty = FaultyLink(link, injector)
    for i in range(10):
        faulty.send(Channel.TELEMETRY, telemetry(i))
    messages, errors = FrameDecoder().feed(b"".join(link.frames))
    assert not messages
    assert errors
    frame = b"\x06\x05\x02\x1b\x68\xa2\x00"
    assert corrupt_frame(frame, np.random.default_rng(0), 1)[-1] == 0


def test_truncate_duplicate_and_reorder() -> None:
    _, link, faulty = linked(make_fault("truncate", rate=1.0))
    faulty.send(Channel.TELEMETRY, telemetry(1))
    assert len(link.messages[0][1]) < len(telemetry(1))

    _, link, faulty = linked(make_fault("duplicate", rate=1.0))
    faulty.send(Channel.TELEMETRY, telemetry(1))
    assert [m for _, m in link.messages] == [telemetry(1), telemetry(1)]

    _, link, faulty = linked(make_fault("reorder", rate=1.0))
    for i in range(4):
        faulty.send(Channel.TELEMETRY, telemetry(i))
    order = [int.from_bytes(m[2:6], "little") for _, m in link.messages]
    assert order == [1, 0, 3, 2]


async def test_latency_delays_in_order_on_the_virtual_clock() -> None:
    clock = VirtualClock()
    device = SimulatedMassager(clock, seed=1)
    injector = FaultInjector(device, seed=1, faults=[make_fault("latency", delay_s=0.5)])
    link = RecordingLink()
    faulty = FaultyLink(link, injector)
    faulty.send(Channel.TELEMETRY, telemetry(0))
    faulty.send(Channel.TELEMETRY, telemetry(1))
    await clock.advance(0.4)
    assert link.messages == []
    await clock.advance(0.2)
    assert [int.from_bytes(m[2:6], "little") for _, m in link.messages] == [0, 1]


async def test_faults_follow_their_window() -> None:
    clock = VirtualClock()
    device = SimulatedMassager(clock, seed=1)
    injector = FaultInjector(
        device, seed=1, faults=[make_fault("drop", rate=1.0, at_s=1, duration_s=1)]
    )
    link = RecordingLink()
    faulty = FaultyLink(link, injector)
    faulty.send(Channel.TELEMETRY, telemetry(0))
    await clock.advance(1.5)
    faulty.send(Channel.TELEMETRY, telemetry(1))
    await clock.advance(1.0)
    faulty.send(Channel.TELEMETRY, telemetry(2))
    assert [int.from_bytes(m[2:6], "little") for _, m in link.messages] == [0, 2]


async def test_drifting_clock_runs_fast_and_sleeps_accordingly() -> None:
    base = VirtualClock()
    drifting = DriftingClock(base, 50_000, anchor_s=0.0)
    await base.advance(10.0)
    assert drifting.now_s() == pytest.approx(10.5)
    assert drifting.base_time_s(21.0) == pytest.approx(20.0)


async def test_sensor_faults_change_the_reported_pressure() -> None:
    from protocols import Zone
    from simulators.devices.hand import HandScript

    clock = VirtualClock()
    device = SimulatedMassager(clock, seed=2, hand=HandScript.constant(Zone.CHEEK_LEFT, 8.0))
    injector = FaultInjector(
        device,
        seed=2,
        faults=[
            make_fault("saturation", max=5.0, at_s=0, duration_s=1),
            make_fault("stuck_sensor", at_s=1),
        ],
    ).install()
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    await clock.advance(2.0)
    pressure = device.ring.range(0, 200)[1]["pressure_dapa"]
    assert pressure[:100].max() == 500  # clipped at 5 kPa
    assert len(set(pressure[101:].tolist())) == 1  # frozen
    assert injector.counts["saturation"] == 1
    await device.stop()
