"""The simulator's shortcuts give what the plain ways give, to the bit.

Each cheaper way of working out samples, batches or draws (see simulators.devices.massager,
simulators.devices.device, simulators.devices.ring, simulators.scenario) is checked here,
through what the device sends and keeps, against the rule it stands for worked out sample
by sample, and a whole run against digests recorded before the shortcuts existed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

import simulators.devices.device as device_module
import simulators.devices.massager as massager_module
from protocols import (
    Event,
    EventCode,
    MassageMode,
    MessageType,
    Ping,
    RequestBackfill,
    SampleFormat,
    SetIntensity,
    SetMode,
    SetZone,
    StartStream,
    TelemetryBatch,
    Zone,
    decode_batch,
)
from protocols.telemetry import (
    MASSAGER_FLAG_CONTACT,
    MASSAGER_FLAG_MOTOR_ON,
    MASSAGER_SAMPLE_DTYPE,
)
from simulators import (
    Channel,
    HandScript,
    HandSegment,
    SimulatedMassager,
    TelemetryRing,
    VirtualClock,
)
from simulators.devices.device import BATTERY_LOW_PERCENT
from simulators.devices.massager import (
    CONTACT_OFF_KPA,
    CONTACT_ON_KPA,
    IDLE_DRAIN_PERCENT_PER_S,
    MOTOR_DRAIN_PERCENT_PER_S_PER_LEVEL,
)
from simulators.scenario.hand import ScenarioHand
from simulators.scenario.spec import HandAction

from .conftest import Commander, RecordingLink
from .test_sim_sample_paths import run_massagers

# sha256 over ring bytes, events and messages of run_massagers, per batch interval, as the
# simulator gave them before any of these shortcuts; since then the only change is the
# program's CRC-32 at the end of its start event (PROGRAM_STEP reason 0, docs/protocol.md
# 7.4): with those four bytes left out, the runs give the digests recorded first.
RECORDED_RUN_DIGESTS = {
    0.1: "c0e5567ac466b660c7683f47627db958d73a9cb130da501808dfa481623fd570",
    0.47: "81b9287fee557a6f0412af9d89ec5866717e177f421165bb9280a6c1fad1d53d",
    1.0: "423f9d60e02ac13810e71a59bfbd3d6fdf022e28bb2bebc00c99d9bf94bb1cde",
    5.0: "c9a3ea5d5fab9eca3cee859a8bf6f3ed7c884bc5ca0c14fdca573358f4dd50ec",
}


def as_recorded(data: bytes) -> bytes:
    """A message as the simulator encoded it when the digests were recorded: BOOT and
    SHUTDOWN carried no sample counts then (the rest must be the same to the bit)."""
    if data[:1] != bytes([MessageType.EVENT]):
        return data
    event = Event.decode(data)
    if event.code == EventCode.BOOT:
        return replace(event, payload=b"").encode()
    if event.code == EventCode.SHUTDOWN:
        return replace(event, payload=event.payload[:1]).encode()
    return data


def is_boot(data: bytes) -> bool:
    return data[:1] == bytes([MessageType.EVENT]) and Event.decode(data).code == EventCode.BOOT


@pytest.mark.parametrize("batch_interval_s", sorted(RECORDED_RUN_DIGESTS))
async def test_runs_match_the_recorded_digests(batch_interval_s: float) -> None:
    digest = hashlib.sha256()
    for ring_bytes, events, messages in await run_massagers(batch_interval_s):
        digest.update(ring_bytes)
        # BOOT then went to nobody (it happens before any link); now it waits for a host.
        sent = [m for m in messages if not is_boot(m)]
        for data in (*events, *sent):
            digest.update(as_recorded(data))
    assert digest.hexdigest() == RECORDED_RUN_DIGESTS[batch_interval_s]


def telemetry_of(link: RecordingLink) -> list[tuple[TelemetryBatch, bytes]]:
    """The telemetry messages a host received, decoded, with their bytes."""
    return [
        (decode_batch(message), message)
        for channel, message in link.messages
        if channel is Channel.TELEMETRY
    ]


async def test_batches_are_the_ring_samples_as_telemetry_batches() -> None:
    # What a host receives, live and backfilled, is TelemetryBatch.encode of the samples
    # the ring holds, with the device time of the first one.
    clock = VirtualClock()
    device = SimulatedMassager(clock, seed=4, battery_percent=90.0)
    link = RecordingLink(max_payload_bytes=10 + 9 * 7)
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    command(StartStream())
    await clock.advance(1.03)
    reply = command(RequestBackfill(40, 33))
    assert reply.ok
    await clock.advance(0.5)
    await device.stop()
    received = telemetry_of(link)
    live = [(b, m) for b, m in received if not b.backfill]
    backfill = [(b, m) for b, m in received if b.backfill]
    assert [b.first_sequence for b, _ in live][:3] == [0, 7, 10]  # ticks of 10: 7 + 3
    assert sum(len(b) for b, _ in live) == device.next_sequence
    assert [(b.first_sequence, len(b)) for b, _ in backfill] == [
        (40, 7),
        (47, 7),
        (54, 7),
        (61, 7),
        (68, 5),
    ]
    for batch, message in received:
        first, samples = device.ring.range(batch.first_sequence, len(batch))
        assert first == batch.first_sequence
        expected = TelemetryBatch(
            SampleFormat.MASSAGER_V1,
            first,
            device.device_time_ms_of_sequence(first),
            samples,
            batch.backfill,
        ).encode()
        assert message == expected


def test_ring_bytes_are_the_ring_samples() -> None:
    ring = TelemetryRing(MASSAGER_SAMPLE_DTYPE, 10)
    ring.extend(np.frombuffer(bytes(range(9 * 13)), dtype=MASSAGER_SAMPLE_DTYPE))
    for first, count in [(0, 5), (3, 10), (5, 4), (8, 6), (12, 3), (20, 2), (-4, 9)]:
        start, samples = ring.range(first, count)
        assert ring.range_bytes(first, count) == (start, bytearray(samples.tobytes()))
    assert ring.sample_bytes == MASSAGER_SAMPLE_DTYPE.itemsize


def ring_samples(device: SimulatedMassager) -> npt.NDArray[np.void]:
    return device.ring.range(0, device.ring.next_sequence)[1]


def sample_of(event: Event, rate_hz: int) -> int:
    """The sequence of the sample an event happened at (docs/qa.md: device_time_ms x rate)."""
    sequence = event.device_time_ms * rate_hz / 1000
    assert sequence == int(sequence)
    return int(sequence)


@pytest.mark.parametrize(
    ("charge_percent", "intensity"),
    [(79.0004, 0), (43.000_000_1, 7), (10.02, 4), (1.003, 10)],
)
@pytest.mark.parametrize("batch_interval_s", [0.1, 5.0])
@pytest.mark.parametrize("array_min_samples", [1, 1_000_000])
async def test_battery_reports_come_at_the_sample_the_charge_crosses(
    charge_percent: float,
    intensity: int,
    batch_interval_s: float,
    array_min_samples: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The firmware drains the battery one subtraction per sample and reports the level
    # (the Battery Level notification, each sample's battery field, BATTERY_LOW, an empty
    # battery's shutdown) at the very sample where it changes. Between reports it drains
    # many samples at once, in plain floats or with numpy: either way, the reports and the
    # charge are those of the subtraction sample by sample, to the bit.
    monkeypatch.setattr(device_module, "QUIET_DRAIN_ARRAY_MIN_SAMPLES", array_min_samples)
    clock = VirtualClock()
    device = SimulatedMassager(
        clock,
        hand=HandScript.idle(),
        battery_percent=charge_percent,
        batch_interval_s=batch_interval_s,
    )
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    command(SetMode(MassageMode.VIBRATION))
    command(SetIntensity(intensity))
    await clock.advance(60.0)
    await device.stop()

    motor_drain_percent = MOTOR_DRAIN_PERCENT_PER_S_PER_LEVEL * intensity if intensity else 0.0
    drain_percent = (IDLE_DRAIN_PERCENT_PER_S + motor_drain_percent) * (1.0 / 100)
    charge = charge_percent
    reported = min(100, math.ceil(charge))
    low_sent = charge <= BATTERY_LOW_PERCENT
    fields: list[int] = []
    levels: list[int] = []
    low_at: tuple[int, int] | None = None
    empty = False
    # The samples taken, and the one that found the battery empty (not kept) if any.
    for sequence in range(device.next_sequence + (0 if device.is_powered else 1)):
        charge = max(0.0, charge - drain_percent)
        if min(100, math.ceil(charge)) != reported:
            reported = min(100, math.ceil(charge))
            levels.append(reported)
        if not low_sent and charge <= BATTERY_LOW_PERCENT:
            low_sent = True
            low_at = (sequence, reported)
        if charge <= 0:
            empty = True
            break
        fields.append(reported)
    assert ring_samples(device)["battery_percent"].tolist() == fields
    assert [m[0] for c, m in link.messages if c is Channel.BATTERY] == levels
    assert levels  # every case reports at least once
    lows = [e for e in device.events if e.code == EventCode.BATTERY_LOW]
    assert [(sample_of(e, 100), e.payload[0]) for e in lows] == ([low_at] if low_at else [])
    shutdowns = [e for e in device.events if e.code == EventCode.SHUTDOWN]
    assert len(shutdowns) == int(empty)
    assert device.battery_charge_percent.hex() == charge.hex()


def touching_hand() -> HandScript:
    """A hand that presses with no noise (the reading is the true load, to the bit),
    reaching and leaving contact exactly at, just past and just short of the thresholds,
    on one zone, another, and none, with runs shorter and longer than a block."""
    pieces = [
        (Zone.CHEEK_LEFT, 0.5, 60),
        (Zone.NONE, 0.2, 7),
        (Zone.CHEEK_LEFT, CONTACT_OFF_KPA, 55),
        (Zone.CHIN, 0.1, 3),
        (Zone.CHIN, CONTACT_ON_KPA, 120),
        (Zone.NONE, 0.0, 49),
        (Zone.CHEEK_LEFT, 0.31, 1),
        (Zone.CHEEK_LEFT, 0.16, 200),
        (Zone.CHEEK_LEFT, 0.1499, 48),
        (Zone.NECK, 0.2999, 30),
        (Zone.NECK, 0.3, 700),
        (Zone.CHIN, 0.15, 2),
        (Zone.NECK, 0.1, 11),
        (Zone.NONE, 0.2999, 90),
    ]
    segments = []
    start_sample = 13
    for zone, pressure_kpa, samples in pieces:
        segments.append(HandSegment(start_sample / 100, samples / 100, zone, pressure_kpa))
        start_sample += samples + (5 if zone is Zone.CHIN else 0)  # a gap: nobody presses
    return HandScript(
        segments, noise_floor_kpa=0.0, noise_fraction=0.0, loop=True, period_s=start_sample / 97
    )


@pytest.mark.parametrize("batch_interval_s", [0.1, 0.47, 5.0])
async def test_contact_and_zone_change_at_the_samples_the_rules_say(
    batch_interval_s: float,
) -> None:
    # Sample by sample, contact goes on at a reading of CONTACT_ON_KPA or more and off below
    # CONTACT_OFF_KPA, and the hand's zone is the device's zone once the hand is on one. The
    # events come at those samples and every sample's flags and zone say so, whether the
    # device works a block out in bulk, sample by sample, or as runs in between.
    clock = VirtualClock()
    hand = touching_hand()
    device = SimulatedMassager(
        clock, hand=hand, battery_percent=79.5, batch_interval_s=batch_interval_s
    )
    device.start()
    await clock.advance(40.0)
    await device.stop()
    samples = ring_samples(device)
    count = samples.shape[0]
    truth = hand.evaluate(np.arange(float(count)) / 100)

    contact, zone = False, int(Zone.NONE)
    contact_flags, zones, contact_events, zone_events = [], [], [], []
    for sequence, (reading_kpa, hand_zone) in enumerate(
        zip(truth.pressure_kpa.tolist(), truth.zone.tolist(), strict=True)
    ):
        if hand_zone != Zone.NONE and hand_zone != zone:
            zone = hand_zone
            zone_events.append((sequence, zone))
        if reading_kpa < CONTACT_OFF_KPA if contact else reading_kpa >= CONTACT_ON_KPA:
            contact = not contact
            contact_events.append((sequence, int(contact)))
        contact_flags.append(MASSAGER_FLAG_CONTACT if contact else 0)
        zones.append(zone)
    assert len(contact_events) > 20  # a busy hand
    assert len(zone_events) > 15
    assert samples["pressure_dapa"].tolist() == np.rint(truth.pressure_kpa / 0.01).tolist()
    assert samples["flags"].tolist() == contact_flags
    assert samples["zone"].tolist() == zones
    assert set(samples["battery_percent"].tolist()) == {80}
    assert set(samples["intensity"].tolist()) == set(samples["mode"].tolist()) == {0}
    events = [(sample_of(e, 100), e.code, e.payload[0]) for e in device.events if e.payload]
    assert [(s, p) for s, c, p in events if c == EventCode.CONTACT_CHANGED] == contact_events
    assert [(s, p) for s, c, p in events if c == EventCode.ZONE_CHANGED] == zone_events


@pytest.mark.parametrize("batch_interval_s", [0.1, 5.0])
async def test_every_sample_carries_the_settings_commanded_before_it(
    batch_interval_s: float,
) -> None:
    # A command applies from the first sample taken after it (next_sequence when it is
    # answered): each sample's intensity, mode, zone and motor flag are those the last
    # command before it set, however the block around it was worked out.
    clock = VirtualClock()
    device = SimulatedMassager(
        clock, hand=HandScript.idle(), battery_percent=79.5, batch_interval_s=batch_interval_s
    )
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    timeline = [
        (0.0, [SetMode(MassageMode.VIBRATION), SetIntensity(3)]),
        (0.735, [SetIntensity(7)]),
        (1.2, [SetMode(MassageMode.PULSE), SetZone(Zone.FOREHEAD)]),
        (3.3333, [SetZone(Zone.CHIN)]),
        (6.0, [SetIntensity(0)]),
        (9.05, [SetMode(MassageMode.PERCUSSION), SetIntensity(10)]),
        (9.06, [SetMode(MassageMode.OFF)]),
        (12.5, [SetMode(MassageMode.VIBRATION), SetIntensity(1)]),
    ]
    changes: list[tuple[int, int, int, int]] = []
    for at_s, bodies in timeline:
        await clock.advance(at_s - clock.now_s())
        for body in bodies:
            assert command(body).ok
        changes.append((device.next_sequence, device.intensity, int(device.mode), device.zone))
    await clock.advance(20.0 - clock.now_s())
    await device.stop()
    samples = ring_samples(device)
    expected: list[tuple[int, int, int, int]] = []
    for sequence in range(samples.shape[0]):
        intensity, mode, zone = next(c[1:] for c in reversed(changes) if c[0] <= sequence)
        motor = MASSAGER_FLAG_MOTOR_ON if intensity and mode != MassageMode.OFF else 0
        expected.append((intensity, mode, zone, motor))
    got = list(
        zip(
            samples["intensity"].tolist(),
            samples["mode"].tolist(),
            samples["zone"].tolist(),
            samples["flags"].tolist(),
            strict=True,
        )
    )
    assert got == expected
    assert set(samples["battery_percent"].tolist()) == {80}


async def test_pressure_noise_is_each_blocks_draw_from_sensor_rng() -> None:
    # Each block of samples draws its noise from sensor_rng in one draw of three numbers a
    # sample (load cell, motor ripple, temperature), so the readings depend on the seed
    # alone, however far ahead the device draws; a generator put in sensor_rng's place is
    # drawn from at once.
    clock = VirtualClock()
    hand = HandScript.constant(Zone.CHEEK_LEFT, 8.0)
    device = SimulatedMassager(clock, seed=3, index=2, hand=hand, batch_interval_s=1000.0)
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    reference = device_module.device_rng(3, 2, device_module.RandomStream.SENSOR)
    reference.uniform(-1.0, 1.0)  # the skin baseline, drawn as the device is built
    blocks = [30, 300, 3, massager_module.NORMALS_AHEAD + 7, 0, 1, 2999, 2]
    expected: list[float] = []
    for index, size in enumerate(blocks):
        if index == len(blocks) - 1:
            device.sensor_rng = np.random.default_rng(5)
            reference = np.random.default_rng(5)
        await clock.advance(size / 100)
        command(Ping())  # a command takes the samples due first
        expected += reference.standard_normal(3 * size)[:size].tolist()
    readings_kpa = 8.0 + np.array(expected) * hand.noise_sigma_kpa(8.0)
    assert device.next_sequence == sum(blocks)
    assert ring_samples(device)["pressure_dapa"].tolist() == np.rint(readings_kpa / 0.01).tolist()


def test_guided_hand_after_the_lead_in_is_the_masked_hand() -> None:
    hand = ScenarioHand(
        [HandAction(device="*", at_s=9.0, action="lift", duration_s=1.0)], guided=True
    )
    hand.commanded_zone = Zone.CHIN
    times = np.arange(0.0, 1200.0) / 100  # across the lead-in and the lift
    # From the lead-in on: each block as one, or as part of a block the lead-in starts.
    whole = hand.evaluate(times)
    after = times >= hand.lead_in_s
    for first in range(int(np.argmax(after)), times.shape[0], 97):
        block = hand.evaluate(times[first : first + 97])
        for got, expected in zip(
            (block.pressure_kpa, block.zone, block.touching),
            (whole.pressure_kpa, whole.zone, whole.touching),
            strict=True,
        ):
            assert got.dtype == expected.dtype
            assert got.tobytes() == expected[first : first + 97].tobytes()


async def test_flush_sends_batches_of_the_ring() -> None:
    # A tick sends what the ring took since the last one, cut to what the link carries,
    # and the next tick goes on from there.
    clock = VirtualClock()
    device = SimulatedMassager(clock, batch_interval_s=0.11)
    link = RecordingLink(max_payload_bytes=10 + 9 * 4)
    device.start()
    device.attach_link(link)
    Commander(device, link)(StartStream())
    await clock.advance(0.11)
    first_tick = [b for b, _ in telemetry_of(link)]
    assert [(b.first_sequence, len(b)) for b in first_tick] == [(0, 4), (4, 4), (8, 3)]
    ring_bytes = device.ring.range_bytes(0, 11)[1]
    assert b"".join(b.samples.tobytes() for b in first_tick) == ring_bytes
    await clock.advance(0.11)
    await device.stop()
    second_tick = [b for b, _ in telemetry_of(link)][3:]
    assert [(b.first_sequence, len(b)) for b in second_tick] == [(11, 4), (15, 4), (19, 3)]
