"""The device's telemetry ring buffer, keyed by sample sequence number.

Firmware keeps the most recent samples in RAM so that a host that lost the link
can ask for the gap again (``REQUEST_BACKFILL``). Sample ``s`` lives in slot
``s % capacity``; the newest ``capacity`` samples are held.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class TelemetryRing:
    """Fixed-capacity storage of structured samples with contiguous sequence numbers.

    The samples are held as their raw bytes (the wire format), so that they go in and out
    with one memory copy: numpy copies structured samples field by field, which costs far
    more than the copy itself for the few samples of a live tick.
    """

    def __init__(
        self, dtype: np.dtype[np.void], capacity_samples: int, first_sequence: int = 0
    ) -> None:
        if capacity_samples < 1:
            raise ValueError(f"capacity must be at least one sample, got {capacity_samples}")
        self._dtype = dtype
        self._sample_bytes = dtype.itemsize
        self._storage = bytearray(capacity_samples * self._sample_bytes)
        self._capacity = capacity_samples
        self._next_sequence = first_sequence
        self._oldest_sequence = first_sequence

    @property
    def dtype(self) -> np.dtype[np.void]:
        return self._dtype

    @property
    def sample_bytes(self) -> int:
        """The size of one sample (its dtype's itemsize)."""
        return self._sample_bytes

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def next_sequence(self) -> int:
        """Sequence number the next appended sample gets."""
        return self._next_sequence

    @property
    def oldest_sequence(self) -> int:
        """Sequence of the oldest held sample (equals ``next_sequence`` when empty)."""
        return self._oldest_sequence

    @property
    def newest_sequence(self) -> int | None:
        """Sequence of the newest held sample, ``None`` when empty."""
        return self._next_sequence - 1 if len(self) else None

    def __len__(self) -> int:
        return self._next_sequence - self._oldest_sequence

    def extend(self, samples: npt.NDArray[np.void]) -> None:
        """Append samples; they get the next sequence numbers in order."""
        count = int(samples.shape[0])
        if count == 0:
            return
        if samples.dtype != self._dtype:
            raise ValueError(f"samples have dtype {samples.dtype}, ring holds {self.dtype}")
        if count > self._capacity:
            # Only the newest `capacity` survive; skip writing the rest.
            skipped = count - self._capacity
            self._next_sequence += skipped
            samples = samples[skipped:]
            count = self._capacity
        data = samples.tobytes()
        start = self._next_sequence % self._capacity * self._sample_bytes
        first_part = min(len(data), len(self._storage) - start)
        self._storage[start : start + first_part] = data[:first_part]
        if first_part < len(data):
            self._storage[: len(data) - first_part] = data[first_part:]
        self._next_sequence += count
        self._oldest_sequence = max(self._oldest_sequence, self._next_sequence - self._capacity)

    def range(self, first_sequence: int, count: int) -> tuple[int, npt.NDArray[np.void]]:
        """The held part of ``[first_sequence, first_sequence + count)``, as a copy.

        Returns ``(first_available, samples)``: ``first_available`` is the sequence of
        ``samples[0]`` (at or after ``first_sequence``). When nothing of the range
        is held the samples are empty and ``first_available`` is the oldest held
        sequence.
        """
        start, data = self.range_bytes(first_sequence, count)
        if not data:
            return start, np.zeros(0, dtype=self._dtype)
        return start, np.frombuffer(data, dtype=self._dtype)

    def range_bytes(self, first_sequence: int, count: int) -> tuple[int, bytearray]:
        """:meth:`range` as the samples' raw bytes (the wire format), a copy.

        For callers that only pass the samples on (streaming), which saves making an array.
        """
        start = max(first_sequence, self._oldest_sequence)
        end = min(first_sequence + max(count, 0), self._next_sequence)
        if end <= start:
            return self._oldest_sequence, bytearray()
        first = start % self._capacity * self._sample_bytes
        stop = first + (end - start) * self._sample_bytes
        if stop <= len(self._storage):
            return start, self._storage[first:stop]
        # The range wraps around the end of the storage (once: it holds at most capacity).
        return start, self._storage[first:] + self._storage[: stop - len(self._storage)]
