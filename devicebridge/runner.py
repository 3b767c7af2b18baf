"""Runs one routine on one device: the async edge around the pure enforcement engine.

:class:`RoutineRunner` wires a :class:`~devicebridge.session.DeviceSession`, the engine
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
   Everything else about the batch (the store, UI state, commands) follows in the runner's
   task, from the session's subscription, with the decisions the observer took.
3. Decisions become commands. Safety first: a PAUSE, STOP or STOP_STEP starts STOP_ALL
   inside the observer, before the batch is stored or any other command is sent (over
   serial the frame is on the line before the observer returns). Everything else (zone,
   mode and intensity of a massager; START_LED / STOP_LED of a mask) goes through a command
   worker, in order, after any STOP_ALL in flight is acknowledged; a safety stop drops
   every queued command that has not been written yet, so a stale "resume" can never
   restart a stopped motor.
4. The session ends with a summary (completion, time in band, out-of-band events, contact
   time per zone, dose per wavelength), stored with the session.

Storage stays off the safety path: telemetry and decisions go to one writer thread with
its own SQLite connection, which commits what arrived every ``FLUSH_INTERVAL_S`` (0.25 s
of wall time), and always before the run stores its summary. A killed bridge loses at
most that last quarter second; :meth:`SessionStore.recover` marks the run interrupted.

The engine is timed by the device's sample clock, so a link that drops and comes back
(the session reconnects and backfills on its own) only delays decisions; after a
reconnect the runner puts the device back into the state the engine wants (the device
may have kept running, or rebooted).

Device mode: when :mod:`devicebridge.program_transfer` is installed and the device profile
has the PROGRAM_TRANSFER capability, the runner also installs the routine as a program on
the device and starts it, so the device enforces its own hard limits even when the laptop
sleeps; the host engine still watches and can STOP_ALL at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final, TypeVar

import numpy as np

from devicebridge.clock import Clock
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
    ZONE_CODES,
    Decision,
    DecisionKind,
    LedEngine,
    MassageEngine,
    PressureState,
)
from devicebridge.core.faults_detect import FaultChecks
from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy, policy_zone
from devicebridge.core.reassembly import GapReason, TelemetryGap, TelemetryItem
from devicebridge.core.routine import J_PER_MJ, DeviceKindName, LedStep, MassageStep, Routine
from devicebridge.core.states import ConnectionState
from devicebridge.errors import CommandError, DeviceBridgeError, SessionClosedError, TransportError
from devicebridge.session import DeviceSession, Subscription
from devicebridge.storage.sessions import (
    SampleChunk,
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
    MassageMode,
    SampleFormat,
    SetIntensity,
    SetMode,
    SetZone,
    StartLed,
    StopAll,
    StopLed,
    TelemetryBatch,
    Zone,
)

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

SAFETY_KINDS: Final = frozenset({DecisionKind.PAUSE, DecisionKind.STOP, DecisionKind.STOP_STEP})
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
PROGRAM_TRANSFER_MODULE: Final = "devicebridge.program_transfer"
# How long the store writer collects rows before it commits them (wall seconds). Committing
# every batch at once (group commit) meant a thread hand-off and a transaction per 100 ms
# batch per device, which cost more than the whole routine engine (a 15-minute virtual
# routine ran 40% slower); every statement of the writer thread is a GIL hand-off with a
# busy event loop, so fewer, larger commits cost it less. A killed bridge loses at most
# this much telemetry.
FLUSH_INTERVAL_S: Final = 0.25
# Admission looks back at least a day (the daily LED dose), longer for frequency rules.
ADMISSION_MIN_LOOKBACK_DAYS: Final = 1.0


class RunMode(StrEnum):
    AUTO = "auto"  # device program when the device and the host support it, else host
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
    """What the UI shows; a fresh snapshot after every batch and decision."""

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
        self._users = 0

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


_WRITERS: weakref.WeakKeyDictionary[SessionStore, StoreWriter] = weakref.WeakKeyDictionary()


def _acquire_writer(store: SessionStore) -> StoreWriter:
    """The writer every run on ``store`` shares (one commit for all of them)."""
    writer = _WRITERS.get(store)
    if writer is None:
        writer = _WRITERS[store] = StoreWriter(store)
    writer._users += 1
    return writer


def _release_writer(store: SessionStore, writer: StoreWriter) -> None:
    writer._users -= 1
    if writer._users <= 0:
        if _WRITERS.get(store) is writer:
            del _WRITERS[store]
        writer.close()


# --------------------------------------------------------------------------- the runner


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RoutineRunner:
    """Runs ``routine`` on the device of ``session`` under ``policy`` (see the module doc).

    ``store`` may be None (the demo): nothing is recorded and admission sees no history.
    ``now`` gives the calendar time for admission and the stored record; the engine itself
    only uses the device's sample clock.
    """

    def __init__(
        self,
        session: DeviceSession,
        routine: Routine,
        policy: SafetyPolicy,
        *,
        store: SessionStore | None = None,
        clock: Clock | None = None,
        now: Callable[[], datetime] = _utc_now,
        device_serial: str | None = None,
        mode: RunMode = RunMode.AUTO,
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
        self.requested_mode = mode
        self.mode = RunMode.HOST
        self._on_update = on_update
        self._on_decision = on_decision
        self.admission: Admission | None = None
        self.session_id: int | None = None
        self.engine: MassageEngine | LedEngine | None = None
        self.decisions: list[Decision] = []
        self.gaps = 0
        self.lost_samples = 0
        self.device_ended: str | None = None  # the device rebooted or shut down mid-routine
        self.stop_all_writes = 0
        self.command_errors: list[str] = []
        self._warnings = 0
        self._last_warning: str | None = None
        self._guidance = ""
        self._generation = 0
        self._commands: asyncio.Queue[tuple[int, list[CommandBody]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._stop_owed = False
        self._intensity_cap: int | None = None
        self._step_started_s = 0.0
        self._last_batch: TelemetryBatch | None = None
        self._reconnects_seen = 0
        self._state: RunnerState | None = None
        self._state_stale = False  # something changed since ``_state`` was built
        self._first_sequence: int | None = None
        self._program_active = False
        self._program_watch: asyncio.Task[None] | None = None
        self._steps: tuple[MassageStep | LedStep, ...] = routine.steps
        # Telemetry that came before the engine started, taken in order when it has.
        self._backlog: deque[TelemetryItem] = deque()
        self._armed = False  # the engine started: the observer takes batches as they come
        self._ended: str | None = None  # why the run ended: "finished", "device", "error"
        self._ended_event = asyncio.Event()
        self._failure: Exception | None = None  # raised again in the runner's task
        self._observing = False
        self._stops: set[asyncio.Task[Ack]] = set()  # STOP_ALL commands in flight
        self._writer: StoreWriter | None = None

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
                    started_at=self._now(),
                )
                self.store.finish_session(
                    session_id,
                    status="refused",
                    end_reason="; ".join(r.message for r in admission.refusals),
                    summary={"refusals": [_refusal_json(r) for r in admission.refusals]},
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
        elapsed_s = 0.0
        if batch is not None and self._first_sequence is not None:
            elapsed_s = (batch.end_sequence - self._first_sequence) * engine.dt_s
        steps = self._steps
        index = engine.step_number - 1
        steps_total = len(steps)
        common: dict[str, Any] = {
            "device": self.session.name,
            "routine": self.routine.name,
            "device_kind": self.routine.device_kind,
            "step": engine.step_number,
            "steps_total": steps_total,
            "guidance": self._guidance,
            "elapsed_s": elapsed_s,
            "finished": engine.finished,
            "last_warning": self._last_warning,
            "warnings": self._warnings,
            "gaps": self.gaps,
            "mode": self.mode.value,
        }
        if isinstance(engine, MassageEngine):
            step = engine.current_step
            later = sum(_step_time_s(s) for s in steps[index + 1 :])
            step_left = 0.0 if engine.finished else engine.step_remaining_s
            values: dict[str, Any] = {
                "zone": step.zone,
                "step_remaining_s": step_left,
                "session_remaining_s": 0.0 if engine.finished else step_left + later,
                "paused": engine.paused,
                "band_kpa": (step.pressure_min_kpa, step.pressure_max_kpa),
                "pressure_state": engine.state,
            }
            if last is not None:
                zone_name = _zone_name(int(last["zone"])) or step.zone
                values["pressure_kpa"] = float(last["pressure_dapa"]) * KPA_PER_UNIT
                values["contact"] = bool(int(last["flags"]) & CONTACT_FLAG)
                values["skin_temperature_c"] = (
                    float(last["skin_temperature_centi_c"]) * CELSIUS_PER_UNIT
                )
                values["cap_kpa"] = self.policy.zones[policy_zone(zone_name)].cap_kpa.value
            else:
                values["cap_kpa"] = self.policy.zones[step.policy_zone].cap_kpa.value
        else:
            led_step = engine.current_step
            done_s = max(0.0, elapsed_s - self._step_started_s)
            step_left = 0.0 if engine.finished else max(0.0, led_step.duration_s - done_s)
            later = sum(_step_time_s(s) for s in steps[index + 1 :])
            values = {
                "zone": "face",
                "step_remaining_s": step_left,
                "session_remaining_s": 0.0 if engine.finished else step_left + later,
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

    async def _run(self, max_duration_s: float | None) -> RunSummary:
        info = self.session.device_info
        expected = DEVICE_KIND_OF[self.routine.device_kind]
        if info.kind != expected:
            raise DeviceMismatchError(self.routine, self.session.name, info.kind)
        rate_hz = float(info.profile.sample_rate_hz)
        assert self.admission is not None
        if self.routine.device_kind is DeviceKindName.MASSAGER:
            self.engine = MassageEngine(
                self.routine, self.policy, sample_rate_hz=rate_hz, fault_checks=FaultChecks()
            )
        else:
            self.engine = LedEngine(
                self.routine,
                self.policy,
                sample_rate_hz=rate_hz,
                dose_today_j_cm2=self.admission.dose_today_j_cm2,
            )
        if self.store is not None:
            store = self.store
            self._writer = writer = _acquire_writer(store)
            started_at = self._now()
            try:
                self.session_id = writer.run_now(
                    lambda thread_store: thread_store.start_session(
                        routine_name=self.routine.name,
                        category=self.routine.category,
                        device_serial=self._device_serial or info.serial_number,
                        device_kind=self.routine.device_kind.value,
                        sample_format=SAMPLE_FORMAT_OF[self.routine.device_kind],
                        sample_rate_hz=rate_hz,
                        routine_text=self.routine.source_text,
                        started_at=started_at,
                    )
                )
            except BaseException:
                self._release_writer()
                raise
        self._reconnects_seen = self.session.reconnects
        self._worker = asyncio.get_running_loop().create_task(
            self._command_worker(), name=f"routine commands {self.session.name}"
        )
        status: SessionStatus = "interrupted"
        end_reason: str | None = "the link closed before the routine ended"
        try:
            if await self._device_program_wanted(info.profile.capabilities):
                await self._install_device_program()
            self._handle(self.engine.start(), None)
            self._arm()
            ended = await self._until_ended(max_duration_s)
            summary = self.engine.summary
            if summary.completed:
                status, end_reason = "completed", None
            elif summary.stopped_reason is not None:
                status, end_reason = "stopped", summary.stopped_reason
            elif ended == "device":
                status, end_reason = "interrupted", self.device_ended
            elif ended == "duration":
                status, end_reason = "stopped", "time limit of the run reached"
        except asyncio.CancelledError:
            status, end_reason = "stopped", "cancelled by the user"
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
                    self._release_writer()
        return result

    def _release_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None and self.store is not None:
            _release_writer(self.store, writer)

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
        if self._first_sequence is None:
            self._first_sequence = item.first_sequence
        decisions = engine.feed(item.samples, item.first_sequence)
        # Most batches decide nothing: no generator for them.
        if self._stop_owed or (decisions and any(d.kind in SAFETY_KINDS for d in decisions)):
            self._safety_stop()
        return decisions

    def _record(self, item: TelemetryItem, decisions: list[Decision]) -> None:
        """The rest of one judged item: store, reconnect handling, commands, UI state."""
        if isinstance(item, TelemetryGap):
            return
        if item.sample_format is not SAMPLE_FORMAT_OF[self.routine.device_kind]:
            return
        self._last_batch = item
        if self._writer is not None and self.session_id is not None:
            self._writer.add_samples(self.session_id, item.first_sequence, item.samples)
        reconnects = self.session.reconnects
        if reconnects != self._reconnects_seen:
            self._reconnects_seen = reconnects
            self._resync()
        self._handle(decisions, item)

    def _handle(self, decisions: Sequence[Decision], batch: TelemetryBatch | None) -> None:
        del batch
        if decisions:
            self.decisions.extend(decisions)
            if self._writer is not None and self.session_id is not None:
                self._writer.add_decisions(self.session_id, decisions)
        for decision in decisions:
            self._apply(decision)
            if self._on_decision is not None:
                self._on_decision(decision)
        self._publish()

    # ------------------------------------------------------------------ decisions -> commands

    def _apply(self, decision: Decision) -> None:
        kind = decision.kind
        if kind is DecisionKind.WARNING or kind is DecisionKind.LOWER_INTENSITY:
            self._warnings += 1
            self._last_warning = decision.message
        elif kind in SAFETY_KINDS:
            self._last_warning = decision.message
        if kind is DecisionKind.GUIDANCE and decision.reason != "step_start":
            self._last_warning = decision.message  # a hint such as "wrong zone"
        elif kind is DecisionKind.RESUME:
            self._guidance = self._step_guidance()
        elif kind is not DecisionKind.WARNING and kind is not DecisionKind.LOWER_INTENSITY:
            self._guidance = decision.message
        if self.routine.device_kind is DeviceKindName.MASSAGER:
            self._apply_massage(decision)
        else:
            self._apply_led(decision)

    def _step_guidance(self) -> str:
        for previous in reversed(self.decisions):
            if previous.kind is DecisionKind.NEXT_STEP or previous.reason == "step_start":
                return previous.message
        return self._guidance

    def _apply_massage(self, decision: Decision) -> None:
        engine = self.engine
        assert isinstance(engine, MassageEngine)
        kind = decision.kind
        # The engine's state after the whole batch decides whether the motor may run: a
        # RESUME followed by a PAUSE in the same batch must not restart it after the stop.
        may_run = not engine.paused and not engine.finished
        if kind is DecisionKind.NEXT_STEP or (
            kind is DecisionKind.GUIDANCE and decision.reason == "step_start"
        ):
            self._intensity_cap = None
            step = engine.current_step
            if not may_run:
                # Over temperature: the next zone is shown, the motor stays off.
                self._queue([SetZone(_zone(step.zone))])
            else:
                self._queue(self._actuate_massage(step, with_zone=True))
        elif kind is DecisionKind.RESUME:
            if may_run:
                self._queue(self._actuate_massage(engine.current_step, with_zone=False))
        elif kind is DecisionKind.LOWER_INTENSITY and decision.intensity is not None:
            self._intensity_cap = decision.intensity
            if may_run:
                self._queue([SetIntensity(decision.intensity)])

    def _actuate_massage(self, step: MassageStep, *, with_zone: bool) -> list[CommandBody]:
        intensity = step.intensity
        if self._intensity_cap is not None:
            intensity = min(intensity, self._intensity_cap)
        commands: list[CommandBody] = [SetZone(_zone(step.zone))] if with_zone else []
        commands += [SetMode(MassageMode[step.mode.upper()]), SetIntensity(intensity)]
        return commands

    def _apply_led(self, decision: Decision) -> None:
        engine = self.engine
        assert isinstance(engine, LedEngine)
        kind = decision.kind
        if kind is DecisionKind.NEXT_STEP or (
            kind is DecisionKind.GUIDANCE and decision.reason == "step_start"
        ):
            # The next step starts with the sample after the one that ended the last.
            self._step_started_s = decision.at_s + (engine.dt_s if decision.sequence else 0.0)
            self._queue(self._start_led(engine, engine.current_step.duration_s))
        elif kind is DecisionKind.LOWER_INTENSITY:
            done_s = decision.at_s - self._step_started_s
            self._queue(self._start_led(engine, engine.current_step.duration_s - done_s))

    def _start_led(self, engine: LedEngine, duration_s: float) -> list[CommandBody]:
        step: LedStep = engine.current_step
        levels = engine.setpoints_mw_cm2()
        seconds = max(1, math.ceil(duration_s - 1e-9))
        return [
            StopLed(),  # a running treatment refuses START_LED (no silent restart of a dose)
            StartLed(
                levels["red"], levels["near_infrared"], levels["blue"], seconds, step.pulse_hz
            ),
        ]

    def _resync(self) -> None:
        """After a reconnect: put the device back into the state the engine wants."""
        engine = self.engine
        assert engine is not None
        if engine.finished:
            self._stop_owed = True
            return
        if isinstance(engine, MassageEngine):
            if engine.paused:
                self._stop_owed = True
            else:
                self._queue(self._actuate_massage(engine.current_step, with_zone=True))
        # A mask keeps its own timer across a link drop: its treatment is left alone.

    # ------------------------------------------------------------------ writing commands

    def _safety_stop(self) -> None:
        """STOP_ALL now (started before this returns); every command queued before it is
        dropped, and the command worker waits for its acknowledgement."""
        self._generation += 1
        while not self._commands.empty():
            self._commands.get_nowait()
        self.stop_all_writes += 1
        # STOP_ALL also ends a device program: from here on the host drives the device.
        self._program_active = False
        self._stop_owed = False
        try:
            stop = self.session.send_soon(StopAll())
        except (TransportError, CommandError, SessionClosedError) as exc:
            self._stop_failed(exc)
            return
        self._stops.add(stop)
        stop.add_done_callback(self._stop_done)

    def _stop_done(self, stop: asyncio.Task[Ack]) -> None:
        self._stops.discard(stop)
        if stop.cancelled():
            return
        exc = stop.exception()
        if isinstance(exc, (TransportError, CommandError, SessionClosedError)):
            self._stop_failed(exc)
        elif exc is not None:
            self._stop_owed = True
            _LOGGER.error("%s: STOP_ALL failed", self.session.name, exc_info=exc)

    def _stop_failed(self, exc: DeviceBridgeError) -> None:
        # The link is down: the session reconnects and the next batch tries again.
        self._stop_owed = True
        self.command_errors.append(f"STOP_ALL: {exc}")
        _LOGGER.warning(
            "%s: STOP_ALL failed (retrying on the next batch): %s", self.session.name, exc
        )

    async def _stops_settled(self) -> None:
        while self._stops:
            await asyncio.wait(set(self._stops))

    def _queue(self, commands: list[CommandBody]) -> None:
        if self._program_active:
            return  # the device program drives the actuators until it ends or is stopped
        if commands:
            self._commands.put_nowait((self._generation, commands))

    async def _command_worker(self) -> None:
        while True:
            generation, commands = await self._commands.get()
            for body in commands:
                # Nothing overtakes a safety stop: it is acknowledged before the next write.
                await self._stops_settled()
                if generation != self._generation:
                    break  # a safety stop came in since these were decided
                try:
                    await self.session.send(body)
                except (TransportError, CommandError, SessionClosedError) as exc:
                    self.command_errors.append(f"{type(body).__name__}: {exc}")
                    _LOGGER.warning(
                        "%s: %s failed: %s", self.session.name, type(body).__name__, exc
                    )
                    break

    async def _shutdown(self) -> None:
        """Actuators off at the end, whatever the ending; stop the worker."""
        self._generation += 1
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
        if writer is not None and session_id is not None:
            writer.run_now(
                lambda store: store.finish_session(
                    session_id, status=status, end_reason=end_reason, summary=summary
                )
            )
        elif self.store is not None and session_id is not None:
            self.store.finish_session(
                session_id, status=status, end_reason=end_reason, summary=summary
            )
        if status != "completed":
            self._guidance = f"Session {status}: {end_reason}" if end_reason else self._guidance
        self._publish()
        return RunSummary(self.session_id, status, end_reason, summary, tuple(self.decisions))

    def summary_dict(self) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        base: dict[str, Any] = {
            "routine": self.routine.name,
            "device_kind": self.routine.device_kind.value,
            "mode": self.mode.value,
            "steps_done": engine.summary.steps_done,
            "steps_total": engine.summary.steps_total,
            "completion": round(engine.summary.completion, 4),
            "completed": engine.summary.completed,
            "stopped_reason": engine.summary.stopped_reason,
            "warnings": self._warnings,
            "gaps": self.gaps,
            "lost_samples": self.lost_samples,
            "command_errors": len(self.command_errors),
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
                    round(led.max_temperature_c, 2)
                    if math.isfinite(led.max_temperature_c)
                    else None
                ),
            )
        return base

    # ------------------------------------------------------------------ device programs

    async def _device_program_wanted(self, capabilities: int) -> bool:
        if self.requested_mode is RunMode.HOST:
            return False
        supported = bool(Capability(capabilities) & Capability.PROGRAM_TRANSFER)
        available = _program_transfer() is not None
        if self.requested_mode is RunMode.DEVICE and not (supported and available):
            why = (
                "the device has no PROGRAM_TRANSFER"
                if not supported
                else (f"{PROGRAM_TRANSFER_MODULE} is not installed")
            )
            raise RoutineRunError(f"{self.session.name}: cannot run as a device program: {why}")
        return supported and available

    async def _install_device_program(self) -> None:
        module = _program_transfer()
        assert module is not None
        program = module.program_from_routine(self.routine, self.policy)
        events = self.session.events()
        await module.install_program(self.session, program)
        await module.start_program(self.session)
        self.mode = RunMode.DEVICE
        self._program_active = True
        self._program_watch = asyncio.get_running_loop().create_task(
            self._watch_program(events), name=f"program events {self.session.name}"
        )

    async def _watch_program(self, events: Subscription[Event]) -> None:
        """When the device program ends before the engine does, the host takes over."""
        try:
            async for event in events:
                if event.code != EventCode.PROGRAM_FINISHED or not self._program_active:
                    continue
                self._program_active = False
                engine = self.engine
                if engine is None or engine.finished:
                    return
                if isinstance(engine, MassageEngine):
                    if not engine.paused:
                        self._queue(self._actuate_massage(engine.current_step, with_zone=True))
                else:
                    done_s = self._elapsed_s() - self._step_started_s
                    self._queue(self._start_led(engine, engine.current_step.duration_s - done_s))
                return
        finally:
            await events.aclose()

    def _elapsed_s(self) -> float:
        engine, batch = self.engine, self._last_batch
        if engine is None or batch is None or self._first_sequence is None:
            return 0.0
        return (batch.end_sequence - self._first_sequence) * engine.dt_s


def _program_transfer() -> Any:
    """The device-program module when it is installed (another part of issue 3)."""
    try:
        return importlib.import_module(PROGRAM_TRANSFER_MODULE)
    except ModuleNotFoundError:
        return None


def _step_time_s(step: MassageStep | LedStep) -> float:
    return step.contact_time_s if isinstance(step, MassageStep) else step.duration_s


def _zone(name: str) -> Zone:
    return Zone(ZONE_CODES[name])


def _zone_name(code: int) -> str | None:
    for name, value in ZONE_CODES.items():
        if value == code:
            return name
    return None


def _refusal_json(refusal: Any) -> dict[str, Any]:
    return {
        "reason": refusal.reason,
        "message": refusal.message,
        "allowed_from": refusal.allowed_from.isoformat() if refusal.allowed_from else None,
        "rule": refusal.rule,
    }
