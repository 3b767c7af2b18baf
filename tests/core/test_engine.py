"""The enforcement engine on synthetic telemetry: decisions at exact sample times."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

import protocols as p
from devicebridge.core.engine import (
    OUT_OF_BAND_WARNING_DWELL_S,
    DecisionKind,
    LedEngine,
    MassageEngine,
    PressureState,
)
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import Routine, parse_routine

RATE_HZ = 100
DT_S = 1 / RATE_HZ
DWELL = round(OUT_OF_BAND_WARNING_DWELL_S * RATE_HZ)  # 30 samples
ROUTINES = resources.files("devicebridge") / "data" / "routines"


def routine(name: str) -> Routine:
    return parse_routine((ROUTINES / name).read_text("utf-8"), default_policy(), label=name)


def massager_samples(
    seconds: float,
    *,
    pressure_kpa: float,
    zone: p.Zone,
    contact: bool = True,
    temperature_c: float = 33.4,
) -> np.ndarray:
    count = round(seconds * RATE_HZ)
    samples = np.zeros(count, dtype=p.MASSAGER_SAMPLE_DTYPE)
    samples["pressure_dapa"] = round(pressure_kpa * 100)
    samples["skin_temperature_centi_c"] = round(temperature_c * 100)
    samples["zone"] = int(zone)
    samples["flags"] = 0x03 if contact else 0x02
    samples["battery_percent"] = 90
    return samples


class Feeder:
    """Feeds 10-sample batches with contiguous sequence numbers, like a device would."""

    def __init__(self, engine: MassageEngine | LedEngine) -> None:
        self.engine = engine
        self.sequence = 1000

    def feed(self, samples: np.ndarray) -> list:
        decisions = []
        for start in range(0, samples.shape[0], 10):
            batch = samples[start : start + 10]
            decisions += self.engine.feed(batch, self.sequence)
            self.sequence += batch.shape[0]
        return decisions


def test_in_band_contact_completes_each_step_at_its_contact_time() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    start = engine.start()
    assert start[0].kind is DecisionKind.GUIDANCE
    assert start[0].zone == "cheek_left"
    feeder = Feeder(engine)
    decisions = feeder.feed(massager_samples(60, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    assert [(d.kind, d.at_s, d.zone) for d in decisions] == [
        (DecisionKind.NEXT_STEP, pytest.approx(59.99), "cheek_right")
    ]
    assert engine.summary.time_in_band_s == pytest.approx(60)


def test_contact_time_counts_only_on_the_skin() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    feeder.feed(massager_samples(30, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    lifted = feeder.feed(massager_samples(2, pressure_kpa=0, zone=p.Zone.CHEEK_LEFT, contact=False))
    assert lifted == []  # 2 s off the skin: under the 3 s pause threshold
    decisions = feeder.feed(massager_samples(30, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    # 30 s + 30 s of contact: the step ends 2 s later in session time than without the lift.
    assert decisions[-1].kind is DecisionKind.NEXT_STEP
    assert decisions[-1].at_s == pytest.approx(61.99)
    assert engine.summary.contact_s_by_zone["cheek_left"] == pytest.approx(60)


def test_drifting_out_of_contact_pauses_after_three_seconds_and_resumes() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    feeder.feed(massager_samples(10, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    off = feeder.feed(massager_samples(5, pressure_kpa=0, zone=p.Zone.CHEEK_LEFT, contact=False))
    assert [(d.kind, d.reason) for d in off] == [(DecisionKind.PAUSE, "no_contact")]
    assert off[0].at_s == pytest.approx(10 + 3 - DT_S)
    assert off[0].rule is not None
    assert "session.no_contact_pause_s" in off[0].rule
    back = feeder.feed(massager_samples(1, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    assert [(d.kind, d.at_s) for d in back] == [(DecisionKind.RESUME, pytest.approx(15.0))]


def test_pressing_too_hard_on_the_eye_area_stops_the_motor_at_once() -> None:
    engine = MassageEngine(
        routine("lymphatic_drainage.toml"), default_policy(), sample_rate_hz=RATE_HZ
    )
    feeder = Feeder(engine)
    feeder.feed(massager_samples(45, pressure_kpa=2, zone=p.Zone.FOREHEAD))
    assert engine.current_step.zone == "eye_area_left"
    feeder.feed(massager_samples(5, pressure_kpa=1.5, zone=p.Zone.EYE_AREA_LEFT))
    too_hard = feeder.feed(massager_samples(0.5, pressure_kpa=6, zone=p.Zone.EYE_AREA_LEFT))
    assert [(d.kind, d.reason) for d in too_hard] == [(DecisionKind.PAUSE, "pressure_cap")]
    assert too_hard[0].at_s == pytest.approx(50.0)  # the very first sample above the cap
    assert too_hard[0].sequence == 1000 + 5000
    assert too_hard[0].rule is not None
    assert too_hard[0].rule.startswith("zones.eye_area.cap_kpa = 4")
    lighter = feeder.feed(massager_samples(1, pressure_kpa=1.5, zone=p.Zone.EYE_AREA_LEFT))
    assert lighter[0].kind is DecisionKind.RESUME
    # The third time above the cap ends the session.
    feeder.feed(massager_samples(0.1, pressure_kpa=6, zone=p.Zone.EYE_AREA_LEFT))
    feeder.feed(massager_samples(0.1, pressure_kpa=1.5, zone=p.Zone.EYE_AREA_LEFT))
    third = feeder.feed(massager_samples(0.1, pressure_kpa=6, zone=p.Zone.EYE_AREA_LEFT))
    assert third[0].kind is DecisionKind.STOP
    assert third[0].reason == "pressure_cap_repeated"
    assert engine.finished
    assert engine.summary.cap_events == 3


def test_out_of_band_pressure_warns_once_per_sustained_excursion() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    # 2 s too low, then 2 s too high (below the 15 kPa cap): two excursions past the dwell.
    low = feeder.feed(massager_samples(2, pressure_kpa=2, zone=p.Zone.CHEEK_LEFT))
    high = feeder.feed(massager_samples(2, pressure_kpa=14, zone=p.Zone.CHEEK_LEFT))
    assert [d.reason for d in low] == ["pressure_too_low"]
    assert [d.reason for d in high] == ["pressure_too_high"]
    assert "press lighter" in high[0].message
    assert engine.summary.out_of_band_events == 2
    assert engine.summary.time_in_band_s == 0


def cheek_samples(dapa: list[int] | np.ndarray) -> np.ndarray:
    """On the left cheek (firming step 1: 4-12 kPa, cap 15 kPa), one raw pressure a sample."""
    samples = massager_samples(len(dapa) / RATE_HZ, pressure_kpa=0, zone=p.Zone.CHEEK_LEFT)
    samples["pressure_dapa"] = dapa
    return samples


def firming(quiet_runs: bool) -> MassageEngine:
    return MassageEngine(
        routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ, quiet_runs=quiet_runs
    )


@pytest.mark.parametrize("quiet_runs", [True, False])
def test_flicker_above_the_band_shorter_than_the_dwell_gives_no_warning(quiet_runs: bool) -> None:
    # A hand at the band's top edge: the load cell's noise crosses 12 kPa every few samples,
    # in excursions of 1 to DWELL - 1 samples (up to 0.29 s), across the 10-sample batches.
    rng = np.random.default_rng(7)
    dapa: list[int] = []
    out_of_band = 0
    for _ in range(60):
        dapa += [1195] * int(rng.integers(1, 6))  # in band
        above = int(rng.integers(1, DWELL))
        dapa += [1210] * above
        out_of_band += above
    dapa += [1195] * 3 + [1210] * (DWELL - 1) + [1195] * 5  # the longest without a warning
    out_of_band += DWELL - 1
    engine = firming(quiet_runs)
    feeder = Feeder(engine)
    seen = set()
    for start in range(0, len(dapa), 10):
        assert feeder.feed(cheek_samples(dapa[start : start + 10])) == []
        seen.add(engine.state)
    assert engine.summary.out_of_band_events == 0
    # The state follows every crossing at once: time in band leaves the samples above it out.
    assert PressureState.TOO_HIGH in seen
    assert engine.summary.contact_s == pytest.approx(len(dapa) * DT_S)
    assert engine.summary.time_in_band_s == pytest.approx((len(dapa) - out_of_band) * DT_S)


@pytest.mark.parametrize("quiet_runs", [True, False])
def test_a_sustained_excursion_warns_once_when_it_reaches_the_dwell(quiet_runs: bool) -> None:
    engine = firming(quiet_runs)
    feeder = Feeder(engine)
    assert feeder.feed(cheek_samples([800] * 100)) == []  # 1 s in band
    # Just short of the dwell, one sample back in band: no warning, and the count restarts.
    assert feeder.feed(cheek_samples([1250] * (DWELL - 1) + [1100] * 11)) == []
    # Then 2 s too high, pressing harder and harder (12.1 kPa up, below the 15 kPa cap).
    first = 100 + DWELL - 1 + 11
    ramp = [1210 + k for k in range(200)]
    decisions = feeder.feed(cheek_samples(ramp[:10]))
    assert decisions == []
    assert engine.state is PressureState.TOO_HIGH  # the state changes at once
    decisions += feeder.feed(cheek_samples(ramp[10:]))
    assert [(d.kind, d.reason) for d in decisions] == [(DecisionKind.WARNING, "pressure_too_high")]
    warning = decisions[0]
    # On the excursion's 30th sample (0.3 s of it), with that sample's pressure.
    assert warning.sequence == 1000 + first + DWELL - 1
    assert warning.at_s == pytest.approx((first + DWELL - 1) * DT_S)
    assert warning.message.startswith(f"{ramp[DWELL - 1] / 100:.1f} kPa on cheek_left")
    assert engine.summary.out_of_band_events == 1
    assert engine.summary.time_in_band_s == pytest.approx((100 + 11) * DT_S)


@pytest.mark.parametrize("quiet_runs", [True, False])
def test_the_cap_pauses_on_the_first_sample_above_it_without_a_dwell(quiet_runs: bool) -> None:
    engine = firming(quiet_runs)
    feeder = Feeder(engine)
    # In band, then a few samples too high, then one sample above the 15 kPa cap.
    decisions = feeder.feed(cheek_samples([800] * 95 + [1300] * 5 + [1510] + [1300] * 4))
    assert [(d.kind, d.reason, d.sequence) for d in decisions] == [
        (DecisionKind.PAUSE, "pressure_cap", 1000 + 100),  # the very first sample above it
        (DecisionKind.RESUME, "pressure_cap", 1000 + 101),
    ]
    assert decisions[0].at_s == pytest.approx(1.0)
    assert engine.summary.cap_events == 1
    assert engine.summary.out_of_band_events == 0


def test_staying_too_long_on_one_zone_pauses_until_the_head_moves() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    feeder.feed(massager_samples(60, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    # The routine moved on to cheek_right but the hand stays on the left cheek.
    stay = feeder.feed(massager_samples(5, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    assert [(d.kind, d.reason) for d in stay] == [
        (DecisionKind.GUIDANCE, "wrong_zone"),
        (DecisionKind.PAUSE, "zone_time"),
    ]
    assert stay[1].at_s == pytest.approx(60.0)  # the 61st second on the left cheek
    moved = feeder.feed(massager_samples(1, pressure_kpa=8, zone=p.Zone.CHEEK_RIGHT))
    assert moved[0].kind is DecisionKind.RESUME


def test_skin_temperature_warn_lowers_intensity_and_stop_ends_the_step() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    warm = feeder.feed(
        massager_samples(1, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT, temperature_c=41.5)
    )
    assert [(d.kind, d.intensity) for d in warm] == [(DecisionKind.LOWER_INTENSITY, 2)]
    hot = feeder.feed(
        massager_samples(1, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT, temperature_c=43.2)
    )
    assert hot[0].kind is DecisionKind.STOP_STEP
    assert hot[0].reason == "over_temperature"
    assert engine.current_step.zone == "cheek_right"


def test_session_length_cap_stops() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    decisions = feeder.feed(
        massager_samples(1201, pressure_kpa=0, zone=p.Zone.CHEEK_LEFT, contact=False)
    )
    assert decisions[-1].kind is DecisionKind.STOP
    assert decisions[-1].reason == "session_length"
    assert decisions[-1].at_s == pytest.approx(1200)


def test_whole_routine_completes() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    zones = [
        p.Zone.CHEEK_LEFT,
        p.Zone.CHEEK_RIGHT,
        p.Zone.JAWLINE_LEFT,
        p.Zone.JAWLINE_RIGHT,
        p.Zone.CHIN,
    ]
    for zone, seconds, kpa in zip(zones, (60, 60, 60, 60, 45), (8, 8, 10, 10, 10), strict=True):
        feeder.feed(massager_samples(seconds, pressure_kpa=kpa, zone=zone))
    assert engine.finished
    assert engine.summary.completed
    assert engine.summary.completion == 1.0
    assert engine.decisions[-1].kind is DecisionKind.COMPLETE


def mask_samples(
    seconds: float, *, red: float, nir: float = 0, blue: float = 0, temperature_c: float = 34
) -> np.ndarray:
    count = round(seconds * RATE_HZ)
    samples = np.zeros(count, dtype=p.LED_MASK_SAMPLE_DTYPE)
    samples["red_centi_mw_cm2"] = round(red * 100)
    samples["near_infrared_centi_mw_cm2"] = round(nir * 100)
    samples["blue_centi_mw_cm2"] = round(blue * 100)
    samples["skin_temperature_centi_c"] = round(temperature_c * 100)
    samples["flags"] = 0x03
    return samples


def test_led_dose_is_integrated_and_the_step_completes() -> None:
    engine = LedEngine(
        routine("led_red_near_infrared.toml"), default_policy(), sample_rate_hz=RATE_HZ
    )
    engine.start()
    decisions = Feeder(engine).feed(mask_samples(600, red=15, nir=10))
    assert decisions[-1].kind is DecisionKind.COMPLETE
    assert engine.summary.dose_j_cm2["red"] == pytest.approx(9.0)
    assert engine.summary.dose_j_cm2["near_infrared"] == pytest.approx(6.0)


def test_led_step_that_would_exceed_the_daily_cap_stops_at_the_cap() -> None:
    # 55 J/cm² of red already today: 5 J/cm² are left of the 60 J/cm² daily cap.
    engine = LedEngine(
        routine("led_red_near_infrared.toml"),
        default_policy(),
        sample_rate_hz=RATE_HZ,
        dose_today_j_cm2={"red": 55.0},
    )
    decisions = Feeder(engine).feed(mask_samples(600, red=15, nir=10))
    stop = next(d for d in decisions if d.kind is DecisionKind.STOP_STEP)
    assert stop.reason == "dose_cap"
    assert stop.at_s == pytest.approx(5.0 / 15 * 1000 - DT_S, abs=DT_S)  # 333.3 s
    assert engine.summary.dose_j_cm2["red"] == pytest.approx(5.0, abs=0.02)
    assert stop.rule is not None
    assert "led.red.dose_cap_session_j_cm2" in stop.rule


def test_mask_reporting_more_light_than_commanded_stops_at_the_session_cap() -> None:
    engine = LedEngine(
        routine("led_red_near_infrared.toml"), default_policy(), sample_rate_hz=RATE_HZ
    )
    decisions = Feeder(engine).feed(
        mask_samples(600, red=150)
    )  # a faulty driver: 10x the set point
    stop = next(d for d in decisions if d.kind is DecisionKind.STOP_STEP)
    assert stop.at_s == pytest.approx(400 - DT_S, abs=DT_S)  # 60 J/cm² at 150 mW/cm²
    assert engine.summary.dose_j_cm2["red"] == pytest.approx(60, abs=0.2)


def test_mask_over_the_stop_temperature_ends_the_step() -> None:
    engine = LedEngine(
        routine("led_red_near_infrared.toml"), default_policy(), sample_rate_hz=RATE_HZ
    )
    feeder = Feeder(engine)
    feeder.feed(mask_samples(100, red=15, nir=10, temperature_c=38))
    warm = feeder.feed(mask_samples(10, red=15, nir=10, temperature_c=41.2))
    assert warm[0].kind is DecisionKind.LOWER_INTENSITY
    assert warm[0].irradiance_mw_cm2 == {"red": 7.5, "near_infrared": 5.0, "blue": 0.0}
    hot = feeder.feed(mask_samples(10, red=7.5, nir=5, temperature_c=43.1))
    assert hot[0].kind is DecisionKind.STOP_STEP
    assert hot[0].reason == "over_temperature"
    assert hot[0].at_s == pytest.approx(110)
    assert engine.finished
    assert not engine.summary.completed


def test_same_input_gives_the_same_decisions() -> None:
    def run() -> list:
        engine = MassageEngine(
            routine("masseter_relaxation.toml"), default_policy(), sample_rate_hz=RATE_HZ
        )
        rng = np.random.default_rng(5)
        samples = massager_samples(120, pressure_kpa=40, zone=p.Zone.MASSETER_LEFT)
        samples["pressure_dapa"] = (
            rng.normal(4000, 2500, samples.shape[0]).clip(0, 65535).astype(np.uint16)
        )
        return Feeder(engine).feed(samples)

    first = run()
    assert first
    assert first == run()


def test_contact_per_zone_side_stops_at_its_session_cap_and_the_step_there_ends() -> None:
    # Firming: cheek_left, cheek_right, jawline_left, jawline_right, chin. The hand stays on
    # the left cheek through step 2 (cheek_right) in passes of 55 s with a neck stroke in
    # between: wrong-zone contact that still counts on the left cheek, up to its 300 s.
    policy = default_policy()
    engine = MassageEngine(routine("firming.toml"), policy, sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    decisions = feeder.feed(massager_samples(60, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    assert engine.current_step.zone == "cheek_right"
    for _ in range(5):
        decisions += feeder.feed(massager_samples(0.5, pressure_kpa=2, zone=p.Zone.NECK))
        decisions += feeder.feed(massager_samples(55, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    spent = [d for d in decisions if d.reason == "zone_session"]
    assert [(d.kind, d.zone) for d in spent] == [(DecisionKind.PAUSE, "cheek_left")]
    assert spent[0].rule is not None
    assert spent[0].rule.startswith("zones.cheek.session_cap_s = 300")
    assert "300 s on cheek_left is the most for one session" in spent[0].message
    assert engine.paused
    # Exactly 300 s counted there; nothing after the cap.
    assert engine.summary.contact_s_by_zone["cheek_left"] == pytest.approx(300.0)
    # Moving to the step's zone resumes; the right cheek still has its own 300 s.
    back = feeder.feed(massager_samples(1, pressure_kpa=8, zone=p.Zone.CHEEK_RIGHT))
    assert [(d.kind, d.reason) for d in back] == [(DecisionKind.RESUME, "zone_session")]


def test_a_step_on_a_zone_that_has_had_its_session_cap_ends_and_the_next_starts() -> None:
    # Firming with its third step (jawline_left) moved to the left cheek.
    text = (
        (ROUTINES / "firming.toml")
        .read_text("utf-8")
        .replace('zone = "jawline_left"', 'zone = "cheek_left"', 1)
        .replace("{ min = 6.0, max = 20.0 }", "{ min = 4.0, max = 12.0 }", 1)
    )
    policy = default_policy()
    engine = MassageEngine(parse_routine(text, policy), policy, sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    feeder.feed(massager_samples(60, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    for _ in range(5):  # step 2 (cheek_right) done on the wrong side, in 48 s passes
        feeder.feed(massager_samples(0.5, pressure_kpa=2, zone=p.Zone.NECK))
        feeder.feed(massager_samples(48, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    feeder.feed(massager_samples(60, pressure_kpa=8, zone=p.Zone.CHEEK_RIGHT))
    assert engine.current_step.zone == "cheek_left"  # step 3, now on a spent zone
    ended = feeder.feed(massager_samples(1, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    assert [(d.kind, d.reason) for d in ended] == [
        (DecisionKind.STOP_STEP, "zone_session"),
        (DecisionKind.GUIDANCE, "step_start"),
    ]
    assert "cheek_left has had the most contact for one session (300 s per side)" in (
        ended[0].message
    )
    assert engine.current_step.zone == "jawline_right"
    assert engine.paused  # the motor stays off while the head is on the spent zone
    moved = feeder.feed(massager_samples(1, pressure_kpa=8, zone=p.Zone.JAWLINE_RIGHT))
    assert moved[0].kind is DecisionKind.RESUME
    feeder.feed(massager_samples(59, pressure_kpa=8, zone=p.Zone.JAWLINE_RIGHT))
    done = feeder.feed(massager_samples(45, pressure_kpa=8, zone=p.Zone.CHIN))
    assert done[-1].kind is DecisionKind.COMPLETE
    # Step 3 never got its contact: not completed, 225 of the planned 285 s done.
    summary = engine.summary
    assert (summary.steps_done, summary.completed, summary.stopped_reason) == (4, True, None)
    assert summary.completion == pytest.approx(225 / 285)
    assert summary.contact_s_by_zone["cheek_left"] == pytest.approx(300.0)


def test_completion_is_the_fraction_of_the_planned_contact_time() -> None:
    engine = MassageEngine(routine("firming.toml"), default_policy(), sample_rate_hz=RATE_HZ)
    feeder = Feeder(engine)
    feeder.feed(massager_samples(20, pressure_kpa=8, zone=p.Zone.CHEEK_RIGHT))  # wrong zone
    assert engine.summary.completion == 0.0
    feeder.feed(massager_samples(60, pressure_kpa=8, zone=p.Zone.CHEEK_LEFT))
    feeder.feed(massager_samples(11.25, pressure_kpa=8, zone=p.Zone.CHEEK_RIGHT))
    # Step 1's 60 s and 11.25 s of step 2 (the 20 s on the right cheek during step 1 did
    # not count toward a step) of the planned 285 s.
    assert engine.summary.completion == pytest.approx(71.25 / 285)
