"""Host-side detection of device faults (pure parts) and their place in the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import protocols as p
from devicebridge.core.engine import DecisionKind, MassageEngine
from devicebridge.core.faults_detect import (
    ActuatorWatch,
    ClockDriftEstimator,
    FaultChecks,
    RestartDetector,
    SensorVerdict,
    StuckSensorDetector,
)
from devicebridge.core.policy import default_policy
from devicebridge.core.reassembly import GapReason, TelemetryGap, TelemetryReassembler
from devicebridge.core.routine import parse_routine
from tests.qa.conftest import SHORT_ROUTINE

RATE_HZ = 100


def test_stuck_sensor_needs_the_same_raw_value_for_the_whole_time_with_the_motor_on() -> None:
    detector = StuckSensorDetector(RATE_HZ, stuck_after_s=1.0)
    verdicts = [detector.update(500, motor_on_skin=True) for _ in range(100)]
    assert verdicts[-1] is SensorVerdict.STUCK
    assert verdicts[:-1] == [SensorVerdict.OK] * 99
    assert detector.update(500, True) is SensorVerdict.STILL_STUCK
    assert detector.update(503, True) is SensorVerdict.RECOVERED
    # Motor off, or off the skin: a steady reading is normal.
    quiet = StuckSensorDetector(RATE_HZ, stuck_after_s=1.0)
    assert {quiet.update(500, False) for _ in range(500)} == {SensorVerdict.OK}


def test_actuator_watch_reports_once_after_the_grace_time() -> None:
    watch = ActuatorWatch(RATE_HZ, grace_s=0.5)
    results = [watch.update(wanted_on=True, motor_on=False) for _ in range(100)]
    assert results.count(True) == 1
    assert results.index(True) == 49
    fresh = ActuatorWatch(RATE_HZ, grace_s=0.5)
    assert not any(fresh.update(True, True) for _ in range(100))


def test_restart_detector_tells_a_restarted_counter_from_reordering() -> None:
    detector = RestartDetector(RATE_HZ)
    assert not detector.restarted(990, 1000)  # a reordered batch, just behind
    assert detector.restarted(10, 5000)  # more than 10 s behind: the counter restarted
    detector.on_link_reset()
    assert detector.restarted(900, 1000)  # after a reconnect, any step back is a restart
    assert not detector.restarted(1000, 1000)


def test_clock_drift_is_estimated_from_live_batches() -> None:
    estimator = ClockDriftEstimator(RATE_HZ)
    for tick in range(400):  # 40 s of host time, the device 2 % fast
        estimator.feed(tick * 0.1, round(tick * 0.1 * 1.02 * RATE_HZ))
    assert estimator.drift_ppm is not None
    assert abs(estimator.drift_ppm - 20_000) < 200
    assert estimator.significant


def test_reassembler_on_restart_loses_pending_ranges_and_delivers_held_samples() -> None:
    reassembler = TelemetryReassembler(sample_rate_hz=RATE_HZ)
    samples = np.zeros(10, dtype=p.MASSAGER_SAMPLE_DTYPE)
    batch = lambda first: p.TelemetryBatch(p.SampleFormat.MASSAGER_V1, first, 0, samples)  # noqa: E731
    reassembler.on_live(batch(0))
    held = reassembler.on_live(batch(20))  # 10..19 missing: 20..29 is held back
    assert held == []
    items = reassembler.on_device_restart(GapReason.DEVICE_REBOOTED)
    gaps = [i for i in items if isinstance(i, TelemetryGap)]
    assert [(g.first_sequence, g.sample_count, g.reason) for g in gaps] == [
        (10, 10, GapReason.DEVICE_REBOOTED),
        (30, 0, GapReason.DEVICE_REBOOTED),
    ]
    assert [i.first_sequence for i in items if isinstance(i, p.TelemetryBatch)] == [20]
    # The restarted counter is a new baseline, not a duplicate of what came before.
    assert [i.first_sequence for i in reassembler.on_live(batch(0))] == [0]


def routine_engine(checks: FaultChecks | None) -> MassageEngine:
    routine = parse_routine(Path(SHORT_ROUTINE).read_text("utf-8"), default_policy())
    return MassageEngine(routine, default_policy(), sample_rate_hz=RATE_HZ, fault_checks=checks)


def cheek_samples(seconds: float, *, raw: int | None = None, motor: bool = True) -> np.ndarray:
    count = round(seconds * RATE_HZ)
    rng = np.random.default_rng(0)
    samples = np.zeros(count, dtype=p.MASSAGER_SAMPLE_DTYPE)
    samples["pressure_dapa"] = raw if raw is not None else 800 + rng.integers(-5, 6, count)
    samples["skin_temperature_centi_c"] = 3340
    samples["zone"] = int(p.Zone.CHEEK_LEFT)
    samples["flags"] = 0x01 | (0x02 if motor else 0)
    return samples


def test_engine_pauses_on_a_stuck_sensor_and_resumes_when_it_reads_again() -> None:
    engine = routine_engine(FaultChecks())
    engine.start()
    decisions = engine.feed(cheek_samples(2.0), 0)
    decisions += engine.feed(cheek_samples(4.0, raw=800), 200)
    pauses = [d for d in decisions if d.kind is DecisionKind.PAUSE]
    assert [d.reason for d in pauses] == ["sensor_stuck"]
    assert "stuck" in pauses[0].message
    assert "restart the device" in pauses[0].message
    assert engine.paused
    resumed = engine.feed(cheek_samples(1.0), 600)
    assert [d.kind for d in resumed][:1] == [DecisionKind.RESUME]


def test_engine_stops_when_the_motor_never_starts() -> None:
    engine = routine_engine(FaultChecks())
    engine.start()
    decisions = engine.feed(cheek_samples(3.0, motor=False), 0)
    assert [(d.kind, d.reason) for d in decisions if d.kind is DecisionKind.STOP] == [
        (DecisionKind.STOP, "command_not_applied")
    ]
    assert engine.finished


def test_engine_without_fault_checks_judges_the_policy_alone() -> None:
    engine = routine_engine(None)
    engine.start()
    decisions = engine.feed(cheek_samples(6.0, raw=800, motor=False), 0)
    assert all(d.reason not in ("sensor_stuck", "command_not_applied") for d in decisions)
