"""One device of ``serve``: kept connected, its telemetry published, its routines run
through the runner every routine runs through."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from devicebridge.core.backoff import Backoff, BackoffPolicy
from devicebridge.core.engine import Decision
from devicebridge.core.reassembly import TelemetryGap, TelemetryItem
from devicebridge.core.routine import Routine
from devicebridge.core.states import ConnectionState
from devicebridge.device.session import DeviceSession
from devicebridge.device.transport.base import DeviceInfo
from devicebridge.errors import (
    DeviceBridgeError,
    DeviceUnsupportedError,
    NotConnectedError,
    RoutineRefusedError,
    ServiceError,
)
from devicebridge.run.history import refusal_json
from devicebridge.run.recovery import Resumable, SessionResumption
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.run.summary import RunSummary
from devicebridge.run.view import RunnerState
from devicebridge.service.telemetry import SAMPLE_STATE_EVENTS, TelemetryBatcher, event_fields
from devicebridge.storage.registry import PairedDevice
from devicebridge.storage.sessions import SessionRecord
from protocols import (
    Capability,
    Event,
    EventCode,
    ProgramStepEvent,
    ProgramStepReason,
    ProtocolError,
    SampleFormat,
    StopAll,
)
from protocols.constants import DeviceKind

if TYPE_CHECKING:
    from devicebridge.service.supervisor import BridgeService


LOG = logging.getLogger(__name__)


STOP_ALL_TIMEOUT_S: Final = 2.0
# Contact and zone events held until the device's first telemetry message can carry them
# (its batcher is made once it is first ready); a device that never gets there keeps only
# its latest few.
EARLY_EVENTS_KEPT: Final = 64
CONNECT_RETRY: Final = BackoffPolicy(initial_s=1.0, max_s=30.0)


def _kind_name(kind: DeviceKind | int | str) -> str:
    if isinstance(kind, str):
        return kind
    if kind == DeviceKind.MASSAGER:
        return "massager"
    if kind == DeviceKind.LED_MASK:
        return "led_mask"
    return f"kind_{int(kind)}"


class DeviceWorker:
    """Keeps one device connected, streams its telemetry and runs its routines.

    Routines run through :class:`~devicebridge.run.runner.RoutineRunner`, the same runner as
    ``devicebridge run``: admission, the engine's safety stops, the daily dose, fault
    checks, commands and the record are all its job; the worker only publishes what it
    does (decisions, summaries, state).
    """

    def __init__(self, service: BridgeService, paired: PairedDevice, session: DeviceSession):
        self.service = service
        self.paired = paired
        self.session = session
        self.serial = paired.serial_number
        self.kind = paired.kind
        self.batcher: TelemetryBatcher | None = None
        self.runner: RoutineRunner | None = None
        self.resumption: SessionResumption | None = None
        self.published_state: ConnectionState | None = None
        self.published_battery: int | None = None
        self.published_session_id: int | None = None
        self.samples_received = 0
        self.last_failure: str | None = None  # why the latest routine could not run
        # Device jobs other than routines (program installs), one at a time, in order.
        self._jobs: asyncio.Queue[Callable[[], Coroutine[Any, Any, None]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._run_task: asyncio.Task[RunSummary | None] | None = None
        # Telemetry is handled inside the session's receive callback (an observer), not by
        # a task reading a queue: one task hand-off per batch per device cost more than
        # the recording and batching together.
        self._remove_telemetry_observer: Callable[[], None] | None = None
        self._events = session.events()
        self._early_events: deque[Event] = deque(maxlen=EARLY_EVENTS_KEPT)
        # Connection states are polled by the service's one status loop for all devices
        # (one timer instead of one per device); a stopping worker is left out of it.
        self.stopping = False

    @property
    def state(self) -> ConnectionState:
        return self.session.state

    @property
    def holds_programs(self) -> bool:
        """Whether programs can be installed on the device (PROGRAM_TRANSFER); assumed
        until it first connects. A device that cannot (FOREO) runs programs from the host."""
        try:
            info = self.session.device_info
        except NotConnectedError:
            return True
        return bool(info.profile.capabilities & Capability.PROGRAM_TRANSFER)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._remove_telemetry_observer = self.session.observe_telemetry(self._on_telemetry)
        for coro, name in (
            (self._connect(), "connect"),
            (self._consume_events(), "events"),
            (self._run_jobs(), "jobs"),
        ):
            self._tasks.append(loop.create_task(coro, name=f"{self.serial} {name}"))

    async def _connect(self) -> None:
        backoff = Backoff(CONNECT_RETRY, random.Random(self.service.rng.random()))
        while True:
            try:
                await self.session.start()
            except DeviceBridgeError as exc:
                delay_s = backoff.next_delay_s()
                LOG.info("%s: not connected (%s); retrying in %.1f s", self.serial, exc, delay_s)
                await self.service.clock.sleep(delay_s)
                continue
            LOG.info("%s: connected", self.serial)
            return  # from now on the session reconnects by itself

    # ------------------------------------------------------------------ state

    def check_state(self) -> None:
        """Publish a change of the connection state (the status loop asks every device).

        A change of the battery level goes out with the telemetry message that carries it
        (:meth:`_publish_telemetry`, about once a second): reading it here too, for every
        device four times a second, cost more than the rest of this poll."""
        state = self.session.state
        if state is not self.published_state:
            previous, self.published_state = self.published_state, state
            LOG.info("%s: %s", self.serial, state.value, extra={"device": self.serial})
            if previous is ConnectionState.READY and self.batcher is not None:
                self._publish_telemetry(self.batcher.flush())
            if state is ConnectionState.READY:
                self._jobs.put_nowait(self._on_ready)
            self.publish_state()
            self.service.status_changed()

    def state_body(self) -> dict[str, Any]:
        try:
            info: DeviceInfo | None = self.session.device_info
        except NotConnectedError:
            info = None  # not connected yet since the bridge started
        runner = self.runner
        return {
            "serial": self.serial,
            "name": self.paired.name,
            "kind": self.kind,
            "model": info.model_number if info else self.paired.model,
            "firmware": info.firmware_revision if info else None,
            "state": self.session.state.value,
            "battery_percent": self.session.battery_percent,
            "session_id": runner.session_id if runner is not None else None,
        }

    def publish_state(self) -> None:
        self.published_battery = self.session.battery_percent
        body = {**self.state_body(), "updated_at": self.service.now().isoformat()}
        self.published_session_id = body["session_id"]
        self.service.publisher.publish(
            self.service.topics.device_state(self.serial), body, retain=True
        )

    async def _on_ready(self) -> None:
        info = self.session.device_info
        if self.batcher is None:
            self.batcher = TelemetryBatcher(
                self.serial,
                SampleFormat.MASSAGER_V1
                if info.kind == DeviceKind.MASSAGER
                else SampleFormat.LED_MASK_V1,
                float(info.profile.sample_rate_hz),
                self.service.telemetry_batch_s,
            )
            while self._early_events:
                self.batcher.event(self._early_events.popleft())
        self.kind = _kind_name(info.kind)
        self.service.announce_device(self)
        await self.service.install_pending(self)

    # ------------------------------------------------------------------ telemetry

    def _on_telemetry(self, item: TelemetryItem) -> None:
        if isinstance(item, TelemetryGap):
            if self.batcher is not None:
                self._publish_telemetry(self.batcher.gap(item))
            return
        self.samples_received += len(item.samples)
        batcher = self.batcher
        if batcher is not None:
            messages = batcher.add(item)
            if messages:  # most batches complete no message: nothing more to do
                self._publish_telemetry(messages)

    def _publish_telemetry(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return
        topic = self.service.topics.telemetry(self.serial)
        runner = self.runner
        session_id = runner.session_id if runner is not None else None
        for body in messages:
            body["session_id"] = session_id
            self.service.publisher.publish(topic, body)
            self.service.telemetry_messages += 1
        if self.session.battery_percent != self.published_battery:
            self.publish_state()

    def _publish_decision(self, runner: RoutineRunner, decision: Decision) -> None:
        self.service.publisher.publish(
            self.service.topics.events(self.serial),
            {
                "type": "decision",
                "session_id": runner.session_id,
                "kind": decision.kind.value,
                "step": decision.step,
                "at_s": decision.at_s,
                "reason": decision.reason,
                "message": decision.message,
                "rule": decision.rule,
                "sequence": decision.sequence,
            },
        )

    async def _consume_events(self) -> None:
        async for event in self._events:
            if event.code == EventCode.PROGRAM_STEP and self.runner is None:
                started = _program_started(event)
                if started is not None:
                    self.enqueue(functools.partial(self._device_started_program, started))
            if event.code in SAMPLE_STATE_EVENTS:  # with the next telemetry message
                if self.batcher is not None:
                    self.batcher.event(event)
                else:
                    self._early_events.append(event)
                continue
            self.service.publisher.publish(
                self.service.topics.events(self.serial),
                {"type": "device_event", **event_fields(event)},
            )

    async def _device_started_program(self, program_crc32: int) -> None:
        """The user started the device's program from its button: run it as a session (the
        same runner, watching the program the device runs) when the bridge knows it and
        admission allows it now; otherwise stop it."""
        if self.runner is not None or self.stopping:
            return
        if self.resumption is not None:
            # The start of the interrupted session's own program (it was admitted then),
            # read again from the line or the device's backlog: part of what is resumed.
            return
        known = self.service.known_program(self.kind, program_crc32)
        why: str | None = None
        if known is None:
            why = "a program this bridge does not know (or its policy no longer admits)"
        else:
            program_id, routine = known
            try:
                await self.start_routine(
                    routine, program_id, mode=RunMode.DEVICE, adopt_program=True
                )
                LOG.info("%s: program %d started from the device", self.serial, program_id)
                return
            except RoutineRefusedError as refused:
                why = str(refused)
            except ServiceError as exc:
                why = str(exc)
        LOG.warning("%s: stopping the program started on the device: %s", self.serial, why)
        self.service.publisher.publish(
            self.service.topics.events(self.serial),
            {"type": "program_stopped", "program_crc32": program_crc32, "reason": why},
        )
        await self.session.send(StopAll(), timeout_s=STOP_ALL_TIMEOUT_S)

    def resume(self, held: Resumable) -> None:
        """Before :meth:`start`: take what the device still holds of ``held`` first."""
        service = self.service
        self.session.resume_after(held.last_sequence)
        LOG.info(
            "%s: taking what the device holds of session %d after sample %d",
            self.serial,
            held.record.id,
            held.last_sequence,
        )

        def done(record: SessionRecord) -> None:
            self.resumption = None
            remove()
            service.publish_record(record)

        self.resumption = SessionResumption(
            service.sessions, service.session_writer, held, service.policy, on_done=done
        )
        remove = self.session.observe_telemetry(self.resumption.observe)

    # ------------------------------------------------------------------ jobs

    async def _run_jobs(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                await job()
            except DeviceBridgeError as exc:
                LOG.warning("%s: %s", self.serial, exc)

    def enqueue(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``job`` on the device after the jobs queued before it."""
        self._jobs.put_nowait(job)

    # ------------------------------------------------------------------ routines

    async def start_routine(
        self,
        routine: Routine,
        program_id: int | None,
        *,
        mode: RunMode | None = None,
        adopt_program: bool = False,
        max_duration_s: float | None = None,
        on_update: Callable[[RunnerState], None] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> RoutineRunner:
        """Admit ``routine`` and run it now, or when the device is next ready.

        Raises :class:`~devicebridge.errors.RoutineRefusedError` (recorded and published)
        when admission refuses it, and :class:`ServiceError` while another routine runs (or
        is being admitted: the worker holds the runner from the first moment) or the
        bridge stops meanwhile.
        """
        if self.runner is not None:
            raise ServiceError("a routine is already running", device=self.serial)
        if self.resumption is not None:
            raise ServiceError(
                f"still taking what the device holds of interrupted session "
                f"{self.resumption.record.id}; try again in a moment",
                device=self.serial,
            )
        service = self.service

        def decided(decision: Decision) -> None:
            if self.published_session_id != runner.session_id:
                self.publish_state()  # the session is stored: its id in the device's state
            self._publish_decision(runner, decision)
            if on_decision is not None:
                on_decision(decision)

        runner = RoutineRunner(
            self.session,
            routine,
            service.policy,
            store=service.sessions,
            writer=service.session_writer,
            clock=service.clock,
            now=service.now,
            device_serial=self.serial,
            mode=mode or service.run_mode,
            program_id=program_id,
            adopt_program=adopt_program,
            on_update=on_update,
            on_decision=decided,
        )
        # Held while admission reads the history (off the event loop): a second start
        # meanwhile is refused as while the routine runs.
        self.runner = runner
        try:
            await runner.admit()
        except RoutineRefusedError as refused:
            self.runner = None
            LOG.warning("%s: %s", self.serial, refused)
            if refused.session_id is not None:
                service.publish_summary(
                    refused.session_id,
                    self.serial,
                    "refused",
                    "; ".join(r.message for r in refused.refusals),
                    {
                        "routine": routine.name,
                        "refusals": [refusal_json(r) for r in refused.refusals],
                    },
                    program_id,
                    service.now(),
                )
            raise
        except BaseException:
            self.runner = None
            raise
        if self.stopping:
            self.runner = None
            runner.release_admission()  # it will not run
            raise ServiceError("the bridge is stopping", device=self.serial)
        self._run_task = asyncio.get_running_loop().create_task(
            self._run(runner, max_duration_s), name=f"{self.serial} routine"
        )
        return runner

    async def wait_routine(self) -> RunSummary | None:
        """The result of the routine running now (None when none runs or it failed)."""
        task = self._run_task
        return None if task is None else await asyncio.shield(task)

    async def _run(self, runner: RoutineRunner, max_duration_s: float | None) -> RunSummary | None:
        LOG.info("%s: routine %r starting", self.serial, runner.routine.name)
        started_at = self.service.now()
        self.publish_state()
        self.last_failure = None
        try:
            result = await runner.run(max_duration_s=max_duration_s)
        except DeviceUnsupportedError as exc:
            # Recorded as refused by the runner: published like an admission refusal.
            LOG.warning("%s: %s", self.serial, exc)
            self.last_failure = str(exc)
            if exc.session_id is not None:
                self.service.publish_summary(
                    exc.session_id,
                    self.serial,
                    "refused",
                    "; ".join(f"{p.path}: {p.message}" for p in exc.problems),
                    {
                        "routine": runner.routine.name,
                        "device_problems": [
                            {"path": p.path, "message": p.message} for p in exc.problems
                        ],
                    },
                    runner.program_id,
                    started_at,
                )
            return None
        except DeviceBridgeError as exc:
            LOG.warning("%s: routine %r failed: %s", self.serial, runner.routine.name, exc)
            self.last_failure = str(exc)
            return None
        finally:
            self.runner = None
            self.publish_state()
            # Programs pushed meanwhile were left for the end of the routine.
            if self.session.state is ConnectionState.READY and not self.stopping:
                self.enqueue(functools.partial(self.service.install_pending, self))
        LOG.info("%s: session %s %s", self.serial, result.session_id, result.status)
        if result.session_id is not None:
            self.service.publish_summary(
                result.session_id,
                self.serial,
                result.status,
                result.end_reason,
                result.summary,
                runner.program_id,
                started_at,
            )
        return result

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """End the running routine as ``stopped`` (the device stopped), close the link."""
        self.stopping = True
        runner, task = self.runner, self._run_task
        if runner is not None and task is not None and not task.done():
            if runner.engine is None:
                task.cancel()  # still waiting for the device: nothing ran
            else:
                runner.request_stop("bridge stopped")
            await asyncio.gather(task, return_exceptions=True)
        elif self.session.state is ConnectionState.READY:
            try:
                await self.session.send(StopAll(), timeout_s=STOP_ALL_TIMEOUT_S)
            except DeviceBridgeError as exc:
                LOG.warning("%s: STOP_ALL at shutdown: %s", self.serial, exc)
        if self.resumption is not None:
            self.resumption.finish()  # what came from the device so far
        for task_ in self._tasks:
            task_.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._remove_telemetry_observer is not None:
            self._remove_telemetry_observer()
        if self.batcher is not None:
            self._publish_telemetry(self.batcher.flush(final=True))
        await self.session.close()
        self.publish_state()


def _program_started(event: Event) -> int | None:
    """The CRC-32 of the program a ``PROGRAM_STEP`` event says just started, if it does."""
    try:
        step = ProgramStepEvent.decode(event.payload)
    except ProtocolError:
        return None
    if step.reason != ProgramStepReason.STARTED:
        return None
    return step.program_crc32
