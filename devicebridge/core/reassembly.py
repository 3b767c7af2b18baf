"""Put a telemetry stream back together: live batches, backfill and gaps, in order.

The device keeps its recent samples in a ring buffer. When the live stream
skips a range (a lost notification, a link loss), the host asks for that range
again (REQUEST_BACKFILL) and holds the live batches that arrive meanwhile, so
the consumer gets every sample exactly once and in sequence order. When the
device no longer holds part of the range, the consumer gets a
:class:`TelemetryGap` for exactly the lost samples instead, and the stream goes
on.

A device that restarts (reboot, brown-out, power off and on) counts its samples from 0
again, and its RAM ring is gone: what the old boot took after the last sample received
cannot be backfilled and becomes a :class:`TelemetryGap` with reason
``device_rebooted`` (or ``device_shut_down``), exact when the device reports how far the
old boot counted (BOOT or SHUTDOWN payload), marked ``count_known=False`` when it
cannot. What the new boot took before the host heard from it is in the new ring and is
backfilled like any other missing range (docs/protocol.md, "Device restarts").

This module only decides; the session does the I/O. Every method returns the
items that became deliverable, in order; :meth:`TelemetryReassembler.next_request`
says which range to ask the device for.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from devicebridge.core.sequencing import (
    SequenceRange,
    SequenceStatus,
    SequenceTracker,
    unwrap_sequence,
)
from protocols import TelemetryBatch

MS_PER_S: Final = 1000.0
DEFAULT_MAX_HELD_SAMPLES: Final = 60_000


class GapReason(enum.Enum):
    NOT_HELD_BY_DEVICE = "not_held_by_device"  # left the device's ring buffer
    BACKFILL_FAILED = "backfill_failed"  # request rejected, timed out, or given up
    BACKFILL_INCOMPLETE = "backfill_incomplete"  # the device skipped samples it promised
    # The device restarted or powered off: its counter starts again after this record,
    # which counts what the old boot took and never sent (gone with its RAM).
    DEVICE_REBOOTED = "device_rebooted"
    DEVICE_SHUT_DOWN = "device_shut_down"


@dataclass(frozen=True, slots=True)
class TelemetryGap:
    """Samples ``[first_sequence, first_sequence + sample_count)`` are lost for good.

    ``count_known`` is false only for a device restart the device could not measure (a
    brown-out clears the RAM that knew the old count): some samples may be lost after
    ``first_sequence``, and ``sample_count`` (0) is not their number.
    """

    first_sequence: int
    sample_count: int
    reason: GapReason
    count_known: bool = True

    @property
    def end_sequence(self) -> int:
        return self.first_sequence + self.sample_count


TelemetryItem: TypeAlias = TelemetryBatch | TelemetryGap


@dataclass(slots=True)
class _Restart:
    """A restart recorded before any live batch of the new boot arrived."""

    old_end: int  # unwrapped end of what the old boot is known to have taken
    reason: GapReason


@dataclass(slots=True)
class _Missing:
    """A range missing from the live stream, waiting for backfill."""

    range: SequenceRange
    cursor: int  # next sequence of the range not yet delivered (or declared lost)
    requested: bool = False
    reply_end: int | None = None  # set once the device said what it will send
    early: list[TelemetryBatch] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.cursor >= self.range.end


@dataclass(slots=True)
class ReassemblyCounters:
    gaps_detected: int = 0
    duplicates_dropped: int = 0  # batches entirely seen before
    backfilled_samples: int = 0
    lost_samples: int = 0
    gap_records: int = 0
    delivered_samples: int = 0
    stray_backfill_batches: int = 0  # backfill batches nobody asked for (ignored)
    device_restarts: int = 0  # reboots, brown-outs and shutdowns (each power cycle once)


def _slice(
    batch: TelemetryBatch, first_sequence: int, start: int, stop: int, sample_rate_hz: float | None
) -> TelemetryBatch:
    """Samples ``[start, stop)`` of ``batch``, renumbered from the unwrapped ``first_sequence``."""
    time_ms = batch.device_time_ms
    if start and sample_rate_hz:
        time_ms += round(start * MS_PER_S / sample_rate_hz)
    samples = batch.samples if (start, stop) == (0, len(batch)) else batch.samples[start:stop]
    return TelemetryBatch(
        batch.sample_format, first_sequence + start, time_ms, samples, batch.backfill
    )


class TelemetryReassembler:
    """Orders live and backfilled batches; see the module docstring."""

    def __init__(
        self,
        *,
        sample_rate_hz: float | None = None,
        max_held_samples: int = DEFAULT_MAX_HELD_SAMPLES,
    ) -> None:
        self._rate_hz = sample_rate_hz
        self._max_held = max_held_samples
        self._tracker = SequenceTracker()
        # What is held back, in order: missing ranges and the live batches behind them.
        # Empty in the common case; others only read it (empty: nothing to ask for).
        self.queue: deque[TelemetryBatch | _Missing] = deque()
        self._held_samples = 0
        self._restart: _Restart | None = None
        self.counters = ReassemblyCounters()

    # ------------------------------------------------------------------ state

    @property
    def backfill_pending(self) -> bool:
        return any(isinstance(entry, _Missing) for entry in self.queue)

    @property
    def awaiting_backfill(self) -> bool:
        """A range was requested and is not complete yet."""
        head = self._head_missing()
        return head is not None and head.requested

    @property
    def held_samples(self) -> int:
        """Live samples held back until an earlier backfill completes."""
        return self._held_samples

    @property
    def next_live_sequence(self) -> int | None:
        return self._tracker.next_expected

    def set_sample_rate(self, sample_rate_hz: float) -> None:
        self._rate_hz = sample_rate_hz

    def expect(self, next_sequence: int) -> None:
        """Before the first batch: the stream goes on from ``next_sequence`` (samples before
        it were delivered by an earlier link), so the first batch after it makes a gap to
        backfill instead of a new start."""
        if self._tracker.next_expected is not None:
            raise ValueError("expect() only before the first batch")
        self._tracker = SequenceTracker(next_sequence)

    def next_request(self) -> SequenceRange | None:
        """The range to request now, once; ``None`` when nothing new needs asking."""
        head = self._head_missing()
        if head is None or head.requested:
            return None
        head.requested = True
        return SequenceRange(head.cursor, head.range.end)

    # ------------------------------------------------------------------ inputs

    def on_live(self, batch: TelemetryBatch) -> list[TelemetryItem]:
        count = len(batch.samples)
        self._restart = None
        if not self.queue:
            # The common case: nothing held back and the batch continues the stream. The
            # same as below for a CONTIGUOUS verdict: the whole batch, renumbered to the
            # unwrapped sequence (the batch itself when that is its own), delivered at once.
            first = self._tracker.feed_contiguous(batch.first_sequence, count)
            if first is not None:
                if first != batch.first_sequence:
                    batch = _slice(batch, first, 0, count, self._rate_hz)
                self.counters.delivered_samples += count
                return [batch]
        verdict = self._tracker.feed(batch.first_sequence, count)
        out: list[TelemetryItem] = []
        if verdict.status is SequenceStatus.DUPLICATE:
            self.counters.duplicates_dropped += 1
            return out
        if verdict.status is SequenceStatus.GAP:
            assert verdict.missing is not None
            self.counters.gaps_detected += 1
            self.queue.append(_Missing(verdict.missing, verdict.missing.first))
        item = _slice(
            batch, verdict.first_sequence, verdict.trim_samples, len(batch), self._rate_hz
        )
        self.queue.append(item)
        self._held_samples += len(item)
        if self._head_missing() is not None and self._held_samples > self._max_held:
            # Holding more would grow without bound if a backfill never ends.
            out += self.abandon_active()
        out += self._drain()
        return out

    def on_backfill_reply(
        self, raw_first_sequence: int, sample_count: int, *, available: bool
    ) -> list[TelemetryItem]:
        """The device's answer to the request for the range being backfilled."""
        head = self._head_missing()
        if head is None or not head.requested or head.reply_end is not None:
            return []
        out: list[TelemetryItem] = []
        if not available or sample_count <= 0:
            out += self._lose(head, head.range.end, GapReason.NOT_HELD_BY_DEVICE)
            head.reply_end = head.range.end
            return out + self._drain()
        first = unwrap_sequence(raw_first_sequence, head.cursor)
        if first > head.cursor:
            out += self._lose(head, min(first, head.range.end), GapReason.NOT_HELD_BY_DEVICE)
        head.reply_end = max(head.cursor, min(first + sample_count, head.range.end))
        early, head.early = head.early, []
        for batch in early:
            out += self._accept_backfill(head, batch)
        out += self._finish_if_complete(head)
        return out + self._drain()

    def on_backfill(self, batch: TelemetryBatch) -> list[TelemetryItem]:
        head = self._head_missing()
        if head is None or not head.requested:
            self.counters.stray_backfill_batches += 1
            return []
        if head.reply_end is None:
            # The reply and the samples travel on different paths (control and
            # telemetry characteristics): keep samples that overtake the reply.
            head.early.append(batch)
            return []
        out = self._accept_backfill(head, batch)
        out += self._finish_if_complete(head)
        return out + self._drain()

    def on_link_reset(self) -> None:
        """The link went down: what is still missing must be requested again."""
        head = self._head_missing()
        if head is not None:
            head.requested = False
            head.reply_end = None
            head.early.clear()

    def on_device_restart(
        self, reason: GapReason, *, sequence_end: int | None = None
    ) -> list[TelemetryItem]:
        """The device rebooted or shut down: its counter restarts at 0, its ring is gone.

        ``sequence_end``: how many samples the old boot took (the raw u32 of a BOOT or
        SHUTDOWN payload), when the device reports it.

        Every missing range of the old boot becomes a gap (``reason``) and the live
        batches held behind them are delivered. Then one gap with ``reason`` counts what
        the old boot took after the last sample received: exactly with ``sequence_end``,
        as a zero-length record with ``count_known=False`` without it. The next sample
        expected is the new boot's first (sequence 0), so what the device took since it
        booted is requested from its new ring like any missing range.

        A SHUTDOWN and the BOOT that follows it, with no live batch between them, are one
        power cycle: the BOOT only adds the samples after the end the SHUTDOWN gave, when
        it knows a later one. Any other second report is a restart of the new boot.
        """
        pending = self._restart
        if (
            pending is not None
            and pending.reason is GapReason.DEVICE_SHUT_DOWN
            and reason is GapReason.DEVICE_REBOOTED
        ):
            return self._restart_gap(pending, sequence_end, first_report=False)
        self.counters.device_restarts += 1
        out: list[TelemetryItem] = []
        for entry in list(self.queue):
            if isinstance(entry, _Missing):
                out += self._lose(entry, entry.range.end, reason)
        out += self._drain()
        pending = self._restart = _Restart(self._tracker.next_expected or 0, reason)
        out += self._restart_gap(pending, sequence_end, first_report=True)
        self._tracker = SequenceTracker(next_expected=0)
        return out

    def retry_active(self) -> bool:
        """Arm the active range to be requested again (after a stall); False when none.

        A notification lost on the way (the last backfill batch, say) would otherwise turn
        samples the device still holds into a gap; asking again for what is still missing
        recovers them, and late copies of the first answer are dropped as duplicates.
        """
        head = self._head_missing()
        if head is None:
            return False
        head.requested = False
        head.reply_end = None
        head.early.clear()
        return True

    def abandon_active(self, reason: GapReason = GapReason.BACKFILL_FAILED) -> list[TelemetryItem]:
        """Give up on the range being backfilled: report what is left as a gap."""
        head = self._head_missing()
        if head is None:
            return []
        out = self._lose(head, head.range.end, reason)
        return out + self._drain()

    # ------------------------------------------------------------------ internals

    def _head_missing(self) -> _Missing | None:
        if self.queue and isinstance(self.queue[0], _Missing):
            return self.queue[0]
        return None

    def _restart_gap(
        self, restart: _Restart, raw_end: int | None, *, first_report: bool
    ) -> list[TelemetryItem]:
        """The old boot's samples after ``restart.old_end`` up to ``raw_end``."""
        end = None if raw_end is None else unwrap_sequence(raw_end, restart.old_end)
        if end is not None and end < restart.old_end:
            end = None  # less than was received: not a count of this boot's samples
        if end is None and not first_report:
            return []
        count = 0 if end is None else end - restart.old_end
        if count == 0 and not first_report:
            return []
        gap = TelemetryGap(restart.old_end, count, restart.reason, count_known=end is not None)
        restart.old_end += count
        self.counters.gap_records += 1
        self.counters.lost_samples += count
        return [gap]

    def _lose(self, head: _Missing, end: int, reason: GapReason) -> list[TelemetryItem]:
        if end <= head.cursor:
            return []
        gap = TelemetryGap(head.cursor, end - head.cursor, reason)
        head.cursor = end
        self.counters.gap_records += 1
        self.counters.lost_samples += gap.sample_count
        return [gap]

    def _accept_backfill(self, head: _Missing, batch: TelemetryBatch) -> list[TelemetryItem]:
        assert head.reply_end is not None
        first = unwrap_sequence(batch.first_sequence, head.cursor)
        end = min(first + len(batch), head.reply_end)
        if end <= head.cursor or first >= head.reply_end:
            self.counters.stray_backfill_batches += 1
            return []
        out: list[TelemetryItem] = []
        if first > head.cursor:
            out += self._lose(head, first, GapReason.BACKFILL_INCOMPLETE)
        start = head.cursor - first
        item = _slice(batch, first, start, end - first, self._rate_hz)
        head.cursor = end
        self.counters.backfilled_samples += len(item)
        self.counters.delivered_samples += len(item)
        out.append(item)
        return out

    def _finish_if_complete(self, head: _Missing) -> list[TelemetryItem]:
        if head.reply_end is not None and head.cursor >= head.reply_end:
            return self._lose(head, head.range.end, GapReason.BACKFILL_INCOMPLETE)
        return []

    def _drain(self) -> list[TelemetryItem]:
        out: list[TelemetryItem] = []
        while self.queue:
            head = self.queue[0]
            if isinstance(head, _Missing):
                if not head.done:
                    break
                self.queue.popleft()
                continue
            self.queue.popleft()
            self._held_samples -= len(head)
            self.counters.delivered_samples += len(head)
            out.append(head)
        return out
