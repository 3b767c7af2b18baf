"""``devicebridge serve``: the long-running bridge.

A supervisor keeps one :class:`~devicebridge.session.DeviceSession` per paired device
(each reconnects by itself once connected; the first connect is retried here), a
recorder stores telemetry into the :class:`~devicebridge.storage.sessions.SessionStore`
while a routine runs and batches it into about one MQTT message per device per second,
and, when a broker is configured, everything published goes through the on-disk
:class:`~devicebridge.storage.outbox.Outbox` and the :class:`~devicebridge.mqtt.MqttLink`
(docs/mqtt.md). Signed programs pushed by therapists are verified, checked against the
bridge's own policy, stored and acknowledged by the program inbox (devicebridge/inbox.py),
and installed on their device when it next connects. Without a broker the same service
works locally (nothing is queued for it).

Stopping (SIGINT/SIGTERM in the CLI, :meth:`BridgeService.request_stop` here) sends
STOP_ALL to every device, finishes running sessions as ``stopped``, drains the outbox
for a moment, announces ``offline`` and closes the stores. A killed bridge leaves its
session ``running``; the next start marks it ``interrupted`` (its samples are all there)
and the outbox resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from devicebridge import __version__
from devicebridge.clock import Clock
from devicebridge.core.backoff import Backoff, BackoffPolicy
from devicebridge.core.engine import Decision
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.reassembly import TelemetryGap, TelemetryItem
from devicebridge.core.routine import Routine, parse_routine
from devicebridge.core.signed_program import DEFAULT_MAX_VALIDITY
from devicebridge.core.states import ConnectionState
from devicebridge.errors import DeviceBridgeError, NotConnectedError, RoutineError
from devicebridge.homeassistant import (
    HOME_ASSISTANT_STATUS_TOPIC,
    DiscoveredEntity,
    discovery_messages,
)
from devicebridge.inbox import AcceptedProgram, ProgramInbox
from devicebridge.local_api import LocalApiServer
from devicebridge.mqtt import MqttLink, MqttSettings, Topics
from devicebridge.program_transfer import install_program, program_from_routine
from devicebridge.runner import (
    Resumable,
    RoutineRefusedError,
    RoutineRunner,
    RunMode,
    RunnerState,
    RunSummary,
    SessionResumption,
    StoreWriter,
    recover_sessions,
    refusal_json,
    resumable,
)
from devicebridge.session import DeviceSession
from devicebridge.storage.files import open_private, private_directory
from devicebridge.storage.lock import holder as lock_holder
from devicebridge.storage.outbox import OUTBOX_FILENAME, Outbox
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore, StoredProgram
from devicebridge.storage.registry import PairedDevice
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionRecord, SessionStore
from devicebridge.transport.base import DeviceInfo
from protocols import (
    Event,
    EventCode,
    ProgramStepEvent,
    ProgramStepReason,
    ProtocolError,
    SampleFormat,
    StopAll,
    TelemetryBatch,
)
from protocols import program_crc32 as program_crc32_of
from protocols.constants import DeviceKind

LOG = logging.getLogger(__name__)

STATUS_FILENAME: Final = "status.json"
DEFAULT_TELEMETRY_BATCH_S: Final = 1.0
DEFAULT_STATUS_INTERVAL_S: Final = 10.0
STATE_POLL_S: Final = 0.25  # how often connection states are compared (clock time)
SHUTDOWN_DRAIN_S: Final = 5.0  # wall time the outbox gets to drain when stopping
STOP_ALL_TIMEOUT_S: Final = 2.0
ADHERENCE_SESSIONS: Final = 100  # session summaries kept in the retained adherence message
ACK_TOPIC_SUFFIX: Final = "programs/ack"
CONNECT_RETRY: Final = BackoffPolicy(initial_s=1.0, max_s=30.0)

Now = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _kind_name(kind: DeviceKind | int | str) -> str:
    if isinstance(kind, str):
        return kind
    if kind == DeviceKind.MASSAGER:
        return "massager"
    if kind == DeviceKind.LED_MASK:
        return "led_mask"
    return f"kind_{int(kind)}"


# --------------------------------------------------------------------------- logging


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, sort_keys=True)


def configure_logging(level: int, *, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter()
        if json_lines
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# --------------------------------------------------------------------------- publishing


class Publisher:
    """JSON messages into the outbox (with their ``message_id``), or nowhere without a broker."""

    def __init__(self, outbox: Outbox | None, notify: Callable[[], None]) -> None:
        self.outbox = outbox
        self._notify = notify

    @property
    def enabled(self) -> bool:
        return self.outbox is not None

    def publish(self, topic: str, body: Mapping[str, Any], *, retain: bool = False) -> None:
        if self.outbox is None:
            return
        message = {"message_id": self.outbox.message_id(self.outbox.next_sequence()), **body}
        self.outbox.append(
            topic, json.dumps(message, separators=(",", ":")).encode(), retain=retain
        )
        self._notify()

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.outbox is None:
            return
        self.outbox.append(topic, payload, retain=retain)
        self._notify()


# --------------------------------------------------------------------------- telemetry


class TelemetryBatcher:
    """Cuts one device's ordered sample stream into messages of ``batch_s`` of samples.

    Messages are cut by sample count (device time), not by host time, so their size and
    boundaries do not depend on when batches reach the host. A gap ends the current
    message; it is reported in the ``gaps`` of the next one (samples before its
    ``first_sequence`` that are lost for good).
    """

    def __init__(
        self, serial: str, sample_format: SampleFormat, sample_rate_hz: float, batch_s: float
    ) -> None:
        self.serial = serial
        self.sample_format = sample_format
        self.sample_rate_hz = sample_rate_hz
        self.samples_per_message = max(1, round(sample_rate_hz * batch_s))
        # The samples are kept as their raw wire bytes in one growing buffer: a message
        # is then one slice and one base64 call, with no per-batch numpy concatenation
        # (structured-dtype concatenation costs more than the copy itself).
        self._format_name = sample_format.name.lower()
        self._buffer = bytearray()
        self._count = 0
        self._first_sequence = 0
        self._device_time_ms = 0
        self._gaps: list[dict[str, Any]] = []
        self.samples_published = 0

    def add(self, batch: TelemetryBatch) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._count and batch.first_sequence != self._first_sequence + self._count:
            out.extend(self.flush())  # not contiguous (should not happen after reassembly)
        if not self._count:
            self._first_sequence = batch.first_sequence
            self._device_time_ms = batch.device_time_ms
        samples = batch.samples
        self._buffer += samples.data if samples.flags.c_contiguous else samples.tobytes()
        self._count += int(samples.shape[0])
        if self._count >= self.samples_per_message:
            per_message = self.samples_per_message
            message_bytes = per_message * samples.dtype.itemsize
            buffer = self._buffer
            offset = 0
            while self._count >= per_message:
                raw = bytes(buffer[offset : offset + message_bytes])
                out.append(
                    self._message(self._first_sequence, self._device_time_ms, per_message, raw)
                )
                offset += message_bytes
                self._first_sequence += per_message
                self._device_time_ms += round(per_message * 1000 / self.sample_rate_hz)
                self._count -= per_message
            del buffer[:offset]
        return out

    def gap(self, gap: TelemetryGap) -> list[dict[str, Any]]:
        out = self.flush()
        self._gaps.append(
            {
                "first_sequence": gap.first_sequence,
                "count": gap.sample_count,
                "reason": gap.reason.value,
            }
        )
        return out

    def flush(self, *, final: bool = False) -> list[dict[str, Any]]:
        if self._count:
            raw = bytes(self._buffer)
            message = self._message(self._first_sequence, self._device_time_ms, self._count, raw)
            self._buffer.clear()
            self._count = 0
            return [message]
        if final and self._gaps:
            return [self._message(self._first_sequence, self._device_time_ms, 0, b"")]
        return []

    def _message(
        self, first_sequence: int, device_time_ms: int, count: int, raw: bytes
    ) -> dict[str, Any]:
        gaps, self._gaps = self._gaps, []
        self.samples_published += count
        return {
            "serial": self.serial,
            "sample_format": self._format_name,
            "sample_rate_hz": self.sample_rate_hz,
            "first_sequence": first_sequence,
            "device_time_ms": device_time_ms,
            "count": count,
            "samples_b64": base64.b64encode(raw).decode("ascii"),
            "gaps": gaps,
        }


def decode_telemetry_message(body: Mapping[str, Any]) -> npt.NDArray[np.void]:
    """The samples of a telemetry message as a numpy structured array (for subscribers)."""
    from protocols.telemetry import SAMPLE_DTYPES

    sample_format = SampleFormat[str(body["sample_format"]).upper()]
    raw = base64.b64decode(str(body["samples_b64"]))
    return np.frombuffer(raw, dtype=SAMPLE_DTYPES[sample_format])


class ServiceError(DeviceBridgeError):
    """A request to the service that cannot be carried out (unknown device, busy, ...)."""

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(f"{device}: {message}" if device else message)
        self.device = device


# --------------------------------------------------------------------------- one device


class DeviceWorker:
    """Keeps one device connected, streams its telemetry and runs its routines.

    Routines run through :class:`~devicebridge.runner.RoutineRunner`, the same runner as
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
        # Device jobs other than routines (program installs), one at a time, in order.
        self._jobs: asyncio.Queue[Callable[[], Coroutine[Any, Any, None]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._run_task: asyncio.Task[RunSummary | None] | None = None
        # Telemetry is handled inside the session's receive callback (an observer), not by
        # a task reading a queue: one task hand-off per batch per device cost more than
        # the recording and batching together.
        self._remove_telemetry_observer: Callable[[], None] | None = None
        self._events = session.events()
        # Connection states are polled by the service's one status loop for all devices
        # (one timer instead of one per device); a stopping worker is left out of it.
        self.stopping = False

    @property
    def state(self) -> ConnectionState:
        return self.session.state

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
        elif self.session.battery_percent != self.published_battery:
            self.publish_state()

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
        self.kind = _kind_name(info.kind)
        self.service.announce_device(self)
        await self.service.install_pending(self)

    # ------------------------------------------------------------------ telemetry

    def _on_telemetry(self, item: TelemetryItem) -> None:
        if isinstance(item, TelemetryGap):
            if self.batcher is not None:
                self._publish_telemetry(self.batcher.gap(item))
            return
        self.samples_received += len(item)
        if self.batcher is not None:
            self._publish_telemetry(self.batcher.add(item))

    def _publish_telemetry(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return  # most batches complete no message: nothing to look up
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
            code = event.code
            self.service.publisher.publish(
                self.service.topics.events(self.serial),
                {
                    "type": "device_event",
                    "code": code.name.lower() if isinstance(code, EventCode) else int(code),
                    "event_sequence": event.event_sequence,
                    "device_time_ms": event.device_time_ms,
                    "payload_hex": event.payload.hex(),
                },
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
                self.start_routine(routine, program_id, mode=RunMode.DEVICE, adopt_program=True)
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

    def start_routine(
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

        Raises :class:`~devicebridge.runner.RoutineRefusedError` (recorded and published)
        when admission refuses it, and :class:`ServiceError` while another routine runs.
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
        try:
            runner.admit()
        except RoutineRefusedError as refused:
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
        self.runner = runner
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
        try:
            result = await runner.run(max_duration_s=max_duration_s)
        except DeviceBridgeError as exc:
            LOG.warning("%s: routine %r failed: %s", self.serial, runner.routine.name, exc)
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


# --------------------------------------------------------------------------- the service


class BridgeService:
    """The supervisor: device workers, the program inbox, the recorder and the MQTT link."""

    def __init__(
        self,
        *,
        bridge_id: str,
        data_dir: Path,
        policy: SafetyPolicy,
        clock: Clock,
        devices: Sequence[PairedDevice] = (),
        session_factory: Callable[[PairedDevice], DeviceSession] | None = None,
        mqtt: MqttSettings | None = None,
        home_assistant: bool = False,
        now: Now = _utc_now,
        telemetry_batch_s: float = DEFAULT_TELEMETRY_BATCH_S,
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
        rng: random.Random | None = None,
        run_mode: RunMode = RunMode.AUTO,
        on_routine_started: Callable[[str, Routine], None] | None = None,
        local_api: bool = True,
        max_validity: timedelta = DEFAULT_MAX_VALIDITY,
    ) -> None:
        self.bridge_id = bridge_id
        self.run_mode = run_mode
        # Told of every routine that starts (``--simulate``: the simulated hand follows it).
        self._on_routine_started = on_routine_started
        self.topics = Topics(bridge_id, mqtt.topic_root if mqtt else "devicebridge/v1")
        self.data_dir = data_dir
        self.policy = policy
        self.clock = clock
        self.now = now
        self.mqtt_settings = mqtt
        self.home_assistant = home_assistant and mqtt is not None
        self.telemetry_batch_s = telemetry_batch_s
        self.status_interval_s = status_interval_s
        self.rng = rng or random.Random()
        self.sessions = SessionStore(data_dir / SESSIONS_FILENAME)
        # Telemetry and decisions of running sessions: committed together on a thread of
        # their own every FLUSH_INTERVAL_S, so a hundred devices cost four commits a
        # second, not a thousand (a killed bridge loses at most that much).
        self.session_writer = StoreWriter(self.sessions)
        self.programs = ProgramStore(data_dir / PROGRAMS_FILENAME)
        self.inbox = ProgramInbox(
            self.programs,
            bridge_id=bridge_id,
            policy=policy,
            now=now,
            max_validity=max_validity,
            on_accepted=self._program_accepted,
        )
        self.outbox = Outbox(data_dir / OUTBOX_FILENAME, bridge_id=bridge_id) if mqtt else None
        self.link: MqttLink | None = None
        if mqtt is not None and self.outbox is not None:
            subscriptions = [self.topics.program_push]
            if self.home_assistant:
                subscriptions.append(HOME_ASSISTANT_STATUS_TOPIC)
            self.link = MqttLink(
                mqtt,
                self.topics,
                self.outbox,
                clock=clock,
                subscriptions=subscriptions,
                on_message=self.on_message,
                rng=random.Random(self.rng.random()),
            )
        self.publisher = Publisher(self.outbox, self.link.notify if self.link else _nothing)
        self.workers: dict[str, DeviceWorker] = {}
        self._devices = list(devices)
        self._session_factory = session_factory
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._status_dirty = True
        self._closed = False
        self.started_at = now()
        self.telemetry_messages = 0
        self.recovered_sessions: list[int] = []
        self._announced: set[str] = set()
        # Interrupted sessions whose device may still hold samples, by device serial.
        self._resumable: dict[str, Resumable] = {}
        self.local_api = LocalApiServer(self) if local_api else None

    # ------------------------------------------------------------------ life cycle

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def run(self) -> None:
        """Run until :meth:`request_stop` (or cancellation); always shuts down cleanly."""
        tasks: list[asyncio.Task[None]] = []
        try:
            self._recover()
            if self.link is not None:
                tasks.append(asyncio.create_task(self.link.run(), name="mqtt link"))
            self.publish_status("running")
            self.publish_adherence()
            for paired in self._devices:
                self.add_device(paired)
            # Interrupted sessions of devices this bridge does not serve: as recorded.
            for held in self._resumable.values():
                self.publish_record(held.record)
            self._resumable.clear()
            tasks.append(asyncio.create_task(self._status_loop(), name="status"))
            if self.local_api is not None:
                try:
                    await self.local_api.start()
                except OSError as exc:
                    LOG.warning("no local API (devicebridge run uses it): %s", exc)
                    self.local_api = None
            self._started.set()
            LOG.info(
                "bridge %s serving %d device(s)%s",
                self.bridge_id,
                len(self.workers),
                f", MQTT {self.mqtt_settings.host}:{self.mqtt_settings.port}"
                if self.mqtt_settings
                else ", no MQTT broker (local only)",
            )
            await self._stop.wait()
        finally:
            await self._shutdown(tasks)

    def add_device(self, paired: PairedDevice) -> DeviceWorker:
        if self._session_factory is None:
            raise ServiceError("no way to open device sessions was given")
        if paired.serial_number in self.workers:
            return self.workers[paired.serial_number]
        worker = DeviceWorker(self, paired, self._session_factory(paired))
        self.workers[paired.serial_number] = worker
        held = self._resumable.pop(paired.serial_number, None)
        if held is not None:
            worker.resume(held)
        worker.start()
        return worker

    def _recover(self) -> None:
        """Sessions a killed bridge left running: marked interrupted (with the summary of
        what they recorded) and reported. Where the device was running the routine as its
        program, what it still holds is taken first when it connects (see
        :class:`~devicebridge.runner.SessionResumption`), and the report follows then."""
        for record in recover_sessions(self.sessions, self.policy):
            self.recovered_sessions.append(record.id)
            LOG.warning("session %d was interrupted by a bridge stop", record.id)
            held = resumable(self.sessions, record)
            if held is not None:
                self._resumable[record.device_serial] = held  # the latest per device
            else:
                self.publish_record(record)

    def publish_record(self, record: SessionRecord) -> None:
        """Publish a stored session's summary as it is recorded."""
        self.publish_summary(
            record.id,
            record.device_serial,
            record.status,
            record.end_reason,
            record.summary,
            int(record.program_id) if record.program_id else None,
            record.started_at,
        )

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        if self._closed:
            return
        self._closed = True
        LOG.info("bridge %s stopping", self.bridge_id)
        if self.local_api is not None:
            await self.local_api.stop()
        workers = list(self.workers.values())
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        self.publish_status("stopped")
        link_task = next((t for t in tasks if t.get_name() == "mqtt link"), None)
        if self.link is not None and self.outbox is not None and self.link.connected:
            # Give what is queued a moment to reach the broker (wall time: a hang guard).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_DRAIN_S):
                    while len(self.outbox) and self.link.connected:
                        self.link.notify()
                        await asyncio.sleep(0.01)  # polls the outbox depth while it drains
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if link_task is not None:
            LOG.info("MQTT link closed (offline announced)")
        self.write_status_file("stopped")
        self.session_writer.close()
        self.sessions.close()
        self.programs.close()
        if self.outbox is not None:
            self.outbox.close()
        LOG.info("bridge %s stopped", self.bridge_id)

    # ------------------------------------------------------------------ routines

    def worker(self, serial: str) -> DeviceWorker:
        try:
            return self.workers[serial]
        except KeyError:
            raise ServiceError("not supervised by this bridge", device=serial) from None

    def start_routine(
        self,
        serial: str,
        routine: Routine,
        *,
        program_id: int | None = None,
        mode: RunMode | None = None,
        max_duration_s: float | None = None,
        on_update: Callable[[RunnerState], None] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> RoutineRunner:
        """Run ``routine`` on the device (now, or when it next connects), recording it.

        Admission is checked first: a refusal raises
        :class:`~devicebridge.runner.RoutineRefusedError`, recorded and published.
        """
        worker = self.worker(serial)
        if routine.device_kind.value != worker.kind:
            raise ServiceError(
                f"routine {routine.name!r} is for a {routine.device_kind.value}, "
                f"this is a {worker.kind}",
                device=serial,
            )
        runner = worker.start_routine(
            routine,
            program_id,
            mode=mode,
            max_duration_s=max_duration_s,
            on_update=on_update,
            on_decision=on_decision,
        )
        if self._on_routine_started is not None:
            self._on_routine_started(serial, routine)
        return runner

    def device_for(self, wanted: str | None, kind: str) -> str:
        """The serial of the served device named ``wanted`` (name or serial), or of the
        only served device of ``kind`` when ``wanted`` is None."""
        workers = list(self.workers.values())
        if wanted is not None:
            for worker in workers:
                if wanted in (worker.paired.name, worker.serial):
                    return worker.serial
            names = ", ".join(w.paired.name for w in workers) or "none"
            raise ServiceError(f"no served device named {wanted!r} (served: {names})")
        candidates = [w for w in workers if w.kind == kind]
        if len(candidates) == 1:
            return candidates[0].serial
        names = ", ".join(w.paired.name for w in candidates) or "none"
        raise ServiceError(
            f"{'several' if candidates else 'no'} served devices of kind {kind} "
            f"({names}): choose one with --device"
        )

    def known_program(self, kind: str, program_crc32: int) -> tuple[int, Routine] | None:
        """The valid stored program for ``kind`` whose device program has this CRC-32 (as
        this bridge builds it now, under its policy), with its routine."""
        now = self.now()
        for program in self.programs.programs():
            if program.device_kind != kind or program.expires_at <= now:
                continue
            try:
                routine = parse_routine(program.program_text, self.policy, label="program")
                encoded = program_from_routine(routine, self.policy).encode()
            except (DeviceBridgeError, ValueError):
                continue
            if program_crc32_of(encoded) == program_crc32:
                return program.id, routine
        return None

    def program_routine(self, program_id: int) -> Routine:
        """The routine of stored program ``program_id``, checked again against the policy."""
        program = next((p for p in self.programs.programs() if p.id == program_id), None)
        if program is None:
            raise ServiceError(f"no program {program_id} on this bridge (devicebridge programs)")
        if program.expires_at <= self.now():
            raise ServiceError(
                f"program {program_id} expired at {program.expires_at.isoformat()}; "
                "ask the therapist for a new one"
            )
        return parse_routine(program.program_text, self.policy, label=f"program {program_id}")

    def start_program(
        self,
        serial: str,
        program_id: int,
        *,
        mode: RunMode | None = None,
        max_duration_s: float | None = None,
        on_update: Callable[[RunnerState], None] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> RoutineRunner:
        """Run the stored program ``program_id`` on the device; the session counts for it."""
        return self.start_routine(
            serial,
            self.program_routine(program_id),
            program_id=program_id,
            mode=mode,
            max_duration_s=max_duration_s,
            on_update=on_update,
            on_decision=on_decision,
        )

    def publish_summary(
        self,
        session_id: int,
        serial: str,
        status: str,
        reason: str | None,
        summary: Mapping[str, Any],
        program_id: int | None,
        started_at: datetime,
    ) -> None:
        self.publisher.publish(
            self.topics.session_summaries,
            {
                "session_id": session_id,
                "serial": serial,
                "status": status,
                "end_reason": reason,
                "program_id": program_id,
                "started_at": started_at.isoformat(),
                "ended_at": self.now().isoformat(),
                "summary": dict(summary),
            },
        )
        if program_id is not None:
            self.publish_adherence()

    # ------------------------------------------------------------------ programs

    async def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.program_push:
            self.handle_push(payload)
        elif topic == HOME_ASSISTANT_STATUS_TOPIC and payload.strip() == b"online":
            LOG.info("Home Assistant is back: republishing discovery")
            self._announced.clear()
            for worker in self.workers.values():
                if worker.batcher is not None:
                    self.announce_device(worker)
        else:
            LOG.debug("nothing to do for a message of %d bytes on %r", len(payload), topic)

    def handle_push(self, payload: bytes) -> dict[str, Any] | None:
        """Answer a pushed program on ``programs/ack`` (the inbox never raises); None when
        it was dropped unanswered (no readable nonce)."""
        ack = self.inbox.receive(payload)
        if ack is not None:
            self.publisher.publish(self.topics.program_ack, ack)
        return ack

    @property
    def acks(self) -> list[dict[str, Any]]:
        """The latest acknowledgements (up to ``inbox.RECENT_ACKS``), oldest first."""
        return list(self.inbox.recent_acks)

    def _program_accepted(self, program: AcceptedProgram) -> None:
        for worker in self.workers.values():
            if worker.kind == program.device_kind and worker.batcher is not None:
                worker.enqueue(functools.partial(self.install_pending, worker))
        self.publish_adherence()

    async def install_pending(self, worker: DeviceWorker) -> None:
        """Install every valid program for this device kind not yet on this device."""
        for program in self.programs.pending_for(worker.kind, worker.serial):
            if worker.session.state is not ConnectionState.READY or worker.runner is not None:
                return  # the next connect, or the end of the routine, tries again
            try:
                routine = parse_routine(program.program_text, self.policy, label="program")
                device_program = program_from_routine(routine, self.policy)
                await install_program(worker.session, device_program)
            except (DeviceBridgeError, ValueError) as exc:
                LOG.warning("%s: installing program %d failed: %s", worker.serial, program.id, exc)
                continue
            self.programs.mark_installed(program.id, worker.serial)
            LOG.info("%s: program %d installed", worker.serial, program.id)
            self.publisher.publish(
                self.topics.events(worker.serial),
                {"type": "program_installed", "program_id": program.id},
            )
            self.publish_adherence()

    def adherence(self) -> dict[str, Any]:
        devices_by_kind: dict[str, list[str]] = {}
        for worker in self.workers.values():
            devices_by_kind.setdefault(worker.kind, []).append(worker.serial)
        programs = [
            _program_body(p, devices_by_kind, self.policy) for p in self.programs.programs()
        ]
        sessions = [
            {
                "session_id": r.id,
                "program_id": int(r.program_id) if r.program_id else None,
                "serial": r.device_serial,
                "routine": r.routine_name,
                "status": r.status,
                "started_at": r.started_at.isoformat(),
                "ended_at": r.ended_at.isoformat() if r.ended_at else None,
                "summary": dict(r.summary),
            }
            for r in self.sessions.sessions(limit=ADHERENCE_SESSIONS * 4)
            if r.program_id
        ][:ADHERENCE_SESSIONS]
        return {"bridge_id": self.bridge_id, "programs": programs, "sessions": sessions}

    def publish_adherence(self) -> None:
        if self.publisher.enabled:
            self.publisher.publish(
                self.topics.programs_installed,
                {**self.adherence(), "updated_at": self.now().isoformat()},
                retain=True,
            )

    # ------------------------------------------------------------------ Home Assistant

    def announce_device(self, worker: DeviceWorker) -> None:
        if not self.home_assistant or worker.serial in self._announced:
            return
        self._announced.add(worker.serial)
        entity = DiscoveredEntity(
            serial=worker.serial,
            name=worker.paired.name,
            kind=worker.kind,
            model=worker.state_body()["model"],
            firmware=worker.state_body()["firmware"],
        )
        for topic, payload in discovery_messages(self.topics, entity):
            self.publisher.publish_raw(topic, payload, retain=True)

    # ------------------------------------------------------------------ status

    def status_changed(self) -> None:
        self._status_dirty = True

    async def _status_loop(self) -> None:
        last_s = -math.inf
        while True:
            for worker in list(self.workers.values()):
                if not worker.stopping:
                    worker.check_state()
            due = self.clock.now_s() - last_s >= self.status_interval_s
            if self._status_dirty or due:
                self.write_status_file("running")
                if due:
                    self.publish_status("running")
                    last_s = self.clock.now_s()
                self._status_dirty = False
            await self.clock.sleep(STATE_POLL_S)

    def status(self, state: str) -> dict[str, Any]:
        return {
            "bridge_id": self.bridge_id,
            "version": __version__,
            "state": state,
            "pid": os.getpid(),
            "started_at": self.started_at.isoformat(),
            "updated_at": self.now().isoformat(),
            "mqtt": {
                "configured": self.mqtt_settings is not None,
                "host": self.mqtt_settings.host if self.mqtt_settings else None,
                "port": self.mqtt_settings.port if self.mqtt_settings else None,
                "connected": self.link.connected if self.link else False,
                "protocol": self.link.protocol.name if self.link else None,
            },
            "outbox_depth": len(self.outbox) if self.outbox is not None else 0,
            "devices": [w.state_body() for w in self.workers.values()],
        }

    def publish_status(self, state: str) -> None:
        self.publisher.publish(self.topics.status, self.status(state), retain=True)

    def write_status_file(self, state: str) -> None:
        write_status_file(self.data_dir, self.status(state))


def _nothing() -> None:
    return None


def _program_started(event: Event) -> int | None:
    """The CRC-32 of the program a ``PROGRAM_STEP`` event says just started, if it does."""
    try:
        step = ProgramStepEvent.decode(event.payload)
    except ProtocolError:
        return None
    if step.reason != ProgramStepReason.STARTED:
        return None
    return step.program_crc32


def _program_body(
    program: StoredProgram, devices_by_kind: Mapping[str, list[str]], policy: SafetyPolicy
) -> dict[str, Any]:
    try:
        routine: Routine | None = parse_routine(program.program_text, policy, label="program")
    except RoutineError:
        routine = None  # this bridge's policy no longer admits it: no schedule to follow
    schedule = routine.schedule if routine is not None else None
    return {
        "program_id": program.id,
        "nonce": program.nonce,
        "category": routine.category if routine is not None else None,
        "schedule": (
            {"max_sessions": schedule.max_sessions, "per_days": schedule.per_days}
            if schedule is not None
            else None
        ),
        "therapist_id": program.therapist_id,
        "key_id": program.key_id,
        "program_version": program.program_version,
        "routine": program.routine_name,
        "device_kind": program.device_kind,
        "received_at": program.received_at.isoformat(),
        "expires_at": program.expires_at.isoformat(),
        "installed_on": list(program.installed_on),
        "pending_on": [
            s for s in devices_by_kind.get(program.device_kind, []) if s not in program.installed_on
        ],
    }


# --------------------------------------------------------------------------- status file


def status_file(data_dir: Path) -> Path:
    return data_dir / STATUS_FILENAME


def write_status_file(data_dir: Path, status: Mapping[str, Any]) -> None:
    """Replace the status file atomically (a reader never sees half a file); mode 0600."""
    path = status_file(data_dir)
    temporary = path.with_suffix(".tmp")
    private_directory(data_dir)
    fd = open_private(temporary, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(status, indent=2, sort_keys=True))
    temporary.replace(path)


def read_status_file(data_dir: Path) -> dict[str, Any] | None:
    """The last status the service wrote, with ``alive`` telling whether a bridge runs now.

    ``alive`` comes from the data directory's bridge lock (:mod:`devicebridge.storage.lock`),
    not from the pid in the file: a killed bridge leaves ``state: running`` behind, and its
    pid may belong to another process by now. A bridge that holds the lock but has not
    written its own status yet (the file is missing or an earlier bridge's) is reported as
    ``{"state": "starting", "pid": ..., "alive": true}``. ``None``: no status and no bridge.
    """
    path = status_file(data_dir)
    running_pid = lock_holder(data_dir)
    status: dict[str, Any] | None
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        status = None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{path}: unreadable status file: {exc}") from exc
    if status is not None and not isinstance(status, dict):
        raise ServiceError(f"{path}: unreadable status file: not a JSON object")
    if running_pid is not None and (status is None or status.get("pid") != running_pid):
        status = {"state": "starting", "pid": running_pid}
    if status is None:
        return None
    status["alive"] = running_pid is not None
    return status
