"""The engine's quiet-run paths against its per-sample reference: the very same decisions and sums.

Random telemetry made of regimes (steady runs, as real hands give, with random pressure,
contact, zone, temperature and motor flags, and noisy stretches that change every sample)
is cut into random batches and fed to ``MassageEngine(quiet_runs=True)`` and to the
sample-by-sample reference ``MassageEngine(quiet_runs=False)``. Batches are of 1 to 60
samples (live notifications) or longer (replays, backfill). A policy
with short caps makes every rule fire inside a few thousand samples: pass caps, zone
session caps (contact per zone per session, which also end steps), no-contact pauses, the
session cap, step ends, temperature warn and stop, the stuck sensor and the
actuator watch. Flickering stretches hop across the band edges in segments shorter and longer
than the out-of-band warning's dwell, so that excursions end just before it, reach it exactly
or run on past it, inside a batch and across batch boundaries; some streams skip sequence
numbers between batches (lost samples end an excursion).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocols as p
from devicebridge.core.engine import (
    OUT_OF_BAND_WARNING_DWELL_S,
    MassageEngine,
    PressureState,
)
from devicebridge.core.engine import (
    ZONE_CODES as ZONE_CODES_BY_NAME,
)
from devicebridge.core.engine.readings import (
    first_count_above,
    first_count_at_least,
)
from devicebridge.core.faults_detect import (
    ActuatorWatch,
    FaultChecks,
    SensorVerdict,
    StuckSensorDetector,
)
from devicebridge.core.policy import SafetyPolicy, default_policy_text, parse_policy
from devicebridge.core.routine import Routine, parse_routine
from protocols.telemetry import MASSAGER_FLAG_CONTACT, MASSAGER_FLAG_MOTOR_ON

RATE_HZ = 100
# cheek_left twice: one pass runs on across a step end, into the pass cap.
ZONES = ("cheek_left", "cheek_left", "chin", "forehead", "jawline_right")


def short_policy() -> SafetyPolicy:
    text = (
        default_policy_text()
        .replace("pass_cap_s = { value = 60,", "pass_cap_s = { value = 3,")
        .replace("pass_cap_s = { value = 45,", "pass_cap_s = { value = 2.5,")
        # Zone session caps just over a step (the pass cap on the cheek: two steps there).
        .replace("session_cap_s = { value = 300,", "session_cap_s = { value = 2.6,")
        .replace("session_cap_s = { value = 90,", "session_cap_s = { value = 3,")
        .replace("massage_length_cap_s = { value = 1200,", "massage_length_cap_s = { value = 15,")
        .replace("no_contact_pause_s = { value = 3.0,", "no_contact_pause_s = { value = 0.5,")
    )
    text = re.sub(r"(\[zones\.cheek\]\n(?:.*\n)*?session_cap_s = \{ value = )2\.6", r"\g<1>5", text)
    return parse_policy(text, label="short policy")


POLICY = short_policy()


def short_routine(step_s: float) -> Routine:
    steps = "".join(
        f"""
[[steps]]
zone = "{zone}"
contact_time_s = {step_s}
mode = "vibration"
intensity = 4
pressure_kpa = {{ min = 6.0, max = 12.0 }}
"""
        for zone in ZONES
    )
    head = """[routine]
name = "equivalence"
author = "tests"
version = "1"
device_kind = "massager"
category = "relaxation"
rationale = "Short steps so that every rule fires."
"""
    return parse_routine(head + steps, POLICY, label="equivalence")


ZONE_CODES = [0, int(p.Zone.CHEEK_LEFT), int(p.Zone.CHIN), int(p.Zone.FOREHEAD), 11, 14]
regime = st.tuples(
    st.integers(1, 400),  # length in samples
    # dapa: around the step band (6-12 kPa) and the zone caps (15 kPa; 25 kPa on the chin)
    st.sampled_from(
        [0, 300, 550, 599, 600, 601, 800, 900, 1000, 1200, 1201, 1400, 1500, 1501, 1600, 2500, 2600]
    ),
    st.sampled_from([True, True, True, False]),  # contact
    st.sampled_from(ZONE_CODES),
    st.sampled_from([3340, 3340, 4099, 4100, 4150, 4299, 4300]),  # centi-degC: warn 41, stop 43
    st.sampled_from([True, True, False]),  # motor on
    # how the pressure and flags move
    st.sampled_from(["steady", "jitter", "noisy", "flicker", "flicker"]),
)
DWELL = round(OUT_OF_BAND_WARNING_DWELL_S * RATE_HZ)  # in samples
# Raw pressures on either side of the band edges: the step's band (600-1200), the off-zone
# bands (300-1500 on the forehead and cheeks, 500-2500 on the chin, 50-500 on the neck).
EDGES = [299, 300, 499, 500, 501, 599, 600, 601, 1199, 1200, 1201, 1210, 1499, 1500, 2501]


def telemetry(regimes: list[tuple[int, int, bool, int, int, bool, str]], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for length, dapa, contact, zone, centi_c, motor, kind in regimes:
        part = np.zeros(length, dtype=p.MASSAGER_SAMPLE_DTYPE)
        part["pressure_dapa"] = dapa
        part["zone"] = zone
        part["skin_temperature_centi_c"] = centi_c
        part["flags"] = (MASSAGER_FLAG_CONTACT if contact else 0) | (
            MASSAGER_FLAG_MOTOR_ON if motor else 0
        )
        if kind == "jitter":  # a live sensor: a few counts of noise, flags steady
            part["pressure_dapa"] = np.clip(dapa + rng.integers(-3, 4, length), 0, None)
        elif kind == "noisy":  # everything changes every sample
            part["pressure_dapa"] = np.clip(dapa + rng.integers(-300, 300, length), 0, None)
            part["flags"] = rng.integers(0, 4, length)
            part["zone"] = rng.choice(ZONE_CODES, length)
        elif kind == "flicker":  # a band edge under a noisy load cell
            part["pressure_dapa"] = flicker(rng, dapa, length)
            if rng.random() < 0.5:  # now and then a sample off the skin
                part["flags"][rng.random(length) < 0.01] &= 0xFF ^ MASSAGER_FLAG_CONTACT
        part["battery_percent"] = 80
        parts.append(part)
    return np.concatenate(parts)


def flicker(rng: np.random.Generator, dapa: int, length: int) -> np.ndarray:
    """Pressure hopping between a few levels around band edges, in segments of 1 sample to
    a little over the dwell: mostly shorter than it, often within a sample of it."""
    levels = [dapa, *rng.choice(EDGES, int(rng.integers(1, 4)))]
    out = np.empty(length, dtype=np.int64)
    at = 0
    while at < length:
        pick = rng.random()
        if pick < 0.5:
            size = int(rng.integers(1, 6))  # noise around the edge
        elif pick < 0.8:
            size = int(rng.integers(DWELL - 2, DWELL + 3))  # just short of, at, past it
        else:
            size = int(rng.integers(1, 2 * DWELL))
        out[at : at + size] = levels[int(rng.integers(len(levels)))]
        at += size
    if rng.random() < 0.5:  # a few counts of noise on top
        out += rng.integers(-1, 2, length)
    return np.clip(out, 0, None)


def run(
    samples: np.ndarray,
    bounds: list[int],
    quiet_runs: bool,
    step_s: float,
    checks: bool,
    gaps: bool = False,
) -> MassageEngine:
    engine = MassageEngine(
        short_routine(step_s),
        POLICY,
        sample_rate_hz=RATE_HZ,
        fault_checks=FaultChecks(stuck_sensor_s=0.3, actuator_grace_s=0.2) if checks else None,
        quiet_runs=quiet_runs,
    )
    engine.start()
    sequence = 5000
    for batch, (start, end) in enumerate(itertools.pairwise(bounds)):
        if gaps and batch % 3 == 2:
            sequence += 1 + batch % 2  # a sample or two lost before this batch
        engine.feed(samples[start:end], sequence + start)
    NEXT_SEQUENCE[id(engine)] = sequence + (bounds[-1] if bounds else 0)
    return engine


# The sequence number that follows each engine's last batch (for the probes below).
NEXT_SEQUENCE: dict[int, int] = {}


def at_cuts(count: int, cuts: list[int]) -> list[int]:
    """Batch bounds: the stream cut at ``cuts`` (taken modulo its length)."""
    return [0, *sorted(c % (count + 1) for c in cuts), count]


def in_sizes(count: int, sizes: list[int]) -> list[int]:
    """Batch bounds: batches of ``sizes``, over and over, to the end of the stream."""
    bounds = [0]
    for size in itertools.cycle(sizes):
        if bounds[-1] >= count:
            break
        bounds.append(min(count, bounds[-1] + size))
    return bounds


def probe(dapa: int, zone: int, length: int) -> np.ndarray:
    samples = np.zeros(length, dtype=p.MASSAGER_SAMPLE_DTYPE)
    samples["pressure_dapa"] = dapa
    samples["zone"] = zone
    samples["skin_temperature_centi_c"] = 3340
    samples["flags"] = MASSAGER_FLAG_CONTACT | MASSAGER_FLAG_MOTOR_ON
    samples["battery_percent"] = 80
    return samples


def assert_same(engine: MassageEngine, reference: MassageEngine) -> None:
    assert engine.decisions == reference.decisions
    assert asdict(engine.summary) == asdict(reference.summary)
    assert engine.state is reference.state
    assert engine.finished == reference.finished
    assert engine.step_number == reference.step_number
    # What the engines carry on to the next samples (an excursion under way, the pass, the
    # counts toward each threshold) decides alike: the same samples after the stream, on
    # the step's zone and in the pressure state the stream ended in (in band otherwise),
    # get the same decisions from both. The engines are not used after this.
    following = NEXT_SEQUENCE[id(engine)]
    assert following == NEXT_SEQUENCE[id(reference)]
    code = ZONE_CODES_BY_NAME[engine.current_step.zone]
    dapa = {PressureState.TOO_LOW: 550, PressureState.TOO_HIGH: 1250}.get(engine.state, 900)
    tail = probe(dapa, code, 2 * DWELL + 1)
    for start in range(0, tail.shape[0], 7):
        engine.feed(tail[start : start + 7], following + start)
        reference.feed(tail[start : start + 7], following + start)
    assert engine.decisions == reference.decisions
    assert asdict(engine.summary) == asdict(reference.summary)
    assert engine.state is reference.state


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    regimes=st.lists(regime, min_size=1, max_size=14),
    cuts=st.lists(st.integers(0, 10_000), max_size=40),
    seed=st.integers(0, 2**32 - 1),
    step_s=st.sampled_from([1.0, 2.5]),
    checks=st.booleans(),
    gaps=st.sampled_from([False, False, True]),
)
def test_bulk_path_decides_exactly_as_the_per_sample_path(
    regimes: list[tuple[int, int, bool, int, int, bool, str]],
    cuts: list[int],
    seed: int,
    step_s: float,
    checks: bool,
    gaps: bool,
) -> None:
    samples = telemetry(regimes, seed)
    bounds = at_cuts(samples.shape[0], cuts)
    reference = run(samples, bounds, False, step_s, checks, gaps=gaps)
    assert_same(run(samples, bounds, True, step_s, checks, gaps=gaps), reference)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    regimes=st.lists(regime, min_size=1, max_size=14),
    # Mostly notification-sized batches (live streams: 10, 26 or 55 samples), some longer.
    sizes=st.lists(
        st.integers(1, 60) | st.sampled_from([10, 26, 55]) | st.integers(61, 1000),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**32 - 1),
    step_s=st.sampled_from([1.0, 2.5]),
    checks=st.booleans(),
    gaps=st.sampled_from([False, False, True]),
)
def test_small_batches_decide_exactly_as_the_per_sample_path(
    regimes: list[tuple[int, int, bool, int, int, bool, str]],
    sizes: list[int],
    seed: int,
    step_s: float,
    checks: bool,
    gaps: bool,
) -> None:
    samples = telemetry(regimes, seed)
    bounds = in_sizes(samples.shape[0], sizes)
    reference = run(samples, bounds, False, step_s, checks, gaps=gaps)
    assert_same(run(samples, bounds, True, step_s, checks, gaps=gaps), reference)


@settings(max_examples=500, deadline=None)
@given(
    threshold=st.floats(-1e4, 1e4, allow_nan=False)
    | st.integers(-10_000, 10_000).map(lambda n: n / 100),
    unit=st.sampled_from([0.01, 1 / 100, 1 / 50, 1 / 128, 1 / 3, 0.1]),
    offset=st.integers(-3, 3),
)
def test_raw_counts_compare_as_the_float_readings(
    threshold: float, unit: float, offset: int
) -> None:
    # The quiet window compares raw readings with these counts instead of readings in
    # units with the policy's limits: the same answers for every count around the boundary.
    for first, holds in (
        (first_count_at_least(threshold, unit), lambda n: n * unit >= threshold),
        (first_count_above(threshold, unit), lambda n: n * unit > threshold),
    ):
        assert holds(first)
        assert not holds(first - 1)
        n = first + offset
        assert holds(n) == (n >= first)


# Samples for the fault checks: a few raw readings (0 is a motor at rest) and flags, in runs
# of one (reading, flag), so that runs as long as the thresholds come up often.
fault_samples = st.lists(
    st.tuples(st.sampled_from([0, 7, 7, 8]), st.booleans(), st.integers(1, 14)), max_size=16
).map(lambda runs: [(raw, active) for raw, active, length in runs for _ in range(length)])


@settings(max_examples=500, deadline=None)
@given(samples=fault_samples, threshold_s=st.sampled_from([0.02, 0.05, 0.1]))
def test_the_stuck_sensor_is_stuck_after_one_active_reading_for_its_whole_time(
    samples: list[tuple[int, bool]], threshold_s: float
) -> None:
    # The verdicts against the rule as stated: the first STUCK comes on the first sample that
    # ends ``threshold`` samples in a row with the motor on the skin and one nonzero reading;
    # then STILL_STUCK while the reading stays, RECOVERED on the first that moves.
    detector = StuckSensorDetector(RATE_HZ, threshold_s)
    threshold = detector.threshold_samples
    verdicts = [detector.update(raw, active) for raw, active in samples]
    stuck_at = next(
        (
            k
            for k in range(threshold - 1, len(samples))
            if all(
                active and raw == samples[k][0] != 0
                for raw, active in samples[k - threshold + 1 : k + 1]
            )
        ),
        None,
    )
    if stuck_at is None:
        assert set(verdicts) <= {SensorVerdict.OK}
        return
    assert verdicts[:stuck_at] == [SensorVerdict.OK] * stuck_at
    assert verdicts[stuck_at] is SensorVerdict.STUCK
    value = samples[stuck_at][0]
    moved = next((k for k in range(stuck_at + 1, len(samples)) if samples[k][0] != value), None)
    end = len(samples) if moved is None else moved
    assert verdicts[stuck_at + 1 : end] == [SensorVerdict.STILL_STUCK] * (end - stuck_at - 1)
    if moved is not None:
        assert verdicts[moved] is SensorVerdict.RECOVERED


@settings(max_examples=500, deadline=None)
@given(
    samples=fault_samples,
    threshold_s=st.sampled_from([0.02, 0.05, 0.1, 0.3]),
    cuts=st.lists(st.integers(1, 40), max_size=30),
)
def test_the_stuck_sensor_gives_the_same_verdicts_on_samples_fed_together(
    samples: list[tuple[int, bool]], threshold_s: float, cuts: list[int]
) -> None:
    # feed() on several samples at once (short ones take the shortcut that counts only the
    # run they end on) against the same samples one at a time.
    one_by_one = StuckSensorDetector(RATE_HZ, threshold_s)
    expected = [one_by_one.update(raw, active) for raw, active in samples]
    together = StuckSensorDetector(RATE_HZ, threshold_s)
    verdicts: list[SensorVerdict] = []
    sizes = itertools.cycle(cuts or [len(samples) or 1])
    start = 0
    while start < len(samples):
        chunk = samples[start : start + next(sizes)]
        taken, verdict = together.feed([raw for raw, _ in chunk], [on for _, on in chunk])
        assert 1 <= taken <= len(chunk)
        verdicts += [SensorVerdict.OK] * (taken - 1) + [verdict]
        start += taken
    assert verdicts == expected
    assert (together.value, together.stuck) == (one_by_one.value, one_by_one.stuck)


@settings(max_examples=500, deadline=None)
@given(
    samples=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=80),
    grace_s=st.sampled_from([0.01, 0.05, 0.1]),
)
def test_the_actuator_watch_reports_once_when_the_motor_stays_off_for_its_grace(
    samples: list[tuple[bool, bool]], grace_s: float
) -> None:
    # Against the rule as stated: one report, on the first sample that ends ``grace``
    # samples in a row with the motor wanted on and reported off.
    watch = ActuatorWatch(RATE_HZ, grace_s)
    grace = watch.grace_samples
    reports = [watch.update(wanted, on) for wanted, on in samples]
    first = next(
        (
            k
            for k in range(grace - 1, len(samples))
            if all(wanted and not on for wanted, on in samples[k - grace + 1 : k + 1])
        ),
        None,
    )
    assert reports == [k == first for k in range(len(samples))]


def test_a_clean_stream_takes_quiet_runs_and_matches() -> None:
    # Long in-band runs on each step's zone, in live 10-sample batches: the common case.
    # A short stroke on the neck between the two cheek_left steps starts a new pass.
    regimes = [
        (260, 900, True, 4, 3340, True, "jitter"),
        (5, 400, True, 11, 3340, True, "jitter"),
        *((260, 900, True, code, 3340, True, "jitter") for code in (4, 10, 1, 9)),
    ]
    samples = telemetry(regimes, 1)
    bounds = in_sizes(samples.shape[0], [10])
    reference = run(samples, bounds, False, 2.5, True)
    engine = run(samples, bounds, True, 2.5, True)
    reasons = [d.reason for d in engine.decisions]
    assert reasons.count("step_done") == 4
    assert reasons[-1] == "complete"
    assert_same(engine, reference)


def test_the_session_cap_stops_a_quiet_run_at_its_sample() -> None:
    # Paused off the skin until just before the 15 s cap, then in band on the step's zone.
    regimes = [(1490, 0, False, 4, 3340, True, "steady"), (40, 900, True, 4, 3340, True, "jitter")]
    samples = telemetry(regimes, 2)
    bounds = at_cuts(samples.shape[0], [700, 1495])
    reference = run(samples, bounds, False, 2.5, True)
    engine = run(samples, bounds, True, 2.5, True)
    assert engine.decisions[-1].reason == "session_length"
    assert_same(engine, reference)


def test_the_zone_session_cap_ends_a_quiet_run_at_its_sample() -> None:
    # Half a second on the chin during step 1 counts there; when step 3 (chin) comes, its
    # quiet run stops at the chin's 2.6 s cap, 2.1 s in, and the step ends.
    regimes = [
        (50, 900, True, 10, 3340, True, "jitter"),
        (250, 900, True, 4, 3340, True, "jitter"),
        (5, 400, True, 11, 3340, True, "jitter"),  # a new pass before step 2
        (250, 900, True, 4, 3340, True, "jitter"),
        (300, 900, True, 10, 3340, True, "jitter"),
    ]
    samples = telemetry(regimes, 4)
    bounds = in_sizes(samples.shape[0], [10, 26, 300])
    reference = run(samples, bounds, False, 2.5, True)
    engine = run(samples, bounds, True, 2.5, True)
    stop = [d for d in engine.decisions if d.reason == "zone_session"]
    assert [(d.kind.value, d.step, d.sequence) for d in stop] == [("stop_step", 3, 5000 + 765)]
    assert engine.summary.steps_contact_samples == 250 + 250 + 210
    assert_same(engine, reference)


def test_the_pass_cap_ends_a_quiet_run_at_its_sample() -> None:
    # Steps 1 and 2 are both on cheek_left: one pass of 3 s spans them.
    regimes = [(400, 900, True, 4, 3340, True, "jitter")]
    samples = telemetry(regimes, 3)
    bounds = at_cuts(samples.shape[0], [100, 290, 305])
    reference = run(samples, bounds, False, 2.5, True)
    engine = run(samples, bounds, True, 2.5, True)
    assert [d.reason for d in engine.decisions][-1] == "zone_time"
    assert_same(engine, reference)


@pytest.mark.parametrize("sizes", [[10], [7, 13], [1000]])
def test_a_pass_off_the_steps_zone_takes_quiet_runs_and_matches(sizes: list[int]) -> None:
    # During step 1 (cheek_left) the head rests on the neck (band 0.5-5 kPa, session cap
    # 2.6 s in the short policy): in its band, then too low past the warning's dwell, then
    # in band until the neck has had its session; then back on the step's zone. Only the
    # step's zone counts toward the step; every neck sample counts toward the neck.
    regimes = [
        (120, 300, True, int(p.Zone.NECK), 3340, True, "jitter"),
        (40, 30, True, int(p.Zone.NECK), 3340, True, "jitter"),
        (150, 300, True, int(p.Zone.NECK), 3340, True, "jitter"),
        (260, 900, True, int(p.Zone.CHEEK_LEFT), 3340, True, "jitter"),
    ]
    samples = telemetry(regimes, 5)
    bounds = in_sizes(samples.shape[0], sizes)
    reference = run(samples, bounds, False, 2.5, True)
    engine = run(samples, bounds, True, 2.5, True)
    reasons = [d.reason for d in engine.decisions]
    assert reasons.count("wrong_zone") == 1
    assert "pressure_too_low" in reasons
    # The neck's session cap pauses the motor; back on the step's zone it resumes.
    spent = [(d.kind.value, d.sequence) for d in engine.decisions if d.reason == "zone_session"]
    assert [kind for kind, _ in spent] == ["pause", "resume"]
    assert spent[0][1] == 5000 + 120 + 40 + 100
    assert "step_done" in reasons
    assert engine.summary.contact_samples_by_zone["neck"] == 260
    assert_same(engine, reference)


@pytest.mark.parametrize("sizes", [[10], [7, 13], [1000]])
def test_excursions_around_the_dwell_warn_at_the_same_sample(sizes: list[int]) -> None:
    # On step 1's zone (6-12 kPa): excursions of DWELL - 1, DWELL and DWELL + 1 samples, a
    # short one and a long one, too high and too low, with a few samples in band between.
    high, low, band = 1250, 550, 900
    parts = [(50, band), (DWELL - 1, high), (1, band), (DWELL, low), (3, band)]
    parts += [(DWELL + 1, high), (2, band), (5, low), (1, band), (60, high)]
    regimes = [(length, dapa, True, 4, 3340, True, "jitter") for length, dapa in parts]
    samples = telemetry(regimes, 4)
    bounds = in_sizes(samples.shape[0], sizes)
    reference = run(samples, bounds, False, 2.5, True)
    engine = run(samples, bounds, True, 2.5, True)
    warnings = [(d.reason, d.sequence) for d in engine.decisions if d.kind == "warning"]
    starts = list(itertools.accumulate([5000] + [length for length, _ in parts]))
    assert warnings == [
        ("pressure_too_low", starts[3] + DWELL - 1),
        ("pressure_too_high", starts[5] + DWELL - 1),
        ("pressure_too_high", starts[9] + DWELL - 1),
    ]
    assert engine.summary.out_of_band_events == 3
    assert_same(engine, reference)
