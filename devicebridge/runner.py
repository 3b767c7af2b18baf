"""Runs one routine on one device: the async edge around the pure enforcement engine.

Every routine runs here, whatever started it: ``devicebridge run``, the demo, ``serve``
(a local start, a program a therapist pushed, a program started from the device's button)
and the QA bridge. :class:`RoutineRunner` wires a
:class:`~devicebridge.session.DeviceSession`, the engine
(:class:`~devicebridge.core.engine.MassageEngine` or :class:`~devicebridge.core.engine.LedEngine`),
the :class:`~devicebridge.storage.sessions.SessionStore` and a clock:

1. **Admission first**, before anything is sent to the device: frequency rules, cool-downs
   after recorded treatments and the daily LED dose (:func:`check_admission`, with the
   history and treatments of the store). A refusal raises :class:`RoutineRefusedError`
   listing every reason; the attempt is recorded with status ``refused`` (so ``history``
   shows it) and refused attempts never count as sessions for the frequency rules.
2. A stored session starts; every telemetry batch goes, in sequence order, to the engine
   and then to the store. Gap records (samples lost for good) store nothing and are counted.
   The engine sees each batch at once, where the session receives it (a telemetry observer,
   :meth:`DeviceSession.observe_telemetry`), not after a hop through a queue and a task:
   with many devices the safety check never waits behind the other devices' work.
3. Decisions become commands in one place, :mod:`devicebridge.core.actuation`. Safety
   first: a PAUSE, STOP or STOP_STEP starts STOP_ALL inside the observer, before the batch
   is stored or any other command is sent (over serial the frame is on the line before the
   observer returns). Everything else follows from the engine's state: a command task
   compares what the engine wants the device to do now with what the device last
   acknowledged, and sends what brings the two together, after any STOP_ALL in flight is
   acknowledged. A command lost with the link is sent again once the link is back; after a
   reconnect the massager is told its whole state again (a mask keeps its own timer).
4. The session ends with a summary (:func:`session_summary`: completion, time in band,
   out-of-band events, contact time per zone, dose per wavelength), stored with the session.

Storage stays off the safety path: telemetry and decisions go to a :class:`StoreWriter`,
one writer thread with its own SQLite connection, which commits what arrived every
``FLUSH_INTERVAL_S`` (0.25 s of wall time), and always before the run stores its summary.
Several runners on one store share the writer they are given (``serve`` gives all of its
runners one); a runner given none makes its own. A killed bridge loses at most that last
quarter second; :func:`recover_sessions` marks the run interrupted with the summary of
what was recorded.

The engine is timed by the device's sample clock, so a link that drops and comes back
(the session reconnects and backfills on its own) only delays decisions.

Device mode: when the device profile has the PROGRAM_TRANSFER capability, the runner also
installs the routine as a program on the device and starts it (or adopts a program the
device started by itself), so the device enforces its own hard limits even when the laptop
sleeps; the host engine still watches and can STOP_ALL at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, TypeVar

import numpy as np

from devicebridge import program_transfer
from devicebridge.clock import Clock
from devicebridge.core.actuation import (
    SAFETY_KINDS,
    LedApplied,
    LedTarget,
    MassagerApplied,
    led_target,
    massager_target,
    next_led_command,
    next_massager_command,
)
from devicebridge.core.admission import (
    Admission,
    PastSession,
    Treatment,
    check_admission,
    session_completion,
)
from devicebridge.core.engine import (
    CELSIUS_PER_UNIT,
    CONTACT_FLAG,
    KPA_PER_UNIT,
    MW_CM2_PER_UNIT,
    ZONE_NAMES,
    Decision,
    DecisionKind,
    LedEngine,
    MassageEngine,
    PressureState,
)
from devicebridge.core.faults_detect import FaultChecks
from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy, policy_zone
from devicebridge.core.reassembly import GapReason, TelemetryGap, TelemetryItem
from devicebridge.core.routine import (
    J_PER_MJ,
    DeviceKindName,
    LedStep,
    MassageStep,
    Routine,
    parse_routine,
)
from devicebridge.core.states import ConnectionState
from devicebridge.errors import (
    CommandError,
    CommandRejectedError,
    DeviceBridgeError,
    SessionClosedError,
    TransportError,
)
from devicebridge.session import DeviceSession, Subscription
from devicebridge.storage.sessions import (
    SampleChunk,
    SessionRecord,
    SessionStatus,
    SessionStore,
    SessionStoreError,
)
from protocols import (
    Ack,
    Capability,
    CommandBody,
    DeviceKind,
    Event,
    EventCode,
    SampleFormat,
    StopAll,
    TelemetryBatch,
)
from protocols.telemetry import MASSAGER_FLAG_PROGRAM_RUNNING

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "SAFETY_KINDS",
    "RoutineRefusedError",
    "RoutineRunError",
    "RoutineRunner",
    "RunMode",
    "RunSummary",
    "RunnerState",
    "StoreWriter",
    "recover_sessions",
    "session_summary",
]

SAMPLE_FORMAT_OF: Final = {
    DeviceKindName.MASSAGER: SampleFormat.MASSAGER_V1,
    DeviceKindName.LED_MASK: SampleFormat.LED_MASK_V1,
}
DEVICE_KIND_OF: Final = {
    DeviceKindName.MASSAGER: DeviceKind.MASSAGER,
    DeviceKindName.LED_MASK: DeviceKind.LED_MASK,
}
# How long the final STOP_ALL may wait for a link that is down (clock seconds).
FINAL_STOP_WAIT_S: Final = 5.0
# After a command failed on a link that is up (a timeout), wait this long before the next
# attempt (clock seconds), so a device that does not answer is not flooded.
COMMAND_RETRY_S: Final = 1.0
# How long the store writer collects rows before it commits them (wall seconds). Fewer,
# larger commits cost the event loop less than one per batch; a killed bridge loses at
# most this much telemetry.
FLUSH_INTERVAL_S: Final = 0.25
# Admission looks back at least a day (the daily LED dose), longer for frequency rules.
ADMISSION_MIN_LOOKBACK_DAYS: Final = 1.0
# How long a device program's start waits for the sample it starts at (clock seconds).
PROGRAM_MARK_WAIT_S: Final = 2.0
PROGRAM_MARK_POLL_S: Final = 0.02
# How many samples a resumption skips, at most, looking for the program's first (the
# sample marked at the start may come a notification or so before it).
RESUME_LEAD_IN_SAMPLES: Final = 1000
# Sample flag bit 3 of either kind (LED_MASK_FLAG_PROGRAM_RUNNING is the same bit): the
# device runs a program (docs/protocol.md 7.3).
PROGRAM_RUNNING_FLAG: Final = MASSAGER_FLAG_PROGRAM_RUNNING
# Decisions the live view counts as warnings.
_WARNING_KINDS: Final = frozenset({DecisionKind.WARNING, DecisionKind.LOWER_INTENSITY})


class RunMode(StrEnum):
    AUTO = "auto"  # device program when the device supports it, else host
    HOST = "host"  # the host engine drives the device command by command
    DEVICE = "device"  # insist on a device program (error when impossible)


# --------------------------------------------------------------------------- errors


class RoutineRunError(DeviceBridgeError):
    """A routine could not be run on a device."""


class RoutineRefusedError(RoutineRunError):
    """Admission refused the routine; ``refusals`` says why and from when it is possible."""

    def __init__(self, routine: Routine, admission: Admission, session_id: int | None) -> None:
        lines = [f"{routine.name!r} refused:"]
        for refusal in admission.refusals:
            lines.append(f"  - {refusal.message} (policy: {refusal.rule})")
        super().__init__("\n".join(lines))
        self.routine = routine
        self.admission = admission
        self.refusals = admission.refusals
        self.session_id = session_id

    @property
    def allowed_from(self) -> datetime | None:
        """The earliest time every refusal is lifted (None: not a matter of time)."""
        moments = [r.allowed_from for r in self.refusals]
        if any(m is None for m in moments):
            return None
        return max(m for m in moments if m is not None)


class DeviceMismatchError(RoutineRunError):
    """The routine is for another kind of device than the one connected."""

    def __init__(self, routine: Routine, device: str, kind: object) -> None:
        super().__init__(
            f"{device}: routine {routine.name!r} is for a {routine.device_kind.value}, "
            f"the device is a {getattr(kind, 'name', kind)}"
        )
        self.device = device


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class RunnerState:
    """What the UI shows; derived from the engine whenever it is asked for."""

    device: str
    routine: str
    device_kind: DeviceKindName
    step: int
    steps_total: int
    zone: str | None
    guidance: str
    step_remaining_s: float
    session_remaining_s: float
    elapsed_s: float
    paused: bool = False
    finished: bool = False
    pressure_kpa: float | None = None
    pressure_state: PressureState | None = None
    band_kpa: tuple[float, float] | None = None  # the step's target band
    cap_kpa: float | None = None  # the policy cap of the zone under the head
    contact: bool | None = None
    skin_temperature_c: float | None = None
    irradiance_mw_cm2: Mapping[str, float] | None = None
    dose_j_cm2: Mapping[str, float] | None = None
    dose_allowed_j_cm2: Mapping[str, float] | None = None
    last_warning: str | None = None
    warnings: int = 0
    gaps: int = 0
    mode: str = "host"


@dataclass(frozen=True, slots=True)
class RunSummary:
    session_id: int | None
    status: SessionStatus
    end_reason: str | None
    summary: Mapping[str, Any]
    decisions: tuple[Decision, ...] = field(default=())

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def session_summary(
    engine: MassageEngine | LedEngine,
    routine: Routine,
    *,
    mode: str,
    samples: int,
    gaps: int,
    lost_samples: int,
    command_errors: int,
) -> dict[str, Any]:
    """What a finished (or interrupted) session says of itself: stored, shown, published."""
    base: dict[str, Any] = {
        "routine": routine.name,
        "routine_version": routine.version,
        "device_kind": routine.device_kind.value,
        "mode": mode,
        "samples": samples,
        "steps_done": engine.summary.steps_done,
        "steps_total": engine.summary.steps_total,
        "completion": round(engine.summary.completion, 4),
        "completed": engine.summary.completed,
        "stopped_reason": engine.summary.stopped_reason,
        "warnings": sum(1 for d in engine.decisions if d.kind in _WARNING_KINDS),
        "gaps": gaps,
        "lost_samples": lost_samples,
        "command_errors": command_errors,
    }
    if isinstance(engine, MassageEngine):
        s = engine.summary
        base.update(
            contact_s=round(s.contact_s, 3),
            time_in_band_s=round(s.time_in_band_s, 3),
            in_band_fraction=round(s.in_band_fraction, 4),
            out_of_band_events=s.out_of_band_events,
            cap_events=s.cap_events,
            contact_s_by_zone={z: round(v, 3) for z, v in s.contact_s_by_zone.items()},
        )
    else:
        led = engine.summary
        base.update(
            dose_j_cm2={ch: round(v, 4) for ch, v in led.dose_j_cm2.items()},
            dose_allowed_j_cm2={ch: round(v, 4) for ch, v in engine.dose_allowed_j_cm2.items()},
            light_s=round(led.light_s, 3),
            max_temperature_c=(
                round(led.max_temperature_c, 2) if math.isfinite(led.max_temperature_c) else None
            ),
        )
    return base


# --------------------------------------------------------------------------- history


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def led_dose_of_samples(samples: np.ndarray[Any, Any], sample_rate_hz: float) -> dict[str, float]:
    """Dose per channel (J/cm²) delivered by LED mask samples."""
    dt_s = 1.0 / sample_rate_hz if sample_rate_hz > 0 else 0.0
    return {
        ch: float(samples[f"{ch}_centi_mw_cm2"].astype(np.float64).sum())
        * MW_CM2_PER_UNIT
        * dt_s
        / J_PER_MJ
        for ch in LED_CHANNELS
    }


def admission_history(store: SessionStore, *, since: datetime | None = None) -> list[PastSession]:
    """Past sessions as admission sees them; refused attempts are not sessions.

    A session that ended without a summary (the bridge was stopped) gets its LED dose from
    its stored telemetry, so a crash never hides light from the daily cap.
    """
    history: list[PastSession] = []
    for record in store.sessions(since=since):
        if record.status == "refused":
            continue
        try:
            kind = DeviceKindName(record.device_kind)
        except ValueError:
            continue
        dose = record.summary.get("dose_j_cm2")
        if kind is DeviceKindName.LED_MASK and not isinstance(dose, dict):
            _, samples = store.telemetry(record.id)
            dose = led_dose_of_samples(samples, record.sample_rate_hz) if len(samples) else {}
        history.append(
            PastSession(
                _aware(record.started_at),
                record.category,
                kind,
                record.status == "completed",
                {str(k): float(v) for k, v in (dose or {}).items()},
                session_completion(record.summary),
            )
        )
    return history


def recorded_treatments(store: SessionStore) -> list[Treatment]:
    return [Treatment(t.kind, _aware(t.performed_at), t.zones) for t in store.treatments()]


def check_routine_admission(
    routine: Routine, policy: SafetyPolicy, store: SessionStore | None, *, now: datetime
) -> Admission:
    # Only the longest window any rule looks back over: reading every session ever stored
    # made each admission slower as the history grew (and held the event loop meanwhile).
    lookback_days = max(
        [ADMISSION_MIN_LOOKBACK_DAYS]
        + [rule.per_days.value for rule in policy.frequency.values()]
        + ([routine.schedule.per_days] if routine.schedule else [])
    )
    since = now - timedelta(days=lookback_days)
    history = admission_history(store, since=since) if store is not None else []
    treatments = recorded_treatments(store) if store is not None else []
    return check_admission(routine, policy, now=now, history=history, treatments=treatments)


# --------------------------------------------------------------------------- store writer


@dataclass(slots=True)
class _SampleRun:
    """Contiguous batches of one session waiting for the writer: one row once committed.

    A row per 100 ms batch made the writer thread hand the GIL back and forth with the
    event loop for every row (SQLite releases it around each statement step), which cost
    the loop more than the writing itself.
    """

    session_id: int
    first_sequence: int
    end_sequence: int
    parts: list[np.ndarray[Any, Any]]
    received_at: datetime

    def chunk(self) -> SampleChunk:
        parts = self.parts
        samples = (
            parts[0]
            if len(parts) == 1
            else np.frombuffer(b"".join(part.tobytes() for part in parts), dtype=parts[0].dtype)
        )
        return SampleChunk(self.session_id, self.first_sequence, samples, self.received_at)


class StoreWriter:
    """Groups the telemetry and decisions of every run on one store into one commit.

    Commits ``interval_s`` after the first row waiting, through a
    connection of its own on a thread of its own, so neither the commits nor SQLite's
    checkpoints (fsync) hold up the event loop. :meth:`commit_session` writes what is left
    of one run at once, on the caller's thread and without yielding (so the end of a run
    lands at the same clock time on every run of a deterministic simulation); a run calls
    it before it stores its summary.
    """

    def __init__(self, store: SessionStore, *, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.path = store.path
        self.interval_s = interval_s
        self.commits = 0  # of the thread (for tests and benchmarks)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-store")
        self._thread_store: SessionStore | None = None  # opened and used on the thread only
        self._chunks: list[SampleChunk] = []  # closed runs (a gap came after them)
        self._runs: dict[int, _SampleRun] = {}  # the open run of each session
        self._decisions: list[tuple[int, Sequence[Decision]]] = []
        self._in_flight: list[tuple[Future[None], frozenset[int]]] = []
        self._timer: asyncio.Handle | None = None

    def add_samples(
        self, session_id: int, first_sequence: int, samples: np.ndarray[Any, Any]
    ) -> None:
        count = int(samples.shape[0])
        run = self._runs.get(session_id)
        if run is not None and run.end_sequence == first_sequence:
            run.parts.append(samples)
            run.end_sequence += count
        else:
            if run is not None:
                self._chunks.append(run.chunk())
            self._runs[session_id] = _SampleRun(
                session_id, first_sequence, first_sequence + count, [samples], _utc_now()
            )
        if self._timer is None:  # else _schedule() has nothing to do
            self._schedule()

    def add_decisions(self, session_id: int, decisions: Sequence[Decision]) -> None:
        self._decisions.append((session_id, tuple(decisions)))
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._submit)

    def _submit(self) -> None:
        """Hand everything added so far to the thread (its jobs run in order)."""
        self._timer = None
        self._prune()
        chunks, self._chunks = self._chunks, []
        chunks += [run.chunk() for run in self._runs.values()]
        self._runs.clear()
        decisions, self._decisions = self._decisions, []
        if not chunks and not decisions:
            return
        sessions = frozenset(c.session_id for c in chunks) | {d[0] for d in decisions}
        job = self._executor.submit(self._write, chunks, decisions)
        self._in_flight.append((job, sessions))

    def _write(
        self, chunks: list[SampleChunk], decisions: list[tuple[int, Sequence[Decision]]]
    ) -> None:
        self._store_of_thread().append_many(chunks, decisions)
        self.commits += 1

    def _store_of_thread(self) -> SessionStore:
        if self._thread_store is None:
            self._thread_store = SessionStore(self.path)
        return self._thread_store

    def run_now(self, operation: Callable[[SessionStore], T]) -> T:
        """``operation`` on the writer's connection, after the writes before it; blocks.

        A run's own writes go this way too, so the two connections never wait for each
        other's lock (SQLite's busy wait sleeps in steps of milliseconds).
        """
        self._prune()
        return self._executor.submit(lambda: operation(self._store_of_thread())).result()

    def _prune(self) -> None:
        still: list[tuple[Future[None], frozenset[int]]] = []
        for job, sessions in self._in_flight:
            if not job.done():
                still.append((job, sessions))
            elif job.exception() is not None:
                _LOGGER.error(
                    "%s: telemetry of sessions %s not stored: %s",
                    self.path,
                    sorted(sessions),
                    job.exception(),
                )
        self._in_flight = still

    def commit_session(self, session_id: int) -> None:
        """Everything of session ``session_id`` committed before this returns (blocks).

        Its rows still waiting are written after the thread's earlier writes (decisions
        keep their order). Raises :class:`SessionStoreError` if any of its rows could not
        be stored.
        """
        chunks = [c for c in self._chunks if c.session_id == session_id]
        run = self._runs.pop(session_id, None)
        if run is not None:
            chunks.append(run.chunk())
        decisions = [d for d in self._decisions if d[0] == session_id]
        self._chunks = [c for c in self._chunks if c.session_id != session_id]
        self._decisions = [d for d in self._decisions if d[0] != session_id]
        failure: BaseException | None = None
        for job, sessions in self._in_flight:
            if session_id in sessions:
                failure = failure or job.exception()  # waits for the job
        self._prune()
        if failure is not None:
            raise SessionStoreError(f"telemetry not stored: {failure}", path=self.path)
        self.run_now(lambda thread_store: thread_store.append_many(chunks, decisions))

    def close(self) -> None:
        """Stop the thread once its last write is done (without waiting here)."""
        if self._timer is not None:
            self._timer.cancel()
        self._submit()
        self._executor.submit(self._close_store)
        self._executor.shutdown(wait=False)

    def _close_store(self) -> None:
        if self._thread_store is not None:
            self._thread_store.close()
            self._thread_store = None


# --------------------------------------------------------------------------- recovery


def new_engine(
    routine: Routine,
    policy: SafetyPolicy,
    *,
    sample_rate_hz: float,
    dose_today_j_cm2: Mapping[str, float] | None = None,
    fault_checks: FaultChecks | None = None,
) -> MassageEngine | LedEngine:
    """The engine of ``routine``'s kind of device."""
    if routine.device_kind is DeviceKindName.MASSAGER:
        return MassageEngine(
            routine, policy, sample_rate_hz=sample_rate_hz, fault_checks=fault_checks
        )
    return LedEngine(
        routine, policy, sample_rate_hz=sample_rate_hz, dose_today_j_cm2=dose_today_j_cm2
    )


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
    :meth:`~devicebridge.session.DeviceSession.resume_after` that sample), the samples the
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
        self.writer.commit_session(record.id)
        summary = recorded_summary(self.store, record, self.policy)
        self.writer.run_now(
            lambda store: store.finish_session(
                record.id, status="interrupted", end_reason=reason, summary=summary
            )
        )
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
        recovered.append(store.session(session_id))
    return recovered


# --------------------------------------------------------------------------- the runner


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RoutineRunner:
    """Runs ``routine`` on the device of ``session`` under ``policy`` (see the module doc).

    ``store`` may be None (the demo): nothing is recorded and admission sees no history.
    ``writer`` is the :class:`StoreWriter` of ``store`` to record through (several runners
    on one store share one); without one the runner makes its own. ``now`` gives the
    calendar time for admission and the stored record; the engine itself only uses the
    device's sample clock. ``program_id`` records the session against a stored program (a
    therapist's). ``adopt_program``: the device already runs this routine as its program
    (started from its button); the runner watches and records it instead of starting it.
    """

    def __init__(
        self,
        session: DeviceSession,
        routine: Routine,
        policy: SafetyPolicy,
        *,
        store: SessionStore | None = None,
        writer: StoreWriter | None = None,
        clock: Clock | None = None,
        now: Callable[[], datetime] = _utc_now,
        device_serial: str | None = None,
        mode: RunMode = RunMode.AUTO,
        program_id: int | None = None,
        adopt_program: bool = False,
        on_update: Callable[[RunnerState], None] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        self.session = session
        self.routine = routine
        self.policy = policy
        self.store = store
        self.clock = clock or session.clock
        self._now = now
        self._device_serial = device_serial
        self.requested_mode = RunMode.DEVICE if adopt_program else mode
        self.mode = RunMode.HOST
        self.program_id = program_id
        self._adopt_program = adopt_program
        self._on_update = on_update
        self._on_decision = on_decision
        self.admission: Admission | None = None
        self.session_id: int | None = None
        self.engine: MassageEngine | LedEngine | None = None
        self.gaps = 0
        self.lost_samples = 0
        self.samples_recorded = 0
        self.device_ended: str | None = None  # the device rebooted or shut down mid-routine
        self.stop_all_writes = 0
        self.command_errors: list[str] = []
        self._final_note: str | None = None
        self._guidance = _Guidance()
        # What the device last acknowledged (core/actuation); the command task sends what
        # brings it to what the engine wants.
        self._massager = MassagerApplied()
        self._led = LedApplied()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._last_batch: TelemetryBatch | None = None
        self._reconnects_seen = 0
        self._state: RunnerState | None = None
        self._state_stale = False  # something changed since ``_state`` was built
        self._program_active = False
        self._program_watch: asyncio.Task[None] | None = None
        # Telemetry that came before the engine started, taken in order when it has.
        self._backlog: deque[TelemetryItem] = deque()
        self._armed = False  # the engine started: the observer takes batches as they come
        self._ended: str | None = None  # why the run ended: finished, device, error, requested
        self._stop_reason: str | None = None  # given to request_stop
        self._ended_event = asyncio.Event()
        self._failure: Exception | None = None  # raised again in the runner's task
        self._observing = False
        self._stops: set[asyncio.Task[Ack]] = set()  # STOP_ALL commands in flight
        self._writer: StoreWriter | None = writer
        self._own_writer = False

    # ------------------------------------------------------------------ admission

    def admit(self) -> Admission:
        """Check admission; on refusal record the attempt and raise RoutineRefusedError."""
        admission = check_routine_admission(self.routine, self.policy, self.store, now=self._now())
        self.admission = admission
        if not admission.allowed:
            session_id = None
            if self.store is not None:
                session_id = self.store.start_session(
                    routine_name=self.routine.name,
                    category=self.routine.category,
                    device_serial=self._device_serial or self.session.name,
                    device_kind=self.routine.device_kind.value,
                    sample_format=SAMPLE_FORMAT_OF[self.routine.device_kind],
                    sample_rate_hz=0.0,
                    routine_text=self.routine.source_text,
                    program_id=None if self.program_id is None else str(self.program_id),
                    started_at=self._now(),
                )
                self.store.finish_session(
                    session_id,
                    status="refused",
                    end_reason="; ".join(r.message for r in admission.refusals),
                    summary={"refusals": [refusal_json(r) for r in admission.refusals]},
                    ended_at=self._now(),
                )
            raise RoutineRefusedError(self.routine, admission, session_id)
        return admission

    # ------------------------------------------------------------------ state for the UI

    @property
    def state(self) -> RunnerState | None:
        """What a live view shows: built when asked for, not on every batch."""
        if self._state_stale:
            self._state_stale = False
            self._state = self._build_state()
        return self._state

    def _publish(self) -> None:
        if self.engine is None:
            return
        self._state_stale = True
        if self._on_update is not None:
            state = self.state
            assert state is not None  # built: the engine exists
            self._on_update(state)

    def _build_state(self) -> RunnerState:
        engine = self.engine
        assert engine is not None  # marked stale only once the engine exists
        batch = self._last_batch
        last = batch.samples[-1] if batch is not None and len(batch) else None
        first = engine.first_sequence
        elapsed_s = 0.0
        if batch is not None and first is not None:
            elapsed_s = (batch.end_sequence - first) * engine.dt_s
        steps = self.routine.steps
        view = self._guidance
        view.fold(engine.decisions)
        guidance = view.text if self._final_note is None else self._final_note
        step_left = engine.step_remaining_s
        later = sum(_step_time_s(s) for s in steps[engine.step_number :])
        common: dict[str, Any] = {
            "device": self.session.name,
            "routine": self.routine.name,
            "device_kind": self.routine.device_kind,
            "step": engine.step_number,
            "steps_total": len(steps),
            "guidance": guidance,
            "elapsed_s": elapsed_s,
            "finished": engine.finished,
            "last_warning": view.last_warning,
            "warnings": view.warnings,
            "gaps": self.gaps,
            "mode": self.mode.value,
            "step_remaining_s": 0.0 if engine.finished else step_left,
            "session_remaining_s": 0.0 if engine.finished else step_left + later,
        }
        if isinstance(engine, MassageEngine):
            step = engine.current_step
            values: dict[str, Any] = {
                "zone": step.zone,
                "paused": engine.paused,
                "band_kpa": (step.pressure_min_kpa, step.pressure_max_kpa),
                "pressure_state": engine.state,
            }
            if last is not None:
                zone_name = ZONE_NAMES.get(int(last["zone"]), step.zone)
                values["pressure_kpa"] = float(last["pressure_dapa"]) * KPA_PER_UNIT
                values["contact"] = bool(int(last["flags"]) & CONTACT_FLAG)
                values["skin_temperature_c"] = (
                    float(last["skin_temperature_centi_c"]) * CELSIUS_PER_UNIT
                )
                values["cap_kpa"] = self.policy.zones[policy_zone(zone_name)].cap_kpa.value
            else:
                values["cap_kpa"] = self.policy.zones[step.policy_zone].cap_kpa.value
        else:
            values = {
                "zone": "face",
                "dose_j_cm2": dict(engine.summary.dose_j_cm2),
                "dose_allowed_j_cm2": dict(engine.dose_allowed_j_cm2),
            }
            if last is not None:
                values["irradiance_mw_cm2"] = {
                    ch: float(last[f"{ch}_centi_mw_cm2"]) * MW_CM2_PER_UNIT for ch in LED_CHANNELS
                }
                values["skin_temperature_c"] = (
                    float(last["skin_temperature_centi_c"]) * CELSIUS_PER_UNIT
                )
        return RunnerState(**common, **values)

    # ------------------------------------------------------------------ running

    async def run(self, *, max_duration_s: float | None = None) -> RunSummary:
        """Admit, run until the engine finishes (or ``max_duration_s`` of clock time), store.

        Starts the session if it has not been started (subscribing first, so no sample is
        missed). Raises :class:`RoutineRefusedError` before anything reaches the device.
        """
        if self.admission is None:
            self.admit()
        # Every item is judged and recorded by the observer, inside the transport's receive
        # callback: no hand-off to this task per batch (see _take).
        remove_observer = self.session.observe_telemetry(self._observe)
        self._observing = True
        try:
            if self.session.state is ConnectionState.DISCONNECTED:
                await self.session.start()
            await self.session.wait_ready()
            return await self._run(max_duration_s)
        finally:
            self._observing = self._armed = False
            remove_observer()
            self._backlog.clear()

    def request_stop(self, reason: str) -> None:
        """End the run as ``stopped`` with ``reason`` (the device is stopped, the record kept)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._end("requested")

    async def _run(self, max_duration_s: float | None) -> RunSummary:
        info = self.session.device_info
        expected = DEVICE_KIND_OF[self.routine.device_kind]
        if info.kind != expected:
            raise DeviceMismatchError(self.routine, self.session.name, info.kind)
        rate_hz = float(info.profile.sample_rate_hz)
        assert self.admission is not None
        engine = self.engine = new_engine(
            self.routine,
            self.policy,
            sample_rate_hz=rate_hz,
            dose_today_j_cm2=self.admission.dose_today_j_cm2,
            fault_checks=FaultChecks(),
        )
        # Nothing is commanded yet: the device is not expected to run its motor.
        self._set_motor_commanded(False)
        if self.store is not None:
            if self._writer is None:
                self._writer, self._own_writer = StoreWriter(self.store), True
            started_at = self._now()
            try:
                self.session_id = self._writer.run_now(
                    lambda thread_store: thread_store.start_session(
                        routine_name=self.routine.name,
                        category=self.routine.category,
                        device_serial=self._device_serial or info.serial_number,
                        device_kind=self.routine.device_kind.value,
                        sample_format=SAMPLE_FORMAT_OF[self.routine.device_kind],
                        sample_rate_hz=rate_hz,
                        routine_text=self.routine.source_text,
                        program_id=None if self.program_id is None else str(self.program_id),
                        started_at=started_at,
                    )
                )
            except BaseException:
                self._close_writer()
                raise
        self._reconnects_seen = self.session.reconnects
        self._worker = asyncio.get_running_loop().create_task(
            self._command_task(), name=f"routine commands {self.session.name}"
        )
        status: SessionStatus = "interrupted"
        end_reason: str | None = "the link closed before the routine ended"
        try:
            if await self._device_program_wanted(info.profile.capabilities):
                await self._run_device_program()
            self._handle(engine.start())
            self._arm()
            ended = await self._until_ended(max_duration_s)
            summary = engine.summary
            if summary.completed:
                status, end_reason = "completed", None
            elif summary.stopped_reason is not None:
                status, end_reason = "stopped", summary.stopped_reason
            elif ended == "requested":
                status, end_reason = "stopped", self._stop_reason
            elif ended == "device":
                status, end_reason = "interrupted", self.device_ended
            elif ended == "duration":
                status, end_reason = "stopped", "time limit of the run reached"
        except asyncio.CancelledError:
            status, end_reason = "stopped", self._stop_reason or "cancelled by the user"
            raise
        finally:
            self._observing = self._armed = False
            await self._shutdown()
            try:
                if self._writer is not None and self.session_id is not None:
                    # Everything of this run committed before its summary is.
                    self._writer.commit_session(self.session_id)
            finally:
                try:
                    result = self._finish(status, end_reason)
                finally:
                    self._close_writer()
        return result

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and self._own_writer:
            writer.close()

    async def _until_ended(self, max_duration_s: float | None) -> str:
        """Wait until the observer ends the run, the session closes or time is up; why."""
        waits = [
            asyncio.ensure_future(self._ended_event.wait()),
            asyncio.ensure_future(self.session.wait_closed()),
        ]
        if max_duration_s is not None:
            waits.append(asyncio.ensure_future(self.clock.sleep(max_duration_s)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if self._failure is not None:
            raise self._failure
        if self._ended is not None:
            return self._ended
        return "closed" if waits[1].done() and not waits[1].cancelled() else "duration"

    async def feed(self, item: TelemetryItem) -> list[Decision]:
        """One telemetry item by hand: engine first, safety stop at once, then the rest.

        :meth:`run` does the same in the session's telemetry observer (:meth:`_take`).
        """
        decisions = self._judge(item)
        self._record(item, decisions)
        return decisions

    # ------------------------------------------------------------------ the safety path

    def _observe(self, item: TelemetryItem) -> None:
        """The session's telemetry observer: runs inside the transport's receive callback."""
        if not self._observing:
            return
        if self._armed:
            self._take(item)
        else:
            self._backlog.append(item)

    def _arm(self) -> None:
        """The engine has started: take what came meanwhile, in order, then live."""
        self._armed = True
        while self._backlog:
            self._take(self._backlog.popleft())

    def _take(self, item: TelemetryItem) -> None:
        """Judge (a safety stop starts at once), then record one item; end the run if due."""
        if self._ended is not None:
            return  # the run is over: nothing after its end belongs to it
        engine = self.engine
        assert engine is not None
        try:
            self._record(item, self._judge(item))
        except Exception as exc:  # raised again in the runner's task, which ends the run
            self._failure = exc
            self._end("error")
            return
        if engine.finished:
            self._end("finished")
        elif self.device_ended is not None:
            self._end("device")

    def _end(self, reason: str) -> None:
        if self._ended is None:
            self._ended = reason
            self._ended_event.set()

    def _judge(self, item: TelemetryItem) -> list[Decision]:
        """Engine on one item; a safety decision starts STOP_ALL before this returns."""
        engine = self.engine
        assert engine is not None
        if isinstance(item, TelemetryGap):
            self.gaps += 1
            self.lost_samples += item.sample_count
            if item.reason is GapReason.DEVICE_REBOOTED:
                self.device_ended = "device rebooted"
            elif item.reason is GapReason.DEVICE_SHUT_DOWN:
                self.device_ended = "device shut down"
            return []
        if item.sample_format is not SAMPLE_FORMAT_OF[self.routine.device_kind]:
            return []
        decisions = engine.feed(item.samples, item.first_sequence)
        # Most batches decide nothing: no generator for them.
        if decisions and any(d.kind in SAFETY_KINDS for d in decisions):
            self._safety_stop()
        return decisions

    def _record(self, item: TelemetryItem, decisions: list[Decision]) -> None:
        """The rest of one judged item: store, reconnect handling, commands, UI state."""
        if isinstance(item, TelemetryGap):
            return
        if item.sample_format is not SAMPLE_FORMAT_OF[self.routine.device_kind]:
            return
        self._last_batch = item
        self.samples_recorded += len(item)
        if self._writer is not None and self.session_id is not None:
            self._writer.add_samples(self.session_id, item.first_sequence, item.samples)
        reconnects = self.session.reconnects
        if reconnects != self._reconnects_seen:
            self._reconnects_seen = reconnects
            self._after_reconnect()
        self._handle(decisions)

    def _handle(self, decisions: Sequence[Decision]) -> None:
        if decisions:
            if self._writer is not None and self.session_id is not None:
                self._writer.add_decisions(self.session_id, decisions)
            if self._on_decision is not None:
                for decision in decisions:
                    self._on_decision(decision)
            self._wake.set()  # what the engine wants of the device may have changed
        self._publish()

    def _after_reconnect(self) -> None:
        """The link came back: the massager is told its whole state again.

        A mask keeps its own treatment timer across a link drop, so its treatment is left
        alone (a command that failed meanwhile is sent again all the same).
        """
        if self.routine.device_kind is DeviceKindName.MASSAGER:
            self._massager.forget()
            self._set_motor_commanded(False)
        self._wake.set()

    # ------------------------------------------------------------------ commands

    def _safety_stop(self) -> None:
        """STOP_ALL now (started before this returns); the command task waits for its ack
        before it sends anything else, and then sends only what the engine still wants."""
        self.stop_all_writes += 1
        # STOP_ALL also ends a device program: from here on the host drives the device.
        self._program_active = False
        self._set_motor_commanded(False)
        try:
            stop = self.session.send_soon(StopAll())
        except (TransportError, CommandError, SessionClosedError) as exc:
            self._command_failed(StopAll(), exc)
            return
        self._stops.add(stop)
        stop.add_done_callback(self._stop_done)

    def _stop_done(self, stop: asyncio.Task[Ack]) -> None:
        self._stops.discard(stop)
        if stop.cancelled():
            return
        exc = stop.exception()
        if exc is None:
            self._acknowledged(StopAll())
            return
        if not isinstance(exc, DeviceBridgeError):
            _LOGGER.error("%s: STOP_ALL failed", self.session.name, exc_info=exc)
        self._command_failed(StopAll(), exc)

    async def _stops_settled(self) -> None:
        while self._stops:
            await asyncio.wait(set(self._stops))

    def _next_command(self) -> CommandBody | None:
        engine = self.engine
        if engine is None or engine.finished or self._program_active:
            return None  # a finished run's last STOP_ALL comes from _shutdown
        if isinstance(engine, MassageEngine):
            return next_massager_command(massager_target(engine), self._massager)
        return next_led_command(engine, self._led)

    def _acknowledged(self, command: CommandBody, led_sent_for: LedTarget | None = None) -> None:
        if self.routine.device_kind is DeviceKindName.MASSAGER:
            was_on = self._massager.motor_on
            self._massager.acknowledged(command)
            if self._massager.motor_on != was_on:
                self._set_motor_commanded(self._massager.motor_on)
        else:
            self._led.acknowledged(command, led_sent_for)

    def _command_failed(self, command: CommandBody, exc: BaseException) -> None:
        """What the device does is no longer known: the command task sends it again."""
        self.command_errors.append(f"{type(command).__name__}: {exc}")
        _LOGGER.warning("%s: %s failed: %s", self.session.name, type(command).__name__, exc)
        if self.routine.device_kind is DeviceKindName.MASSAGER:
            self._massager.forget()
            self._set_motor_commanded(False)
        else:
            self._led.failed()
        self._wake.set()

    def _set_motor_commanded(self, on: bool) -> None:
        """The engine expects a running motor only from the newest sample on (see
        :meth:`MassageEngine.motor_commanded_from`)."""
        engine = self.engine
        if isinstance(engine, MassageEngine):
            engine.motor_commanded_from((self.session.live_sequence_end or 0) if on else None)

    async def _command_task(self) -> None:
        """Sends what brings the device to what the engine wants, whenever that changes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                # Nothing overtakes a safety stop: it is acknowledged before the next write.
                await self._stops_settled()
                if self.session.state is not ConnectionState.READY:
                    try:
                        await self.session.wait_ready()
                    except SessionClosedError:
                        return
                command = self._next_command()
                if command is None:
                    break
                engine = self.engine
                # What a START_LED starts is the treatment wanted when it is sent.
                sent_for = led_target(engine) if isinstance(engine, LedEngine) else None
                if isinstance(command, StopAll):
                    self.stop_all_writes += 1
                try:
                    await self.session.send(command)
                except SessionClosedError:
                    return
                except (TransportError, CommandError) as exc:
                    self._command_failed(command, exc)
                    if isinstance(exc, CommandRejectedError):
                        break  # the device said no: again only when something changes
                    await self.clock.sleep(COMMAND_RETRY_S)
                    continue
                self._acknowledged(command, sent_for)

    async def _shutdown(self) -> None:
        """Actuators off at the end, whatever the ending; stop the command task."""
        for task in (self._worker, self._program_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._worker = self._program_watch = None
        await self._stops_settled()
        if self.session.state is ConnectionState.CLOSED:
            return
        with contextlib.suppress(DeviceBridgeError):
            await self.session.wait_ready(FINAL_STOP_WAIT_S)
            await self.session.send(StopAll())
            self.stop_all_writes += 1

    def _finish(self, status: SessionStatus, end_reason: str | None) -> RunSummary:
        engine = self.engine
        assert engine is not None
        summary = self.summary_dict()
        session_id, writer = self.session_id, self._writer
        ended_at = self._now()
        if writer is not None and session_id is not None:
            writer.run_now(
                lambda store: store.finish_session(
                    session_id,
                    status=status,
                    end_reason=end_reason,
                    summary=summary,
                    ended_at=ended_at,
                )
            )
        if status != "completed" and end_reason:
            self._final_note = f"Session {status}: {end_reason}"
        self._publish()
        return RunSummary(self.session_id, status, end_reason, summary, tuple(engine.decisions))

    def summary_dict(self) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        return session_summary(
            engine,
            self.routine,
            mode=self.mode.value,
            samples=self.samples_recorded,
            gaps=self.gaps,
            lost_samples=self.lost_samples,
            command_errors=len(self.command_errors),
        )

    # ------------------------------------------------------------------ device programs

    async def _device_program_wanted(self, capabilities: int) -> bool:
        if self.requested_mode is RunMode.HOST:
            return False
        supported = bool(Capability(capabilities) & Capability.PROGRAM_TRANSFER)
        if self.requested_mode is RunMode.DEVICE and not supported:
            raise RoutineRunError(
                f"{self.session.name}: cannot run as a device program: "
                "the device has no PROGRAM_TRANSFER"
            )
        return supported

    async def _run_device_program(self) -> None:
        """Install and start the routine as the device's program (or adopt the one the
        device runs already), and watch for its end."""
        events = self.session.events()
        # Before the program starts: a bridge killed at any moment after it leaves the mark.
        await self._mark_device_program()
        if not self._adopt_program:
            program = program_transfer.program_from_routine(self.routine, self.policy)
            await program_transfer.install_program(self.session, program)
            await program_transfer.start_program(self.session)
        self.mode = RunMode.DEVICE
        self._program_active = True
        self._set_motor_commanded(True)
        self._program_watch = asyncio.get_running_loop().create_task(
            self._watch_program(events), name=f"program events {self.session.name}"
        )

    async def _mark_device_program(self) -> None:
        """Store from about which sample the device will run the routine alone, should this
        bridge stop (see :class:`SessionResumption`, which skips the samples before the
        program's first): the newest sample received (the stream runs, so one comes within
        a notification interval)."""
        writer, session_id = self._writer, self.session_id
        if writer is None or session_id is None:
            return
        start = self.session.live_sequence_end
        waited_s = 0.0
        while start is None and waited_s < PROGRAM_MARK_WAIT_S:
            await self.clock.sleep(PROGRAM_MARK_POLL_S)
            waited_s += PROGRAM_MARK_POLL_S
            start = self.session.live_sequence_end
        if start is not None:
            writer.run_now(lambda store: store.mark_device_program(session_id, start))

    async def _watch_program(self, events: Subscription[Event]) -> None:
        """When the device program ends before the engine does, the host takes over."""
        try:
            async for event in events:
                if event.code != EventCode.PROGRAM_FINISHED or not self._program_active:
                    continue
                self._program_active = False
                # The program turned its actuators off as it ended.
                self._massager.forget()
                self._led.failed()
                self._set_motor_commanded(False)
                self._wake.set()
                return
        finally:
            await events.aclose()


@dataclass(slots=True)
class _Guidance:
    """What the live view says, folded from the engine's decisions as they come."""

    seen: int = 0  # decisions folded so far
    text: str = ""  # what to do now
    step_text: str = ""  # the guidance of the step in progress
    last_warning: str | None = None
    warnings: int = 0

    def fold(self, decisions: Sequence[Decision]) -> None:
        for decision in decisions[self.seen :]:
            kind = decision.kind
            if kind in _WARNING_KINDS:
                self.warnings += 1
                self.last_warning = decision.message
                continue
            if kind is DecisionKind.NEXT_STEP or decision.reason == "step_start":
                self.step_text = decision.message
            if kind in SAFETY_KINDS:
                self.last_warning = decision.message
            if kind is DecisionKind.GUIDANCE and decision.reason != "step_start":
                self.last_warning = decision.message  # a hint such as "wrong zone"
            elif kind is DecisionKind.RESUME:
                self.text = self.step_text  # back to the step after a pause
            else:
                self.text = decision.message
        self.seen = len(decisions)


def _step_time_s(step: MassageStep | LedStep) -> float:
    return step.contact_time_s if isinstance(step, MassageStep) else step.duration_s


def refusal_json(refusal: Any) -> dict[str, Any]:
    return {
        "reason": refusal.reason,
        "message": refusal.message,
        "allowed_from": refusal.allowed_from.isoformat() if refusal.allowed_from else None,
        "rule": refusal.rule,
    }
