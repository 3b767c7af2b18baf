"""Sequence tracking of a telemetry stream: contiguous, gap, duplicate or overlap.

Devices number their samples with a u32 that starts at 0 at boot and wraps.
The tracker unwraps it into an unbounded ``int`` counter (the value nearest to
where the stream is expected to be), so a wrap is not mistaken for a gap and
ranges stay ordered across it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

SEQUENCE_MODULUS: Final = 1 << 32
_HALF_MODULUS: Final = SEQUENCE_MODULUS // 2


def unwrap_sequence(raw: int, reference: int) -> int:
    """The unwrapped counter whose low 32 bits are ``raw``, nearest to ``reference``.

    ``reference`` is an unwrapped counter (for example the next expected one).
    Values up to half the sequence space behind or ahead resolve correctly.
    """
    delta = (raw - reference) % SEQUENCE_MODULUS
    if delta >= _HALF_MODULUS:
        delta -= SEQUENCE_MODULUS
    return reference + delta


@dataclass(frozen=True, slots=True, order=True)
class SequenceRange:
    """Half-open range ``[first, end)`` of unwrapped sequence numbers."""

    first: int
    end: int

    def __post_init__(self) -> None:
        if self.end < self.first:
            raise ValueError(f"range end {self.end} before first {self.first}")

    @property
    def count(self) -> int:
        return self.end - self.first

    def __len__(self) -> int:
        return self.count


class SequenceStatus(enum.Enum):
    FIRST = "first"  # the first batch seen: it sets the baseline
    CONTIGUOUS = "contiguous"
    GAP = "gap"  # samples between the expected and this batch's first are missing
    DUPLICATE = "duplicate"  # entirely seen before: drop it
    OVERLAP = "overlap"  # starts before the expected sequence: trim the front


@dataclass(frozen=True, slots=True)
class SequenceVerdict:
    status: SequenceStatus
    first_sequence: int  # unwrapped first sequence of the batch
    sample_count: int
    missing: SequenceRange | None = None  # GAP only
    trim_samples: int = 0  # samples to drop from the batch's front (OVERLAP, DUPLICATE: all)

    @property
    def end_sequence(self) -> int:
        return self.first_sequence + self.sample_count

    @property
    def new_samples(self) -> int:
        return self.sample_count - self.trim_samples


class SequenceTracker:
    """Feed ``(first_sequence, sample_count)`` of every batch in arrival order."""

    def __init__(self, next_expected: int | None = None) -> None:
        self._next_expected = next_expected

    @property
    def next_expected(self) -> int | None:
        """Unwrapped sequence of the next new sample, or ``None`` before the first batch."""
        return self._next_expected

    def feed_contiguous(self, raw_first_sequence: int, sample_count: int) -> int | None:
        """:meth:`feed` for a batch that continues the stream, without the verdict.

        When the batch starts at the expected sequence (a ``CONTIGUOUS`` verdict), takes it
        in as :meth:`feed` does and returns its unwrapped first sequence; otherwise returns
        ``None`` and changes nothing (call :meth:`feed`).
        """
        expected = self._next_expected
        if (
            expected is None
            or sample_count < 0
            or (raw_first_sequence - expected) % SEQUENCE_MODULUS
        ):
            return None
        self._next_expected = expected + sample_count
        return expected

    def feed(self, raw_first_sequence: int, sample_count: int) -> SequenceVerdict:
        if sample_count < 0:
            raise ValueError("sample_count must be >= 0")
        expected = self._next_expected
        if expected is None:
            first = raw_first_sequence
            self._next_expected = first + sample_count
            return SequenceVerdict(SequenceStatus.FIRST, first, sample_count)
        first = unwrap_sequence(raw_first_sequence, expected)
        end = first + sample_count
        if first == expected:
            self._next_expected = end
            return SequenceVerdict(SequenceStatus.CONTIGUOUS, first, sample_count)
        if first > expected:
            self._next_expected = end
            return SequenceVerdict(
                SequenceStatus.GAP, first, sample_count, missing=SequenceRange(expected, first)
            )
        if end <= expected:
            return SequenceVerdict(
                SequenceStatus.DUPLICATE, first, sample_count, trim_samples=sample_count
            )
        self._next_expected = end
        return SequenceVerdict(
            SequenceStatus.OVERLAP, first, sample_count, trim_samples=expected - first
        )
