"""The simulator's shortcuts give what the plain ways give, to the bit.

Each cheaper way of working out samples, batches or draws (see simulators.devices.massager,
simulators.devices.device, simulators.devices.ring, simulators.scenario) is checked here
against the way it
stands for, and a whole run against digests recorded before the shortcuts existed.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest

import simulators.devices.device as device_module
import simulators.devices.massager as massager_module
from protocols import Event, EventCode, MessageType, SampleFormat, TelemetryBatch, Zone
from protocols.telemetry import MASSAGER_SAMPLE_DTYPE
from simulators import SimulatedMassager, TelemetryRing, VirtualClock
from simulators.devices.hand import NO_ZONE
from simulators.devices.massager import (
    CONTACT_OFF_KPA,
    CONTACT_ON_KPA,
    _ContactCrossings,
    _no_contact_change,
    _no_zone_event,
    _Runs,
)
from simulators.scenario.hand import ScenarioHand
from simulators.scenario.spec import HandAction

from .conftest import RecordingLink
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


@pytest.mark.parametrize("first_sequence", [0, 7, 2**32 - 3, 2**32 + 5])
@pytest.mark.parametrize("backfill", [False, True])
def test_batch_of_bytes_is_the_encoded_batch(first_sequence: int, backfill: bool) -> None:
    device = SimulatedMassager(VirtualClock())
    samples = np.frombuffer(bytes(range(9 * 5)), dtype=MASSAGER_SAMPLE_DTYPE)
    expected = TelemetryBatch(
        SampleFormat.MASSAGER_V1,
        first_sequence,
        device.device_time_ms_of_sequence(first_sequence),
        samples,
        backfill,
    ).encode()
    assert device._batch_of_bytes(first_sequence, samples.tobytes(), backfill) == expected
    assert device._batch(first_sequence, samples, backfill) == expected


def test_ring_bytes_are_the_ring_samples() -> None:
    ring = TelemetryRing(MASSAGER_SAMPLE_DTYPE, 10)
    ring.extend(np.frombuffer(bytes(range(9 * 13)), dtype=MASSAGER_SAMPLE_DTYPE))
    for first, count in [(0, 5), (3, 10), (5, 4), (8, 6), (12, 3), (20, 2), (-4, 9)]:
        start, samples = ring.range(first, count)
        assert ring.range_bytes(first, count) == (start, bytearray(samples.tobytes()))
    assert ring.sample_bytes == MASSAGER_SAMPLE_DTYPE.itemsize


@pytest.mark.parametrize(
    ("charge_percent", "low_sent", "drain_percent"),
    [
        (80.0, False, 0.000_123_4),
        (43.000_000_1, True, 0.000_123_4),
        (10.000_5, False, 0.000_123_4),
        (1.000_3, True, 0.000_1),
        (50.0, True, 0.0),
    ],
)
@pytest.mark.parametrize("count", [1, 10, 31, 200])
def test_quiet_drain_in_floats_is_the_drain_in_numpy(
    charge_percent: float,
    low_sent: bool,
    drain_percent: float,
    count: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = []
    for threshold in (1_000_000, 1):  # every count in plain floats, then every one in numpy
        monkeypatch.setattr(device_module, "QUIET_DRAIN_ARRAY_MIN_SAMPLES", threshold)
        device = SimulatedMassager(VirtualClock())
        device._battery_charge_percent = charge_percent
        device._battery_low_sent = low_sent
        taken = device._drain_battery_quietly(drain_percent, count)
        floor = device._battery_quiet_floor_percent()
        assert device._drain_battery_quietly(drain_percent, 0, floor) == 0
        results.append((taken, device.battery_charge_percent.hex()))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    ("starts", "values", "count"),
    [
        ([], [], 0),
        ([0], [(80, 3, 4, 1, 3)], 1),
        ([0], [(80, 3, 4, 1, 3)], 12),
        ([0, 4, 5], [(80, 3, 4, 1, 3), (79, 3, 4, 1, 3), (79, 9, 0, 0, 1)], 9),
    ],
)
def test_run_samples_are_the_written_runs(
    starts: list[int], values: list[tuple[int, int, int, int, int]], count: int
) -> None:
    runs = _Runs()
    for start, value in zip(starts, values, strict=True):
        runs.add(start, value)
    expected = np.zeros(count, dtype=MASSAGER_SAMPLE_DTYPE)
    runs.write(expected)
    got = runs.samples(count, MASSAGER_SAMPLE_DTYPE)
    assert got.dtype == MASSAGER_SAMPLE_DTYPE
    assert got.tobytes() == expected.tobytes()
    got["pressure_dapa"] = 5  # _generate fills the sensor fields in
    assert massager_module._RUN_SAMPLE_LAYOUT


def test_sensor_normals_are_the_draws_of_each_block() -> None:
    device = SimulatedMassager(VirtualClock(), seed=3, index=2)
    reference = np.random.default_rng([3, 2, int(device_module.RandomStream.SENSOR)])
    reference.uniform(-1.0, 1.0)  # the skin baseline, drawn as the device is built
    for count in [30, 300, 3, massager_module.NORMALS_AHEAD + 7, 0, 1, 2999]:
        expected = reference.standard_normal(count)
        assert device._sensor_normals(count).tobytes() == expected.tobytes()
    # A generator put in its place is drawn from at once.
    device.sensor_rng = np.random.default_rng(5)
    assert device._sensor_normals(4).tobytes() == (
        np.random.default_rng(5).standard_normal(4).tobytes()
    )


def test_hand_zone_events_shortcut() -> None:
    device = SimulatedMassager(VirtualClock())

    def by_sample(zones: list[int], last: int) -> list[int]:
        events = []
        for index, zone in enumerate(zones):
            if zone != NO_ZONE and zone != last:
                events.append(index)
                last = zone
        return events

    cases = [[5] * 6, [NO_ZONE] * 6, [5, NO_ZONE, 5, 6, 6, NO_ZONE, 5], [6, 6, 6], []]
    for last in (NO_ZONE, 5):
        for zones in cases:
            device._last_hand_zone = last
            array = np.array(zones, dtype=np.uint8)
            assert device._hand_zone_events(array).tolist() == by_sample(zones, last)
            assert _no_zone_event(zones, last) == (by_sample(zones, last) == [])


def test_contact_shortcuts() -> None:
    readings = [0.5, 0.2, CONTACT_OFF_KPA, 0.1, CONTACT_ON_KPA, 0.0, 0.31, 0.16]
    crossings = _ContactCrossings(np.array(readings))
    for start in range(len(readings) + 1):
        tail = readings[start:]
        off = [i for i, p in enumerate(readings) if i >= start and p < CONTACT_OFF_KPA]
        on = [i for i, p in enumerate(readings) if i >= start and p >= CONTACT_ON_KPA]
        assert crossings.next_switch(True, start, 99) == (off[0] if off else 99)
        assert crossings.next_switch(False, start, 99) == (on[0] if on else 99)
        assert _no_contact_change(tail, True) == (not [p for p in tail if p < CONTACT_OFF_KPA])
        assert _no_contact_change(tail, False) == (not [p for p in tail if p >= CONTACT_ON_KPA])


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


def test_flush_sends_batches_of_the_ring() -> None:
    device = SimulatedMassager(VirtualClock())
    device._powered = True
    link = RecordingLink(max_payload_bytes=10 + 9 * 4)
    device.attach_link(link)
    device._streaming = True
    device.ring.extend(np.frombuffer(bytes(range(9 * 11)), dtype=MASSAGER_SAMPLE_DTYPE))
    device._flush_stream()
    batches = link.batches()
    assert [(b.first_sequence, len(b)) for b in batches] == [(0, 4), (4, 4), (8, 3)]
    assert b"".join(b.samples.tobytes() for b in batches) == bytes(range(9 * 11))
    assert device._stream_next_sequence == 11
