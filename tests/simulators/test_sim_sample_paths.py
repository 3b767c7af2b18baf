"""Hands and sensors worked out together give each device's own samples, to the bit.

Massagers take their samples with one definition for any number of devices
(``generate_massagers``): hands of one type are evaluated together, devices where nothing
happens over a block get their samples together, the others react sample by sample; the
ring keeps samples as raw bytes. A seed must replay a run byte for byte, so each fast way
is checked here against the way it replaces, and the readings against the sensor model
worked out sample by sample.
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
    Ping,
    Program,
    ProgramBegin,
    ProgramChunk,
    ProgramCommit,
    ProgramLimits,
    ProgramStart,
    SetIntensity,
    SetMode,
    SetZone,
    Zone,
    program_crc32,
)
from protocols.telemetry import MASSAGER_FLAG_MOTOR_ON, MASSAGER_SAMPLE_DTYPE
from simulators import (
    Channel,
    HandScript,
    HandSegment,
    SimulatedMassager,
    SimulatedWorld,
    TelemetryRing,
    VirtualClock,
)
from simulators.devices.device import RandomStream, device_rng
from simulators.devices.hand import Hand, evaluate_hands
from simulators.devices.massager import MOTOR_RIPPLE_KPA_PER_LEVEL, SENSOR_MAX_KPA
from simulators.scenario.hand import ScenarioHand
from simulators.scenario.spec import HandAction

from .conftest import Commander, RecordingLink, streaming

RATE_HZ = 100


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


def assert_rows_are_their_own(hands: list[Hand], times: npt.NDArray[np.float64]) -> None:
    """Hands evaluated together, each alone, and each time after time on plain floats (a
    live tick's way) give the same values, to the bit."""
    together = evaluate_hands(hands, times)
    for row, hand in enumerate(hands):
        alone = hand.evaluate(times)
        each = hand.evaluate_each(times.tolist())
        assert together.pressure_kpa[row].tobytes() == alone.pressure_kpa.tobytes()
        assert np.array(each.pressure_kpa).tobytes() == alone.pressure_kpa.tobytes()
        assert together.zone[row].tolist() == alone.zone.tolist() == each.zone
        assert together.touching[row].tolist() == alone.touching.tolist() == each.touching


@pytest.mark.parametrize("seed", [1, 7, 42])
def test_hand_scripts_together_match_each_alone(seed: int) -> None:
    hands: list[Hand] = [HandScript.default(seed + k) for k in range(5)]
    hands += [
        HandScript(
            [
                HandSegment(0.5, 1.0, Zone.FOREHEAD, 2.0, 6.0),
                HandSegment(2.0, 0.7, Zone.NECK, 3.0, contact=False),
                HandSegment(3.0, 2.0, Zone.CHIN, 9.0, 1.0),
            ]
        ),
        HandScript.idle(),
        HandScript.constant(Zone.CHEEK_LEFT, 4.0),
    ]
    script = HandScript.default(seed)
    rng = np.random.default_rng(seed)
    edges = np.array([t for s in script.segments for t in (s.start_s, s.end_s)])
    anywhere = rng.uniform(-1.0, 3 * script.period_s, 2000)  # long: looked up hand by hand
    for times in (edges, anywhere, *tick_times(0.0, 2 * script.period_s)):
        assert_rows_are_their_own(hands, times)


def test_scenario_hands_together_match_each_alone() -> None:
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
    scenario_hands = [
        ScenarioHand(actions, guided=True),
        ScenarioHand(actions, guided=False),
        ScenarioHand([], guided=True),
        ScenarioHand([], guided=True, lead_in_s=0.4),
    ]
    mixed: list[Hand] = [*scenario_hands, HandScript.default(3), HandScript.idle()]
    for commanded in (Zone.NONE, Zone.CHEEK_RIGHT):
        for hand in scenario_hands:
            hand.commanded_zone = commanded
        scenario_hands[2].commanded_zone = Zone.CHIN
        for times in tick_times(0.0, 16.0):
            assert_rows_are_their_own(list(scenario_hands), times)
            assert_rows_are_their_own(mixed, times)
            for hand in scenario_hands:
                assert_rows_are_their_own([hand], times)


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
            link, command = streaming(device)
            links.append(link)
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
async def test_quiet_devices_together_and_each_reacting_give_the_same_run(
    batch_interval_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Quiet blocks of a fleet are taken together from the smallest fleet on, or never
    # (each device then goes through its block sample by sample, quiet runs at once); a
    # device's own blocks in plain floats up to a live tick's size, or always in arrays.
    monkeypatch.setattr(massager_module, "FLEET_MIN_DEVICES", 1)
    monkeypatch.setattr(massager_module, "EACH_MAX_SAMPLES", 0)
    together = await run_massagers(batch_interval_s)
    monkeypatch.setattr(massager_module, "FLEET_MIN_DEVICES", 1_000_000)
    monkeypatch.setattr(massager_module, "EACH_MAX_SAMPLES", 1_000_000)
    each = await run_massagers(batch_interval_s)
    assert each == together
    codes = [[Event.decode(e).code for e in events] for _, events, _ in together]
    assert EventCode.SHUTDOWN in codes[3]  # ran empty
    assert EventCode.BATTERY_LOW in codes[4]
    assert codes[1].count(EventCode.CONTACT_CHANGED) > 10  # chatter at the thresholds
    assert {EventCode.PROGRAM_STEP, EventCode.HARD_LIMIT} <= set(codes[2])


async def test_readings_are_the_load_with_noise_and_motor_ripple_clipped_to_the_sensor() -> None:
    # Each reading is the hand's load plus the load cell's noise, plus the motor's ripple
    # while the head touches (as the motor ran after the sample before), clipped to
    # 0..SENSOR_MAX_KPA. A program switches the motor in the middle of blocks (steps, the
    # cap, no contact), so readings in bulk blocks and in short ones are worked out again
    # after each switch; the hand goes below zero with its noise and past full scale.
    clock = VirtualClock()
    hand = HandScript(
        [
            HandSegment(0.0, 2.0, Zone.CHEEK_LEFT, 8.0),
            HandSegment(2.0, 0.5, Zone.CHEEK_LEFT, 0.05),  # noise takes it below 0 kPa
            # Lifted: the program pauses the motor 3 s after contact was lost.
            HandSegment(5.8, 0.2, Zone.CHEEK_LEFT, 8.0),  # back: the motor runs again
            # Lifted again, the motor running.
            HandSegment(6.3, 1.0, Zone.CHEEK_LEFT, 700.0),  # above the cap and full scale
            HandSegment(7.3, 2.7, Zone.CHEEK_LEFT, 9.0, 14.0),
        ]
    )
    device = SimulatedMassager(clock, seed=8, hand=hand, batch_interval_s=1000.0)
    link = RecordingLink()
    device.start()
    device.attach_link(link)
    command = Commander(device, link)
    start_program(command, device, massage_program())
    motor_after_start = (device.motor_on, device.intensity)
    blocks = [7, 53, 130, 10, 300, 1, 199, 49, 200, 47, 4]
    for size in blocks:
        await clock.advance(size / 100)
        command(Ping())  # a command takes the samples due first
    await device.stop()
    count = sum(blocks)
    samples = device.ring.range(0, count)[1]
    assert samples.shape[0] == count

    stream = device_rng(8, 0, RandomStream.SENSOR)
    stream.uniform(-1.0, 1.0)  # the skin baseline, drawn as the device is built
    load_noise: list[float] = []
    ripple_noise: list[float] = []
    for size in blocks:
        draws = stream.standard_normal(3 * size)
        load_noise += draws[:size].tolist()
        ripple_noise += draws[size : 2 * size].tolist()
    motor_on = [motor_after_start[0], *(bool(f & MASSAGER_FLAG_MOTOR_ON) for f in samples["flags"])]
    intensity = [motor_after_start[1], *samples["intensity"].tolist()]
    ripple_kpa = np.array(
        [
            MOTOR_RIPPLE_KPA_PER_LEVEL * level if on else 0.0
            for on, level in zip(motor_on, intensity, strict=True)
        ]
    )[:count]
    truth = hand.evaluate(np.arange(float(count)) / 100)
    readings_kpa = np.clip(
        truth.pressure_kpa
        + np.array(load_noise) * hand.noise_sigma_kpa(truth.pressure_kpa)
        + np.array(ripple_noise) * ripple_kpa * truth.touching,
        0.0,
        SENSOR_MAX_KPA,
    )
    assert samples["pressure_dapa"].tolist() == np.rint(readings_kpa / 0.01).tolist()
    # The run went through what the test is for.
    assert len(set(ripple_kpa.tolist())) >= 3  # off, and two intensities
    assert (readings_kpa == 0.0).any()
    assert (readings_kpa == SENSOR_MAX_KPA).any()
    switches = np.flatnonzero(np.diff(ripple_kpa)) + 1
    block_starts = set(np.cumsum([0, *blocks]).tolist())
    assert any(int(i) not in block_starts for i in switches)  # mid-block
    untouched = ~truth.touching
    assert (untouched & (ripple_kpa > 0))[np.arange(count) > 501].any()  # reworked, lifted
