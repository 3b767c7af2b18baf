"""Live ticks and bulk blocks give the same samples, to the bit.

The massager works out a live tick (about 10 samples) one sample at a time in plain floats,
and a long block with numpy; the ring keeps samples as raw bytes; draining checks a charge
floor instead of the reported percent. A seed must replay a run byte for byte, so each fast
way is checked here against the way it replaces.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

import simulators.devices.massager as massager_module
from protocols import (
    DeviceKind,
    Event,
    EventCode,
    MassageMode,
    MassageProgramStep,
    Program,
    ProgramBegin,
    ProgramChunk,
    ProgramCommit,
    ProgramLimits,
    ProgramStart,
    SetIntensity,
    SetMode,
    SetZone,
    StartStream,
    Zone,
    program_crc32,
)
from protocols.telemetry import MASSAGER_SAMPLE_DTYPE
from simulators import (
    Channel,
    HandScript,
    HandSegment,
    SimulatedMassager,
    SimulatedWorld,
    TelemetryRing,
    VirtualClock,
)
from simulators.devices.hand import HandSamples
from simulators.devices.massager import SENSOR_MAX_KPA, _sensor_reading_kpa
from simulators.scenario.hand import ScenarioHand
from simulators.scenario.spec import HandAction

from .conftest import Commander, RecordingLink

RATE_HZ = 100


def assert_same_bits(each: HandSamples, state: HandSamples) -> None:
    assert np.array(each.pressure_kpa).tobytes() == np.array(state.pressure_kpa).tobytes()
    assert each.zone == state.zone
    assert each.touching == state.touching


def tick_times(first_s: float, last_s: float, per_tick: int = 10) -> list[npt.NDArray[np.float64]]:
    """The sample times of consecutive live ticks, as catch_up makes them."""
    sequences = np.arange(round(first_s * RATE_HZ), round(last_s * RATE_HZ), dtype=np.float64)
    return [block / RATE_HZ for block in np.array_split(sequences, len(sequences) // per_tick)]


@pytest.mark.parametrize("count", [1, 10, 47, 500])
def test_one_draw_gives_the_numbers_of_three(count: int) -> None:
    # _generate draws a block's pressure, ripple and temperature noise at once; the samples
    # stay those of three draws (what seeds recorded before) only if the numbers do.
    three, one = (np.random.default_rng([9, 0, 1]) for _ in range(2))
    drawn = [three.standard_normal(count) for _ in range(3)]
    assert np.concatenate(drawn).tobytes() == one.standard_normal(3 * count).tobytes()
    assert three.standard_normal(5).tobytes() == one.standard_normal(5).tobytes()


@pytest.mark.parametrize("seed", [1, 7, 42])
def test_hand_script_each_matches_evaluate(seed: int) -> None:
    hand = HandScript.default(seed)
    rng = np.random.default_rng(seed)
    edges = np.array([t for s in hand.segments for t in (s.start_s, s.end_s)])
    anywhere = rng.uniform(-1.0, 3 * hand.period_s, 2000)
    for times in (edges, anywhere, *tick_times(0.0, 2 * hand.period_s)):
        assert_same_bits(hand.evaluate_each(times.tolist()), HandSamples.of(hand.evaluate(times)))


def test_hand_script_each_covers_gaps_lifts_and_no_script() -> None:
    hand = HandScript(
        [
            HandSegment(0.5, 1.0, Zone.FOREHEAD, 2.0, 6.0),
            HandSegment(2.0, 0.7, Zone.NECK, 3.0, contact=False),
            HandSegment(3.0, 2.0, Zone.CHIN, 9.0, 1.0),
        ]
    )
    times = np.linspace(-0.5, 6.0, 1301)
    for script in (hand, HandScript.idle(), HandScript.constant(Zone.CHEEK_LEFT, 4.0)):
        each = script.evaluate_each(times.tolist())
        assert_same_bits(each, HandSamples.of(script.evaluate(times)))


def test_scenario_hand_each_matches_evaluate() -> None:
    actions = [
        HandAction("*", 2.0, 3.0, "press", Zone.JAWLINE_LEFT, 5.0, 12.0),
        HandAction("*", 6.0, 1.5, "lift", Zone.JAWLINE_LEFT),
        HandAction(
            "*",
            9.0,
            1.2,
            "profile",
            step_s=0.3,
            profile_kpa=(0.0, 3.0, 0.2, 8.0),
            profile_zones=(Zone.CHIN, Zone.NONE, Zone.NECK, Zone.NECK),
        ),
        HandAction("*", 11.0, 1.0, "profile", Zone.NECK, step_s=0.25, profile_kpa=(1.0, 0.0)),
        HandAction("*", 13.0, 2.0, "press", None, 7.0, 0.0),
    ]
    for hand in (
        ScenarioHand(actions, guided=True),
        ScenarioHand(actions, guided=False),
        ScenarioHand([], guided=True),
    ):
        for commanded in (Zone.NONE, Zone.CHEEK_RIGHT):
            hand.commanded_zone = commanded
            for times in tick_times(0.0, 16.0):
                each = hand.evaluate_each(times.tolist())
                assert_same_bits(each, HandSamples.of(hand.evaluate(times)))


def test_sensor_reading_matches_the_vectorised_clip() -> None:
    rng = np.random.default_rng(3)
    count = 20_000
    true_kpa = np.concatenate([np.zeros(count // 4), rng.uniform(0.0, 800.0, count - count // 4)])
    sigma_kpa = 0.03 + 0.03 * true_kpa
    noise = rng.standard_normal(count) * 40
    ripple = rng.standard_normal(count) * 40
    touching = rng.random(count) < 0.5
    for ripple_kpa in (0.0, 0.02, 0.2):
        vectorised = np.clip(
            true_kpa + noise * sigma_kpa + ripple * ripple_kpa * touching, 0.0, SENSOR_MAX_KPA
        )
        each = [
            _sensor_reading_kpa(*values, ripple_kpa, bool(on))
            for *values, on in zip(
                true_kpa.tolist(),
                sigma_kpa.tolist(),
                noise.tolist(),
                ripple.tolist(),
                touching,
                strict=True,
            )
        ]
        assert np.array(each).tobytes() == vectorised.tobytes()


def test_ring_holds_what_a_list_would() -> None:
    rng = np.random.default_rng(5)
    ring = TelemetryRing(MASSAGER_SAMPLE_DTYPE, 37)
    held: list[bytes] = []  # every sample ever appended, as bytes
    for _ in range(400):
        count = int(rng.integers(0, 50))
        samples = np.frombuffer(
            rng.integers(0, 256, count * MASSAGER_SAMPLE_DTYPE.itemsize, dtype=np.uint8).tobytes(),
            dtype=MASSAGER_SAMPLE_DTYPE,
        )
        ring.extend(samples)
        held += [s.tobytes() for s in samples]
        assert (ring.next_sequence, ring.oldest_sequence) == (len(held), max(0, len(held) - 37))
        first = int(rng.integers(0, len(held) + 5))
        wanted = int(rng.integers(0, 60))
        start, got = ring.range(first, wanted)
        end = min(first + wanted, len(held))
        if max(first, ring.oldest_sequence) < end:
            assert start == max(first, ring.oldest_sequence)
            assert got.tobytes() == b"".join(held[start:end])
            assert got.flags.writeable
            assert got.dtype == MASSAGER_SAMPLE_DTYPE
        else:
            assert (start, got.shape[0]) == (ring.oldest_sequence, 0)


@pytest.mark.parametrize(
    ("charge_percent", "low_sent"),
    [(80.0, False), (43.0000001, True), (10.02, False), (10.0, True), (1.003, True), (0.004, True)],
)
def test_quiet_drain_stops_where_the_first_report_comes(
    charge_percent: float, low_sent: bool
) -> None:
    drain_percent = 0.000_123_4
    quietly, by_sample = (SimulatedMassager(VirtualClock()) for _ in range(2))
    links = []
    for device in (quietly, by_sample):
        device._battery_charge_percent = charge_percent
        device._battery_low_sent = low_sent
        link = RecordingLink()
        device._link = link
        links.append(link)
    taken = quietly._drain_battery_quietly(drain_percent, 100_000)
    steps = 0
    while steps < 100_000:
        before = len(links[1].messages)
        if not by_sample._drain_battery(drain_percent, 0.0) or len(links[1].messages) > before:
            break
        steps += 1
    assert taken == steps
    assert links[0].messages == []
    if taken:
        by_sample._battery_charge_percent = charge_percent
        for _ in range(taken):
            by_sample._drain_battery(drain_percent, 0.0)
        assert quietly.battery_charge_percent == by_sample.battery_charge_percent


def massage_program() -> Program:
    return Program(
        DeviceKind.MASSAGER,
        ProgramLimits(600, 4300, 30),
        (
            MassageProgramStep(Zone.CHEEK_LEFT, MassageMode.VIBRATION, 5, 30, 400, 1200, 1500),
            MassageProgramStep(Zone.CHIN, MassageMode.PULSE, 7, 40, 500, 2000, 2500),
        ),
    )


def start_program(command: Commander, device: SimulatedMassager, program: Program) -> None:
    data = program.encode()
    assert command(ProgramBegin(1, len(data), program_crc32(data))).ok
    for offset in range(0, len(data), 20):
        chunk = ProgramChunk(1, offset, data[offset : offset + 20]).encode()
        device.receive(Channel.PROGRAM, chunk)
    assert command(ProgramCommit(1)).ok
    assert command(ProgramStart()).ok


async def run_massagers(batch_interval_s: float) -> list[tuple[bytes, list[bytes], list[bytes]]]:
    """Ring bytes, events and everything sent, of massagers through many kinds of events."""
    clock = VirtualClock()
    world = SimulatedWorld(seed=77, clock=clock)
    opts = {"batch_interval_s": batch_interval_s}
    hover = HandScript(
        [
            HandSegment(0.5, 4.0, Zone.FOREHEAD, 0.1, 0.4),  # chatters around contact
            HandSegment(5.0, 3.0, Zone.EYE_AREA_LEFT, 0.25),
            HandSegment(8.5, 2.0, Zone.NECK, 0.2, contact=False),
            HandSegment(11.0, 5.0, Zone.CHIN, 30.0, 900.0),  # past the sensor's full scale
        ],
        loop=True,
        period_s=17.0,
    )
    program_hand = HandScript(
        [
            HandSegment(1.5, 2.0, Zone.CHEEK_LEFT, 8.0),
            HandSegment(3.5, 0.6, Zone.CHEEK_LEFT, 18.0),  # above the cap
            HandSegment(4.1, 3.0, Zone.CHEEK_LEFT, 8.0),
            HandSegment(7.5, 6.0, Zone.CHIN, 10.0),
        ]
    )
    massagers = [
        world.add_massager(**opts),
        world.add_massager(hand=hover, **opts),
        world.add_massager(hand=program_hand, **opts),
        world.add_massager(  # runs empty
            hand=HandScript.constant(Zone.MASSETER_LEFT, 30.0), battery_percent=0.2, **opts
        ),
        world.add_massager(battery_percent=10.05, **opts),
    ]
    links = []
    async with world:
        for device in massagers:
            link = RecordingLink()
            device.attach_link(link)
            links.append(link)
            command = Commander(device, link)
            command(StartStream())
            if device is massagers[2]:
                start_program(command, device, massage_program())
            else:
                command(SetIntensity(10 if device is massagers[3] else 4))
                command(SetMode(MassageMode.PULSE))
        await clock.advance(3.33)
        Commander(massagers[0], links[0])(SetZone(Zone.NECK))
        massagers[1].press_power()
        await clock.advance(14.0)
    return [
        (
            device.ring.range(0, device.ring.next_sequence)[1].tobytes(),
            [event.encode() for event in device.events],
            [message for _, message in link.messages],
        )
        for device, link in zip(massagers, links, strict=True)
    ]


@pytest.mark.parametrize("batch_interval_s", [0.1, 0.47, 5.0])
async def test_live_ticks_and_bulk_blocks_give_the_same_run(
    batch_interval_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(massager_module, "BULK_MIN_SAMPLES", 1)
    in_bulk = await run_massagers(batch_interval_s)
    monkeypatch.setattr(massager_module, "BULK_MIN_SAMPLES", 1_000_000)
    one_by_one = await run_massagers(batch_interval_s)
    assert one_by_one == in_bulk
    codes = [[Event.decode(e).code for e in events] for _, events, _ in in_bulk]
    assert EventCode.SHUTDOWN in codes[3]  # ran empty
    assert EventCode.BATTERY_LOW in codes[4]
    assert codes[1].count(EventCode.CONTACT_CHANGED) > 10  # chatter at the thresholds
    assert {EventCode.PROGRAM_STEP, EventCode.HARD_LIMIT} <= set(codes[2])
