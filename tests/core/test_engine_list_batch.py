"""Short batches of few distinct values against the per-sample path.

Live notifications carry 10 to 55 samples, often with every flag, zone and reading the same
(a steady hand) or a few values taking turns. Fed in such batches, the engine's quiet
windows (runs of equal values, windows that end inside a batch, a motor flag that repeats)
give the very same decisions, summaries and states as the sample-by-sample reference, with
the fault checks on and off.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols as p
from devicebridge.core.engine import (
    MassageEngine,
)
from devicebridge.core.faults_detect import FaultChecks
from protocols.telemetry import MASSAGER_FLAG_CONTACT, MASSAGER_FLAG_MOTOR_ON
from tests.core.test_engine_vectorised import POLICY, short_routine

RATE_HZ = 100


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
    st.sampled_from(
        [
            0,
            MASSAGER_FLAG_CONTACT,
            MASSAGER_FLAG_MOTOR_ON,
            MASSAGER_FLAG_CONTACT | MASSAGER_FLAG_MOTOR_ON,
            0x0B,
        ]
    ),
)
steady = st.tuples(sample, st.integers(1, 30)).map(lambda pair: [pair[0]] * pair[1])
columns = st.lists(st.one_of(steady, st.lists(sample, min_size=1, max_size=5)), min_size=1).map(
    lambda parts: [s for part in parts for s in part][:400]
)


def run(
    samples: np.ndarray, sizes: list[int], quiet_runs: bool, checks: bool, commanded: int | None
) -> MassageEngine:
    engine = MassageEngine(
        short_routine(1.0),
        POLICY,
        sample_rate_hz=RATE_HZ,
        fault_checks=FaultChecks(stuck_sensor_s=0.2, actuator_grace_s=0.15) if checks else None,
        quiet_runs=quiet_runs,
    )
    engine.motor_commanded_from(commanded)
    engine.start()
    start = 0
    for size in itertools.cycle(sizes):
        if start >= samples.shape[0]:
            break
        engine.feed(samples[start : start + size], 100 + start)
        start += size
    return engine


@settings(max_examples=400, deadline=None)
@given(
    columns,
    st.lists(st.integers(1, 60) | st.sampled_from([10, 26, 55]), min_size=1, max_size=6),
    st.booleans(),
    # The motor commanded on from the start, from a sample inside the stream, or not at all.
    st.sampled_from([0, 130, 250, None]),
)
def test_short_batches_of_few_values_decide_as_the_per_sample_path(
    cols: list[tuple[int, int, int, int]], sizes: list[int], checks: bool, commanded: int | None
) -> None:
    samples = samples_of(cols)
    engine = run(samples, sizes, True, checks, commanded)
    reference = run(samples, sizes, False, checks, commanded)
    assert engine.decisions == reference.decisions
    assert asdict(engine.summary) == asdict(reference.summary)
    assert engine.state is reference.state
    assert engine.finished == reference.finished
    assert engine.step_number == reference.step_number
