"""The engine's bulk path against its per-sample reference: the very same decisions and sums.

Random telemetry made of regimes (steady runs, as real hands give, with random pressure,
contact, zone, temperature and motor flags, and noisy stretches that change every sample)
is cut into random batches and fed to ``MassageEngine(vectorised=True)`` and to the
sample-by-sample reference ``MassageEngine(vectorised=False)``. A policy with short caps
makes every rule fire inside a few thousand samples: pass caps, no-contact pauses, the
session cap, step ends, temperature warn and stop, the stuck sensor and the actuator watch.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocols as p
from devicebridge.core.engine import CONTACT_FLAG, MOTOR_FLAG, MassageEngine
from devicebridge.core.faults_detect import FaultChecks
from devicebridge.core.policy import SafetyPolicy, default_policy_text, parse_policy
from devicebridge.core.routine import Routine, parse_routine

RATE_HZ = 100
# cheek_left twice: one pass runs on across a step end, into the pass cap.
ZONES = ("cheek_left", "cheek_left", "chin", "forehead", "jawline_right")


def short_policy() -> SafetyPolicy:
    text = (
        default_policy_text()
        .replace("pass_cap_s = { value = 60,", "pass_cap_s = { value = 3,")
        .replace("pass_cap_s = { value = 45,", "pass_cap_s = { value = 2.5,")
        .replace("massage_length_cap_s = { value = 1200,", "massage_length_cap_s = { value = 15,")
        .replace("no_contact_pause_s = { value = 3.0,", "no_contact_pause_s = { value = 0.5,")
    )
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
    st.sampled_from([0, 300, 550, 600, 601, 800, 900, 1000, 1200, 1201, 1400, 1600, 2600]),  # dapa
    st.sampled_from([True, True, True, False]),  # contact
    st.sampled_from(ZONE_CODES),
    st.sampled_from([3340, 3340, 4100, 4150, 4300]),  # centi-degC
    st.sampled_from([True, True, False]),  # motor on
    st.sampled_from(["steady", "jitter", "noisy"]),  # how the pressure and flags move
)


def telemetry(regimes: list[tuple[int, int, bool, int, int, bool, str]], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for length, dapa, contact, zone, centi_c, motor, kind in regimes:
        part = np.zeros(length, dtype=p.MASSAGER_SAMPLE_DTYPE)
        part["pressure_dapa"] = dapa
        part["zone"] = zone
        part["skin_temperature_centi_c"] = centi_c
        part["flags"] = (CONTACT_FLAG if contact else 0) | (MOTOR_FLAG if motor else 0)
        if kind == "jitter":  # a live sensor: a few counts of noise, flags steady
            part["pressure_dapa"] = np.clip(dapa + rng.integers(-3, 4, length), 0, None)
        elif kind == "noisy":  # everything changes every sample
            part["pressure_dapa"] = np.clip(dapa + rng.integers(-300, 300, length), 0, None)
            part["flags"] = rng.integers(0, 4, length)
            part["zone"] = rng.choice(ZONE_CODES, length)
        part["battery_percent"] = 80
        parts.append(part)
    return np.concatenate(parts)


def run(
    samples: np.ndarray, cuts: list[int], vectorised: bool, step_s: float, checks: bool
) -> MassageEngine:
    engine = MassageEngine(
        short_routine(step_s),
        POLICY,
        sample_rate_hz=RATE_HZ,
        fault_checks=FaultChecks(stuck_sensor_s=0.3, actuator_grace_s=0.2) if checks else None,
        vectorised=vectorised,
    )
    engine.bulk_min_samples = 1  # every batch through the bulk path, however small
    engine.start()
    sequence = 5000
    bounds = [0, *sorted(c % (samples.shape[0] + 1) for c in cuts), samples.shape[0]]
    for start, end in itertools.pairwise(bounds):
        engine.feed(samples[start:end], sequence + start)
    return engine


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    regimes=st.lists(regime, min_size=1, max_size=14),
    cuts=st.lists(st.integers(0, 10_000), max_size=40),
    seed=st.integers(0, 2**32 - 1),
    step_s=st.sampled_from([1.0, 2.5]),
    checks=st.booleans(),
)
def test_bulk_path_decides_exactly_as_the_per_sample_path(
    regimes: list[tuple[int, int, bool, int, int, bool, str]],
    cuts: list[int],
    seed: int,
    step_s: float,
    checks: bool,
) -> None:
    samples = telemetry(regimes, seed)
    reference = run(samples, cuts, False, step_s, checks)
    bulk = run(samples, cuts, True, step_s, checks)
    assert bulk.decisions == reference.decisions
    assert asdict(bulk.summary) == asdict(reference.summary)
    assert bulk.state is reference.state
    assert bulk.finished == reference.finished
    assert bulk.step_number == reference.step_number


def test_a_clean_stream_takes_the_bulk_path_and_matches() -> None:
    # Long in-band runs on each step's zone: the common case the bulk path is for.
    # A short stroke on the neck between the two cheek_left steps starts a new pass.
    regimes = [
        (260, 900, True, 4, 3340, True, "jitter"),
        (5, 400, True, 11, 3340, True, "jitter"),
        *((260, 900, True, code, 3340, True, "jitter") for code in (4, 10, 1, 9)),
    ]
    samples = telemetry(regimes, 1)
    cuts = list(range(10, samples.shape[0], 10))
    reference = run(samples, cuts, False, 2.5, True)
    bulk = run(samples, cuts, True, 2.5, True)
    reasons = [d.reason for d in bulk.decisions]
    assert reasons.count("step_done") == 4
    assert reasons[-1] == "complete"
    assert bulk.decisions == reference.decisions
    assert bulk.summary == reference.summary


def test_the_session_cap_stops_a_quiet_run_at_its_sample() -> None:
    # Paused off the skin until just before the 15 s cap, then in band on the step's zone.
    regimes = [(1490, 0, False, 4, 3340, True, "steady"), (40, 900, True, 4, 3340, True, "jitter")]
    samples = telemetry(regimes, 2)
    reference = run(samples, [700, 1495], False, 2.5, True)
    bulk = run(samples, [700, 1495], True, 2.5, True)
    assert bulk.decisions[-1].reason == "session_length"
    assert bulk.decisions == reference.decisions
    assert bulk.summary == reference.summary


def test_the_pass_cap_ends_a_quiet_run_at_its_sample() -> None:
    # Steps 1 and 2 are both on cheek_left: one pass of 3 s spans them.
    regimes = [(400, 900, True, 4, 3340, True, "jitter")]
    samples = telemetry(regimes, 3)
    reference = run(samples, [100, 290, 305], False, 2.5, True)
    bulk = run(samples, [100, 290, 305], True, 2.5, True)
    assert [d.reason for d in bulk.decisions][-1] == "zone_time"
    assert bulk.decisions == reference.decisions
    assert bulk.summary == reference.summary
