"""The plain-Python quiet-run checks (``_ListBatch``) against their per-sample loops.

``_ListBatch.quiet_count`` and ``faults_quiet`` take shortcuts (whole-run builtins, shared
lists, a repeated motor flag); these give the very same counts and detector states as the
loops they stand for, copied here as the reference.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols as p
from devicebridge.core.engine import (
    _MAX_ZONE,
    _MIN_ZONE,
    CONTACT_FLAG,
    MOTOR_FLAG,
    _BulkActuatorWatch,
    _BulkStuckSensorDetector,
    _ListBatch,
    _QuietWindow,
)

RATE_HZ = 100


def reference_quiet_count(batch: _ListBatch, window: _QuietWindow, start: int, end: int) -> int:
    temperature, flags = batch.temperature, batch.flags
    below = window.temperature_below
    if not window.on_skin:
        for index in range(start, end):
            if flags[index] & CONTACT_FLAG or temperature[index] >= below:
                return index - start
        return end - start
    raw, zones = batch.raw, batch.zones
    low, high, code = window.pressure_min, window.pressure_max, window.zone_code
    for index in range(start, end):
        zone = zones[index]
        if not (
            flags[index] & CONTACT_FLAG
            and low <= raw[index] <= high
            and temperature[index] < below
            and (zone == code or not _MIN_ZONE <= zone <= _MAX_ZONE)
        ):
            return index - start
    return end - start


def reference_faults_quiet(
    batch: _ListBatch,
    stuck: _BulkStuckSensorDetector,
    actuators: _BulkActuatorWatch,
    on_skin: bool,
    motor_wanted: bool,
    start: int,
    run: int,
) -> int:
    end = start + run
    raw = batch.raw[start:end]
    motor_on_skin = (
        [flags & MOTOR_FLAG != 0 for flags in batch.flags[start:end]] if on_skin else [False] * run
    )
    ok = min(stuck.ok_count(raw, motor_on_skin), actuators.ok_count(motor_wanted, motor_on_skin))
    if ok:
        stuck.skip(raw[:ok], motor_on_skin[:ok])
        actuators.skip(motor_wanted, motor_on_skin[:ok])
    return ok


def samples_of(columns: list[tuple[int, int, int, int]]) -> np.ndarray:
    samples = np.zeros(len(columns), dtype=p.MASSAGER_SAMPLE_DTYPE)
    for index, (raw, centi_c, zone, flags) in enumerate(columns):
        samples[index] = (raw, centi_c, 80, zone, 4, 1, flags)
    return samples


# Few values, so that runs of equal flags, zones and readings are common.
sample = st.tuples(
    st.sampled_from([0, 599, 600, 900, 1200, 1201]),
    st.sampled_from([3340, 4099, 4100]),
    st.sampled_from([0, 4, 5, 14]),
    st.sampled_from([0, CONTACT_FLAG, MOTOR_FLAG, CONTACT_FLAG | MOTOR_FLAG, 0x0B]),
)
steady = st.tuples(sample, st.integers(1, 30)).map(lambda pair: [pair[0]] * pair[1])
columns = st.lists(st.one_of(steady, st.lists(sample, min_size=1, max_size=5)), min_size=1).map(
    lambda parts: [s for part in parts for s in part][:80]
)
windows = st.builds(
    _QuietWindow,
    st.booleans(),
    st.integers(1, 100),
    st.sampled_from([4100, 4300]),
    st.sampled_from([4, 5]),
    st.sampled_from([0, 600]),
    st.sampled_from([598, 1200, 2000, -1]),
)


@settings(max_examples=400, deadline=None)
@given(columns, windows, st.data())
def test_quiet_count_matches_the_loop(
    cols: list[tuple[int, int, int, int]], window: _QuietWindow, data: st.DataObject
) -> None:
    batch = _ListBatch(samples_of(cols))
    start = data.draw(st.integers(0, batch.count - 1))
    end = data.draw(st.integers(start + 1, batch.count))
    assert batch.quiet_count(window, start, end) == reference_quiet_count(batch, window, start, end)


def detectors(
    stuck_value: int | None, stuck_run: int, mismatch: int, reported: bool
) -> tuple[_BulkStuckSensorDetector, _BulkActuatorWatch]:
    stuck = _BulkStuckSensorDetector(RATE_HZ, 0.2)  # 20 samples
    stuck._value, stuck._run = stuck_value, stuck_run
    actuators = _BulkActuatorWatch(RATE_HZ, 0.15)  # 15 samples
    actuators._mismatch, actuators.reported = mismatch, reported
    return stuck, actuators


@settings(max_examples=400, deadline=None)
@given(
    columns,
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 0, 600, 900]),
    st.integers(0, 19),
    st.integers(0, 14),
    st.booleans(),
    st.data(),
)
def test_faults_quiet_matches_the_loop(
    cols: list[tuple[int, int, int, int]],
    on_skin: bool,
    commanded: bool,
    stuck_value: int | None,
    stuck_run: int,
    mismatch: int,
    reported: bool,
    data: st.DataObject,
) -> None:
    batch = _ListBatch(samples_of(cols))
    start = data.draw(st.integers(0, batch.count - 1))
    run = data.draw(st.integers(1, batch.count - start))
    stuck, actuators = detectors(stuck_value, stuck_run, mismatch, reported)
    ref_stuck, ref_actuators = detectors(stuck_value, stuck_run, mismatch, reported)
    wanted = on_skin and commanded
    ok = batch.faults_quiet(stuck, actuators, on_skin, wanted, start, run)
    assert ok == reference_faults_quiet(
        batch, ref_stuck, ref_actuators, on_skin, wanted, start, run
    )
    assert (stuck._value, stuck._run, stuck.stuck) == (
        ref_stuck._value,
        ref_stuck._run,
        ref_stuck.stuck,
    )
    assert (actuators._mismatch, actuators.reported) == (
        ref_actuators._mismatch,
        ref_actuators.reported,
    )
