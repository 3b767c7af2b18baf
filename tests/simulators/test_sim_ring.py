"""TelemetryRing: sequence-keyed storage with wrap-around."""

from __future__ import annotations

import numpy as np

from protocols import MASSAGER_SAMPLE_DTYPE
from simulators import TelemetryRing


def _samples(first: int, count: int) -> np.ndarray:
    samples = np.zeros(count, dtype=MASSAGER_SAMPLE_DTYPE)
    samples["pressure_dapa"] = np.arange(first, first + count) % 65536
    return samples


def test_empty_ring() -> None:
    ring = TelemetryRing(MASSAGER_SAMPLE_DTYPE, 10)
    assert len(ring) == 0
    assert ring.newest_sequence is None
    assert ring.oldest_sequence == ring.next_sequence == 0
    first, samples = ring.range(0, 5)
    assert (first, samples.shape[0]) == (0, 0)


def test_extend_wraps_and_keeps_the_newest() -> None:
    ring = TelemetryRing(MASSAGER_SAMPLE_DTYPE, 10)
    for start in range(0, 25, 5):
        ring.extend(_samples(start, 5))
    assert (ring.oldest_sequence, ring.newest_sequence, ring.next_sequence) == (15, 24, 25)
    first, samples = ring.range(0, 100)
    assert first == 15
    assert samples["pressure_dapa"].tolist() == list(range(15, 25))


def test_range_partial_and_unavailable() -> None:
    ring = TelemetryRing(MASSAGER_SAMPLE_DTYPE, 10)
    ring.extend(_samples(0, 23))  # more than the capacity at once
    assert ring.oldest_sequence == 13
    first, samples = ring.range(10, 5)  # 10..14: only 13, 14 held
    assert first == 13
    assert samples["pressure_dapa"].tolist() == [13, 14]
    first, samples = ring.range(0, 5)  # entirely gone
    assert (first, samples.shape[0]) == (13, 0)
    first, samples = ring.range(30, 5)  # not taken yet
    assert (first, samples.shape[0]) == (13, 0)
    first, samples = ring.range(20, 100)  # clipped at the newest
    assert (first, samples["pressure_dapa"].tolist()) == (20, [20, 21, 22])


def test_range_returns_a_copy() -> None:
    ring = TelemetryRing(MASSAGER_SAMPLE_DTYPE, 4)
    ring.extend(_samples(0, 4))
    _, samples = ring.range(0, 4)
    ring.extend(_samples(4, 4))
    assert samples["pressure_dapa"].tolist() == [0, 1, 2, 3]
