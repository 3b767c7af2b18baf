"""Runs one routine on one device: the async edge around the pure enforcement engine.

Every routine runs here, whatever started it: ``devicebridge run``, the demo, ``serve``
(a local start, a program a therapist pushed, a program started from the device's button)
and the QA bridge. :class:`RoutineRunner` wires a
:class:`~devicebridge.device.session.DeviceSession`, the engine
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
   with many devices the safety check never waits behind the other devices' work. That
   per-batch path is :class:`~devicebridge.run.judging.TelemetryJudge`.
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
which hands what arrived every ``FLUSH_INTERVAL_S`` (0.25 s of wall time), and always
before the run stores its summary, to the store writer's process, with its own SQLite
connection (the run's reads and writes of its store are jobs there too: the functions at
the end of this module).
Several runners on one store share the writer they are given (``serve`` gives all of its
runners one); a runner given none makes its own. A killed bridge loses at most that last
quarter second; :func:`recover_sessions` marks the run interrupted with the summary of
what was recorded.

The engine is timed by the device's sample clock, so a link that drops and comes back
(the session reconnects and backfills on its own) only delays decisions.

Devices that measure no pressure and no contact (FOREO: see the device catalogue) cannot
time a step by contact. Before anything starts, the routine is checked against what the
connected device can do (:func:`~devicebridge.core.device_fit.device_problems`: a refusal is
recorded like an admission refusal); then the same runner drives the
:class:`~devicebridge.core.timed.TimedMassageEngine` on this host's clock instead of feeding
telemetry: a task wakes when the engine's next decision falls due (and every
``TIMED_REFRESH_S`` for the live view) and hands its decisions to the same safety stop and
command path. A link loss ends such a session (nothing measured what the device did
meanwhile) and the device is stopped when it comes back. The summary states which checks
applied (``checks``: "pressure": "not measured by this device").

Device mode: when the device profile has the PROGRAM_TRANSFER capability, the runner also
installs the routine as a program on the device and starts it (or adopts a program the
device started by itself), so the device enforces its own hard limits even when the laptop
sleeps; the host engine still watches and can STOP_ALL at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, TypeVar

from devicebridge.clock import Clock, background_turn, result_off_loop, wait_for
from devicebridge.core.actuation import (
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
)
from devicebridge.core.catalogue import KindSupport, support_from_capabilities
from devicebridge.core.device_fit import NOT_MEASURED, checks_applied, device_problems
from devicebridge.core.engine import (
    Decision,
    LedEngine,
    MassageEngine,
    new_engine,
)
from devicebridge.core.faults_detect import FaultChecks
from devicebridge.core.policy import LED_CHANNELS, SafetyPolicy, policy_zone
from devicebridge.core.reassembly import TelemetryItem
from devicebridge.core.routine import (
    DeviceKindName,
    LedStep,
    MassageStep,
    Routine,
)
from devicebridge.core.states import ConnectionState
from devicebridge.core.timed import TimedMassageEngine
from devicebridge.device import program_transfer
from devicebridge.device.session import DeviceSession, Subscription
from devicebridge.errors import (
    CommandError,
    CommandRejectedError,
    DeviceBridgeError,
    DeviceMismatchError,
    DeviceUnsupportedError,
    RoutineRefusedError,
    RoutineRunError,
    SessionClosedError,
    SessionStoreError,
    TransportError,
)
from devicebridge.run import store_jobs
from devicebridge.run.history import check_routine_admission, refusal_json
from devicebridge.run.judging import TelemetryJudge
from devicebridge.run.summary import RunSummary, session_summary
from devicebridge.run.view import Guidance, RunnerState
from devicebridge.storage.desk import StoreDesk
from devicebridge.storage.sessions import SessionStatus, SessionStore
from devicebridge.storage.writer import StoreWriter, start_store_writer
from protocols import (
    Ack,
    Capability,
    CommandBody,
    DeviceKind,
    Event,
    EventCode,
    SampleFormat,
    StopAll,
)
from protocols.constants import ZONE_NAMES
from protocols.telemetry import (
    IRRADIANCE_MW_CM2_PER_UNIT,
    MASSAGER_FLAG_CONTACT,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


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
# The same for a device that has no limits of its own to fall back on (a routine by time:
# nothing on it stops the motor), so the bridge waits longer for it to come back.
UNWATCHED_STOP_WAIT_S: Final = 30.0
# A routine by time refreshes its live view (time left) at least this often (clock s).
TIMED_REFRESH_S: Final = 1.0
# After a command failed on a link that is up (a timeout), wait this long before the next
# attempt (clock seconds), so a device that does not answer is not flooded.
COMMAND_RETRY_S: Final = 1.0
# How long a device program's start waits for the sample it starts at (clock seconds).
PROGRAM_MARK_WAIT_S: Final = 2.0
PROGRAM_MARK_POLL_S: Final = 0.02


class RunMode(StrEnum):
    AUTO = "auto"  # device program when the device supports it, else host
    HOST = "host"  # the host engine drives the device command by command
    DEVICE = "device"  # insist on a device program (error when impossible)


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
        if store is not None:
            # Its first job (the session's record) would wait for the process to start.
            start_store_writer()
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
        self.engine: MassageEngine | LedEngine | TimedMassageEngine | None = None
        self.support: KindSupport | None = None  # what the connected device can do
        self._checks: dict[str, str] | None = None
        self._timed_start_s = 0.0
        self._timed_wake = asyncio.Event()
        self._link_lost_at_s: float | None = None
        self._final_stop_sent = False
        self._ticker: asyncio.Task[None] | None = None  # a routine by time's clock
        self.stop_all_writes = 0
        self.command_errors: list[str] = []
        self._final_note: str | None = None
        self._guidance = Guidance()
        # What the device last acknowledged (core/actuation); the command task sends what
        # brings it to what the engine wants.
        self._massager = MassagerApplied()
        self._led = LedApplied()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._state: RunnerState | None = None
        self._program_active = False
        self._program_watch: asyncio.Task[None] | None = None
        self._stop_reason: str | None = None  # given to request_stop
        self._ended_event = asyncio.Event()
        # The safety path: every telemetry item of the run, judged and recorded where the
        # session receives it (what ended the run, and why, is kept there too).
        self._judge = TelemetryJudge(
            session,
            SAMPLE_FORMAT_OF[routine.device_kind],
            safety_stop=self._safety_stop,
            handle=self._handle,
            after_reconnect=self._after_reconnect,
            on_end=self._ended_event.set,
            publish=None if on_update is None else self._publish,
        )
        self._stops: set[asyncio.Task[Ack]] = set()  # STOP_ALL commands in flight
        self._writer: StoreWriter | None = writer
        self._own_writer = False
        # The writer counting this run as admitted until it ends (admit).
        self._admitted_on: StoreWriter | None = None

    # ------------------------------------------------------------------ admission

    async def admit(self) -> Admission:
        """Check admission; on refusal record the attempt and raise RoutineRefusedError.

        The history is read in the store writer's process when the run has a writer
        (``serve`` and the benches share one among all runs): with a long history the
        event loop keeps serving every other device meanwhile.
        """
        now = self._now()
        if self.store is None:
            admission = check_routine_admission(self.routine, self.policy, None, now=now)
        elif self._writer is None:  # nothing else writes yet: here
            admission = check_routine_admission(self.routine, self.policy, self.store, now=now)
        else:
            admission = await result_off_loop(
                self.clock,
                self._writer.submit(
                    store_jobs.admit_on_store, self.routine, self.policy, now, id(self)
                ),
            )
        self.admission = admission
        if not admission.allowed:
            session_id = await self._record_refusal(
                "; ".join(r.message for r in admission.refusals),
                {"refusals": [refusal_json(r) for r in admission.refusals]},
            )
            raise RoutineRefusedError(self.routine, admission, session_id)
        self._admitted_on = self._writer if self.store is not None else None
        return admission

    async def _on_store(self, job: Callable[..., T], *args: Any) -> T:
        """``job(desk, *args)`` on the store: in the writer's process (after the writes
        queued before it) when the run has a writer, here otherwise (nothing else writes
        yet)."""
        assert self.store is not None
        if self._writer is None:
            return job(StoreDesk.of(self.store), *args)
        return await result_off_loop(self.clock, self._writer.submit(job, *args))

    async def _record_refusal(
        self, end_reason: str, summary: dict[str, Any], device_serial: str | None = None
    ) -> int | None:
        """Store a refused attempt (``history`` shows it; it never counts as a session)."""
        if self.store is None:
            return None
        at = self._now()
        routine = self.routine
        serial = self._device_serial or device_serial or self.session.name
        program_id = None if self.program_id is None else str(self.program_id)
        record = _session_fields(routine, serial, 0.0, program_id, at)
        return await self._on_store(store_jobs.record_refused, record, end_reason, summary, at)

    async def _check_device_support(self) -> KindSupport:
        """What the connected device can do; a routine it cannot run is refused (and the
        attempt recorded) before anything is sent."""
        info = self.session.device_info
        support = info.support or support_from_capabilities(info.kind, info.profile.capabilities)
        if support is None:  # the kind matched the routine's: a known kind
            raise DeviceMismatchError(self.routine, self.session.name, info.kind)
        problems = device_problems(self.routine, support, self.session.name)
        if problems:
            refused = DeviceUnsupportedError(self.routine, self.session.name, problems)
            refused.session_id = await self._record_refusal(
                "; ".join(f"{p.path}: {p.message}" for p in problems),
                {"device_problems": [{"path": p.path, "message": p.message} for p in problems]},
                info.serial_number,
            )
            raise refused
        return support

    @property
    def judging(self) -> bool:
        """The engine judges every batch as it arrives: from the moment the run drives the
        device (its record stored, the engine started) until the run ends. Before that the
        device has been told nothing by this run; what came meanwhile is judged first."""
        return self._judge.judging

    @property
    def gaps(self) -> int:
        return self._judge.gaps

    @property
    def lost_samples(self) -> int:
        return self._judge.lost_samples

    @property
    def samples_recorded(self) -> int:
        return self._judge.samples_recorded

    @property
    def device_ended(self) -> str | None:
        """Why the device ended the run (it rebooted or shut down mid-routine), if it did."""
        return self._judge.device_ended

    # ------------------------------------------------------------------ state for the UI

    @property
    def state(self) -> RunnerState | None:
        """What a live view shows: built when asked for, not on every batch."""
        judge = self._judge
        if judge.state_stale:
            judge.state_stale = False
            self._state = self._build_state()
        return self._state

    def _publish(self) -> None:
        if self.engine is None:
            return
        self._judge.state_stale = True
        if self._on_update is not None:
            state = self.state
            assert state is not None  # built: the engine exists
            self._on_update(state)

    def _build_state(self) -> RunnerState:
        engine = self.engine
        assert engine is not None  # marked stale only once the engine exists
        if isinstance(engine, TimedMassageEngine):
            return self._timed_state(engine)
        batch = self._judge.last_batch
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
                values["pressure_kpa"] = float(last["pressure_dapa"]) * PRESSURE_KPA_PER_UNIT
                values["contact"] = bool(int(last["flags"]) & MASSAGER_FLAG_CONTACT)
                values["skin_temperature_c"] = (
                    float(last["skin_temperature_centi_c"]) * TEMPERATURE_C_PER_UNIT
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
                    ch: float(last[f"{ch}_centi_mw_cm2"]) * IRRADIANCE_MW_CM2_PER_UNIT
                    for ch in LED_CHANNELS
                }
                values["skin_temperature_c"] = (
                    float(last["skin_temperature_centi_c"]) * TEMPERATURE_C_PER_UNIT
                )
        return RunnerState(**common, **values)

    def _timed_state(self, engine: TimedMassageEngine) -> RunnerState:
        view = self._guidance
        view.fold(engine.decisions)
        step = engine.current_step
        not_measured = tuple(
            what for what, how in (self._checks or {}).items() if how == NOT_MEASURED
        )
        return RunnerState(
            device=self.session.name,
            routine=self.routine.name,
            device_kind=self.routine.device_kind,
            step=engine.step_number,
            steps_total=len(self.routine.steps),
            zone=step.zone,
            guidance=view.text if self._final_note is None else self._final_note,
            step_remaining_s=engine.step_remaining_s,
            session_remaining_s=engine.session_remaining_s,
            elapsed_s=engine.elapsed_s,
            finished=engine.finished,
            last_warning=view.last_warning,
            warnings=view.warnings,
            mode=self.mode.value,
            not_measured=not_measured,
            by_time=True,
        )

    # ------------------------------------------------------------------ running

    async def run(self, *, max_duration_s: float | None = None) -> RunSummary:
        """Admit, run until the engine finishes (or ``max_duration_s`` of clock time), store.

        Starts the session if it has not been started (subscribing first, so no sample is
        missed). Raises :class:`RoutineRefusedError` before anything reaches the device.
        """
        judge = self._judge
        try:
            if self.admission is None:
                await self.admit()
            # Every item is judged and recorded by the observer, inside the transport's
            # receive callback: no hand-off to this task per batch (see TelemetryJudge).
            remove_observer = self.session.observe_telemetry(judge.observe)
            judge.observing = True
            try:
                if self.session.state is ConnectionState.DISCONNECTED:
                    await self.session.start()
                await self.session.wait_ready()
                return await self._run(max_duration_s)
            finally:
                judge.stop_observing()
                remove_observer()
                self.release_admission()
        finally:
            judge.release()  # the run is over: runner and judge no longer hold each other

    def release_admission(self) -> None:
        """This run no longer counts as admitted (it ended, or it will not run): later
        admissions count its stored session, if it has one, as the store says."""
        writer, self._admitted_on = self._admitted_on, None
        if writer is not None:
            writer.admitted_run_ended(id(self))

    def request_stop(self, reason: str) -> None:
        """End the run as ``stopped`` with ``reason`` (the device is stopped, the record kept)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._judge.end("requested")

    async def _run(self, max_duration_s: float | None) -> RunSummary:
        info = self.session.device_info
        expected = DEVICE_KIND_OF[self.routine.device_kind]
        if info.kind != expected:
            raise DeviceMismatchError(self.routine, self.session.name, info.kind)
        support = self.support = await self._check_device_support()
        rate_hz = float(info.profile.sample_rate_hz)
        assert self.admission is not None
        # A massager that cannot sense the skin runs the routine by the host's clock.
        by_time = self.routine.device_kind is DeviceKindName.MASSAGER and not support.senses_skin
        self._checks = checks_applied(self.routine, support, by_time=by_time)
        engine: MassageEngine | LedEngine | TimedMassageEngine
        if by_time:
            engine = self.engine = TimedMassageEngine(self.routine, self.policy)
            self._judge.engine_started(engine, None)
        else:
            engine = self.engine = new_engine(
                self.routine,
                self.policy,
                sample_rate_hz=rate_hz,
                dose_today_j_cm2=self.admission.dose_today_j_cm2,
                fault_checks=FaultChecks(),
            )
            self._judge.engine_started(engine, engine)
        # Nothing is commanded yet: the device is not expected to run its motor.
        self._set_motor_commanded(False)
        if self.store is not None:
            if self._writer is None:
                self._writer, self._own_writer = StoreWriter(self.store), True
            serial = self._device_serial or info.serial_number
            program_id = None if self.program_id is None else str(self.program_id)
            record = _session_fields(self.routine, serial, rate_hz, program_id, self._now())
            counted = self._admitted_on is not None

            try:
                self.session_id = await self._on_store(
                    store_jobs.start_session, record, id(self) if counted else None
                )
            except BaseException:
                self._close_writer()
                raise
            self._judge.record_to(self._writer, self.session_id)
        self._judge.reconnects_seen = self.session.reconnects
        self._worker = asyncio.get_running_loop().create_task(
            self._command_task(), name=f"routine commands {self.session.name}"
        )
        status: SessionStatus = "interrupted"
        end_reason: str | None = "the link closed before the routine ended"
        try:
            if await self._device_program_wanted(info.profile.capabilities):
                await self._run_device_program()
            if isinstance(engine, TimedMassageEngine):
                self._start_by_time(engine)
            else:
                self._handle(engine.start())
            self._judge.arm()
            ended = await self._until_ended(max_duration_s)
            summary = engine.summary
            if summary.completed:
                status, end_reason = "completed", None
            elif self._link_lost_at_s is not None:
                status, end_reason = "interrupted", "the link was lost"
            elif summary.stopped_reason is not None:
                status, end_reason = "stopped", summary.stopped_reason
            elif ended == "requested":
                status, end_reason = "stopped", self._stop_reason
            elif ended == "device":
                status, end_reason = "interrupted", self._judge.device_ended
            elif ended == "duration":
                status, end_reason = "stopped", "time limit of the run reached"
        except asyncio.CancelledError:
            status, end_reason = "stopped", self._stop_reason or "cancelled by the user"
            raise
        finally:
            self._judge.stop_observing()
            if isinstance(engine, TimedMassageEngine):
                engine.interrupt(self.clock.now_s() - self._timed_start_s)
            await self._shutdown()
            if self._link_lost_at_s is not None and status == "interrupted":
                end_reason = self._link_loss_reason(self._link_lost_at_s)
            elif isinstance(engine, TimedMassageEngine) and not self._final_stop_sent:
                # Nothing on such a device stops its motor by itself: say so.
                unstopped = "the device could not be told to stop: switch it off by hand"
                end_reason = f"{end_reason}; {unstopped}" if end_reason else unstopped
            try:
                result = await self._finish(status, end_reason)
            finally:
                self._close_writer()
        return result

    # ------------------------------------------------------------------ by time

    def _start_by_time(self, engine: TimedMassageEngine) -> None:
        """Start the routine on the host's clock: its first guidance, and the task that
        hands the engine the time (and a lost link) from now on."""
        self._timed_start_s = self.clock.now_s()
        self._handle(engine.start(0.0))
        remove = self.session.observe_state(lambda _old, _new: self._timed_wake.set())
        task = asyncio.get_running_loop().create_task(
            self._run_by_time(engine), name=f"routine by time {self.session.name}"
        )
        task.add_done_callback(lambda _: remove())
        self._ticker = task

    async def _run_by_time(self, engine: TimedMassageEngine) -> None:
        try:
            while not engine.finished:
                now_s = self.clock.now_s() - self._timed_start_s
                if not self._link_ready():
                    self._link_lost_at_s = now_s
                    self._take_decisions(engine.link_lost(now_s))
                    break
                due_s = engine.next_due_s
                wait_s = TIMED_REFRESH_S if due_s is None else min(TIMED_REFRESH_S, due_s - now_s)
                if wait_s > 0:
                    self._timed_wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await wait_for(self.clock, self._timed_wake.wait(), wait_s)
                    if not self._link_ready():
                        continue  # the link went: the top of the loop ends the session
                self._take_decisions(engine.tick(self.clock.now_s() - self._timed_start_s))
        except Exception as exc:  # raised again in the runner's task, which ends the run
            self._judge.fail(exc)
            return
        self._judge.end("finished")

    def _link_ready(self) -> bool:
        return self.session.state is ConnectionState.READY

    def _take_decisions(self, decisions: list[Decision]) -> None:
        """Decisions that came from time, not telemetry: a safety stop at once, then the
        same path as the others."""
        if self._judge.ended is not None:
            return
        self._judge.stop_if_unsafe(decisions)
        self._handle(decisions)

    def _link_loss_reason(self, at_s: float) -> str:
        what = (
            f"the link was lost at {at_s:.1f} s (this device reports nothing, so the session ends)"
        )
        if self._final_stop_sent:
            return f"{what}; the device was stopped when it came back"
        return (
            f"{what}; it did not come back within {UNWATCHED_STOP_WAIT_S:g} s, so it could "
            "not be told to stop: switch it off by hand"
        )

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        self._judge.record_to(None, None)
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
        if self._judge.failure is not None:
            raise self._judge.failure
        if self._judge.ended is not None:
            return self._judge.ended
        return "closed" if waits[1].done() and not waits[1].cancelled() else "duration"

    async def feed(self, item: TelemetryItem) -> list[Decision]:
        """One telemetry item by hand: engine first, safety stop at once, then the rest.

        :meth:`run` does the same in the session's telemetry observer
        (:class:`~devicebridge.run.judging.TelemetryJudge`).
        """
        decisions = self._judge.judge(item)
        self._judge.record(item, decisions)
        return decisions

    # ------------------------------------------------------------------ the safety path
    # (per item in TelemetryJudge; what it asks of the runner below)

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
        if isinstance(engine, MassageEngine | TimedMassageEngine):
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
        engine = self.engine
        if isinstance(engine, TimedMassageEngine) and isinstance(exc, CommandError):
            # Nothing measured can say what the motor does now: a device timed by the host
            # that refuses or ignores a command ends the session (a lost link does too).
            at_s = self.clock.now_s() - self._timed_start_s
            self._take_decisions(engine.device_fault(at_s, f"{type(command).__name__}: {exc}"))
            if engine.finished:
                self._judge.end("finished")
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
            turn_taken = False
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
                if not isinstance(command, StopAll) and not turn_taken:
                    # Not a stop: every device's frames are read first (background_turn);
                    # then all of the above again, as what is wanted may have changed.
                    await background_turn(self.clock)
                    turn_taken = True
                    continue
                turn_taken = False
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
        for task in (self._worker, self._program_watch, self._ticker):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._worker = self._program_watch = self._ticker = None
        await self._stops_settled()
        if self.session.state is ConnectionState.CLOSED:
            return
        unwatched = isinstance(self.engine, TimedMassageEngine)
        if unwatched and self.session.state is not ConnectionState.READY:
            _LOGGER.warning(
                "%s: waiting up to %g s for the device to come back, to stop it",
                self.session.name,
                UNWATCHED_STOP_WAIT_S,
            )
        with contextlib.suppress(DeviceBridgeError):
            await self.session.wait_ready(UNWATCHED_STOP_WAIT_S if unwatched else FINAL_STOP_WAIT_S)
            await self.session.send(StopAll())
            self.stop_all_writes += 1
            self._final_stop_sent = True

    async def _finish(self, status: SessionStatus, end_reason: str | None) -> RunSummary:
        engine = self.engine
        assert engine is not None
        await background_turn(self.clock)  # after the last stop: the record can wait a pass
        summary = self.summary_dict()
        session_id, writer = self.session_id, self._writer
        ended_at = self._now()
        unstored: SessionStoreError | None = None
        if writer is not None and session_id is not None:
            # Everything of this run committed, then its summary, then it no longer counts
            # as admitted: one job, so that no admission reads the one without the other.
            # (A run counted as admitted was admitted on this writer: the one it has.)
            admitted_on, self._admitted_on = self._admitted_on, None
            finished = writer.finish_session(
                session_id,
                status=status,
                end_reason=end_reason,
                summary=summary,
                ended_at=ended_at,
                admitted_run=id(self) if admitted_on is not None else None,
            )
            try:
                await result_off_loop(self.clock, finished)
            except SessionStoreError as exc:  # some telemetry not stored: said once done
                unstored = exc
        if status != "completed" and end_reason:
            self._final_note = f"Session {status}: {end_reason}"
        self._publish()
        if unstored is not None:
            raise unstored
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
            checks=self._checks,
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
            await result_off_loop(
                self.clock, writer.submit(store_jobs.mark_device_program, session_id, start)
            )

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


def _step_time_s(step: MassageStep | LedStep) -> float:
    return step.contact_time_s if isinstance(step, MassageStep) else step.duration_s


def _session_fields(
    routine: Routine, serial: str, rate_hz: float, program_id: str | None, at: datetime
) -> dict[str, Any]:
    """The fields of a session record of ``routine`` (SessionStore.start_session)."""
    return {
        "routine_name": routine.name,
        "category": routine.category,
        "device_serial": serial,
        "device_kind": routine.device_kind.value,
        "sample_format": SAMPLE_FORMAT_OF[routine.device_kind],
        "sample_rate_hz": rate_hz,
        "routine_text": routine.source_text,
        "program_id": program_id,
        "started_at": at,
        "owner_pid": os.getpid(),  # the bridge's, also when its writer's process stores it
    }
