"""Sessions a stopped process left running: their summary from what they recorded, and
what a device that ran them alone still holds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import numpy as np

from devicebridge.core.catalogue import BATTERY, KindSupport
from devicebridge.core.device_fit import checks_applied
from devicebridge.core.engine import (
    new_engine,
)
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.reassembly import GapReason, TelemetryGap, TelemetryItem
from devicebridge.core.routine import (
    DeviceKindName,
    Routine,
    parse_routine,
)
from devicebridge.core.timed import TimedMassageEngine
from devicebridge.errors import (
    DeviceBridgeError,
    RoutineRunError,
)
from devicebridge.run.summary import session_summary
from devicebridge.storage.sessions import SessionRecord, SessionStore
from devicebridge.storage.writer import StoreWriter
from protocols.telemetry import MASSAGER_FLAG_PROGRAM_RUNNING

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


# How many samples a resumption skips, at most, looking for the program's first (the
# sample marked at the start may come a notification or so before it).
RESUME_LEAD_IN_SAMPLES: Final = 1000
# Sample flag bit 3 of either kind (LED_MASK_FLAG_PROGRAM_RUNNING is the same bit): the
# device runs a program (docs/protocol.md 7.3).
PROGRAM_RUNNING_FLAG: Final = MASSAGER_FLAG_PROGRAM_RUNNING


def recorded_summary(
    store: SessionStore, record: SessionRecord, policy: SafetyPolicy
) -> dict[str, Any]:
    """The summary of what a session recorded: its stored telemetry through the engine.

    For a session whose process ended before it could finish it (killed, power lost): the
    same summary a finished run stores, of the samples that reached the store. Samples
    missing between stored ones count as lost.
    """
    sequences, samples = store.telemetry(record.id)
    try:
        routine = parse_routine(record.routine_text, policy, label=f"session {record.id}")
        if record.sample_rate_hz <= 0 and routine.device_kind is DeviceKindName.MASSAGER:
            return _by_time_summary(store, record, routine, policy)
        if record.sample_rate_hz <= 0:
            raise RoutineRunError(f"session {record.id} has no sample rate")
    except DeviceBridgeError as exc:
        _LOGGER.warning("session %d: no summary from its telemetry: %s", record.id, exc)
        return {"routine": record.routine_name, "samples": len(samples)}
    engine = new_engine(routine, policy, sample_rate_hz=record.sample_rate_hz)
    engine.start()
    gaps = lost = 0
    if len(sequences):
        breaks = np.flatnonzero(np.diff(sequences.astype(np.int64)) != 1) + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), len(sequences)]
        for start, end in zip(starts, ends, strict=True):
            if start:
                gaps += 1
                lost += int(sequences[start]) - int(sequences[start - 1]) - 1
            engine.feed(samples[start:end], int(sequences[start]))
            if engine.finished:
                break
    return session_summary(
        engine,
        routine,
        mode="unknown",
        samples=len(samples),
        gaps=gaps,
        lost_samples=lost,
        command_errors=0,
    )


def _by_time_summary(
    store: SessionStore, record: SessionRecord, routine: Routine, policy: SafetyPolicy
) -> dict[str, Any]:
    """A session that ran by the host's clock (its device streams nothing: sample rate 0)
    and whose process ended: the summary up to its last recorded decision, a lower bound
    of how far it got (a cue is recorded at least every ``move_cue_interval_s``)."""
    engine = TimedMassageEngine(routine, policy)
    engine.start()
    last_s = max((d.at_s for d in store.decisions(record.id)), default=0.0)
    engine.tick(last_s)
    engine.interrupt(last_s)
    # Nothing streamed, so nothing was measured.
    measured_nothing = KindSupport(DeviceKindName.MASSAGER, measures=frozenset({BATTERY}))
    summary = session_summary(
        engine,
        routine,
        mode="unknown",
        samples=0,
        gaps=0,
        lost_samples=0,
        command_errors=0,
        checks=checks_applied(routine, measured_nothing, by_time=True),
    )
    summary["time_s_lower_bound"] = True
    return summary


@dataclass(frozen=True, slots=True)
class Resumable:
    """An interrupted session whose device was running it as its program: the device may
    still hold the samples after ``last_sequence`` (see :class:`SessionResumption`);
    ``in_program``: that sample was taken under the program (else it is the mark of the
    program's start, which the program's first sample follows shortly)."""

    record: SessionRecord
    last_sequence: int
    in_program: bool = True


def resumable(store: SessionStore, record: SessionRecord) -> Resumable | None:
    """``record`` (interrupted) as :class:`Resumable` when the device was running its
    routine as its program, and was still when the last stored sample was taken."""
    if record.device_program_from is None:
        return None
    sequences, samples = store.telemetry(record.id)
    if not len(sequences):
        return Resumable(record, record.device_program_from - 1, in_program=False)
    if not int(samples["flags"][-1]) & PROGRAM_RUNNING_FLAG:
        return None  # the program had ended (or was stopped) before the bridge did
    return Resumable(record, int(sequences[-1]))


class SessionResumption:
    """Takes what a device held of a session its bridge could not finish.

    A bridge killed while a device ran the routine as its program leaves the session
    interrupted after its last stored sample; the device went on alone, with its own hard
    limits. When a bridge next connects (the session told to
    :meth:`~devicebridge.device.session.DeviceSession.resume_after` that sample), the samples the
    device still holds come first, backfilled: this observer stores them with the session
    for as long as the program ran (the program-running flag), then works out the summary
    again from all of it and finishes the record. Samples the device no longer holds count
    as lost. ``on_done`` gets the finished record.
    """

    def __init__(
        self,
        store: SessionStore,
        writer: StoreWriter,
        resumable: Resumable,
        policy: SafetyPolicy,
        *,
        on_done: Callable[[SessionRecord], None] | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.record = resumable.record
        self.policy = policy
        self.next_sequence = resumable.last_sequence + 1
        # Resumed from a stored sample of the program: it runs from there on; from the mark
        # of its start: samples before its first are skipped.
        self._in_program = resumable.in_program
        self._lead_in_left = RESUME_LEAD_IN_SAMPLES
        self.samples = 0
        self.lost_samples = 0
        self.done = False
        self._program_ended = False
        self._on_done = on_done

    def observe(self, item: TelemetryItem) -> None:
        """A telemetry observer (:meth:`DeviceSession.observe_telemetry`)."""
        if self.done:
            return
        if isinstance(item, TelemetryGap):
            if item.reason in (GapReason.DEVICE_REBOOTED, GapReason.DEVICE_SHUT_DOWN):
                self.finish()  # what the old boot held is gone
            elif item.first_sequence <= self.next_sequence < item.end_sequence:
                self.lost_samples += item.end_sequence - self.next_sequence
                self.next_sequence = item.end_sequence
            return
        if item.sample_format is not self.record.sample_format:
            self.finish()
            return
        end = item.first_sequence + len(item)
        if end <= self.next_sequence:
            return
        if item.first_sequence > self.next_sequence:
            self.lost_samples += item.first_sequence - self.next_sequence
            self.next_sequence = item.first_sequence
        samples = item.samples[self.next_sequence - item.first_sequence :]
        running = (samples["flags"] & PROGRAM_RUNNING_FLAG) != 0
        if not self._in_program:
            lead_in = len(samples) if not running.any() else int(np.argmax(running))
            if lead_in >= self._lead_in_left:
                self.finish()  # no program in sight: nothing ran alone
                return
            self._lead_in_left -= lead_in
            self.next_sequence += lead_in
            samples, running = samples[lead_in:], running[lead_in:]
            if not len(samples):
                return
            self._in_program = True
        # The sample on which the program ended is its last: the limit it reached shows in
        # it (docs/protocol.md 7.3).
        taken = len(samples) if bool(running.all()) else int(np.argmin(running)) + 1
        if taken:
            self.writer.add_samples(self.record.id, self.next_sequence, samples[:taken])
            self.samples += taken
            self.next_sequence += taken
        if taken < len(samples):
            self._program_ended = True
            self.finish()

    def finish(self) -> None:
        """Store the summary of everything the session now holds (once)."""
        if self.done:
            return
        self.done = True
        record = self.record
        reason = "the bridge stopped during the session"
        if self._program_ended:
            reason += (
                f"; the device ran the program on alone ({self.samples} more samples kept"
                + (f", {self.lost_samples} no longer held" if self.lost_samples else "")
                + ")"
            )
        self.writer.commit_session(record.id).result()
        summary = recorded_summary(self.store, record, self.policy)
        self.writer.finish_session(
            record.id, status="interrupted", end_reason=reason, summary=summary
        ).result()
        self.record = self.store.session(record.id)
        _LOGGER.info("session %d: %d samples taken from the device", record.id, self.samples)
        if self._on_done is not None:
            self._on_done(self.record)


def recover_sessions(store: SessionStore, policy: SafetyPolicy) -> list[SessionRecord]:
    """Sessions a stopped process left ``running``: marked interrupted, with the summary of
    what they recorded (:func:`recorded_summary`); returns their records."""
    recovered: list[SessionRecord] = []
    for session_id in store.recover():
        record = store.session(session_id)
        store.finish_session(
            session_id,
            status="interrupted",
            end_reason=record.end_reason,
            summary=recorded_summary(store, record, policy),
        )
        store.compact_telemetry(session_id)
        recovered.append(store.session(session_id))
    return recovered
