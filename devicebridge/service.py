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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from devicebridge import __version__
from devicebridge.clock import Clock
from devicebridge.core.backoff import Backoff, BackoffPolicy
from devicebridge.core.engine import (
    ZONE_CODES,
    Decision,
    DecisionKind,
    LedEngine,
    MassageEngine,
)
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.reassembly import TelemetryGap, TelemetryItem
from devicebridge.core.routine import (
    DeviceKindName,
    LedStep,
    MassageStep,
    Routine,
    parse_routine,
)
from devicebridge.core.signed_program import DEFAULT_MAX_VALIDITY
from devicebridge.core.states import ConnectionState
from devicebridge.errors import DeviceBridgeError, NotConnectedError
from devicebridge.homeassistant import (
    HOME_ASSISTANT_STATUS_TOPIC,
    DiscoveredEntity,
    discovery_messages,
)
from devicebridge.inbox import AcceptedProgram, ProgramInbox
from devicebridge.mqtt import MqttLink, MqttSettings, Topics
from devicebridge.program_transfer import install_program, program_from_routine
from devicebridge.runner import StoreWriter
from devicebridge.session import DeviceSession, MaskSession, MassagerSession
from devicebridge.storage.outbox import OUTBOX_FILENAME, Outbox
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore, StoredProgram
from devicebridge.storage.registry import PairedDevice
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionStatus, SessionStore
from devicebridge.transport.base import DeviceInfo
from protocols import EventCode, MassageMode, SampleFormat, StopAll, TelemetryBatch, Zone
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


# --------------------------------------------------------------------------- routines


@dataclass
class RoutineRun:
    """One routine running on one device: its engine and its session record."""

    session_id: int
    routine: Routine
    engine: MassageEngine | LedEngine
    program_id: int | None
    started_at: datetime
    samples: int = 0
    lost_samples: int = 0


def summary_of(run: RoutineRun) -> dict[str, Any]:
    """What a therapist sees of a session: completion, time in band, dose."""
    common: dict[str, Any] = {
        "routine": run.routine.name,
        "routine_version": run.routine.version,
        "samples": run.samples,
        "lost_samples": run.lost_samples,
    }
    if isinstance(run.engine, MassageEngine):
        m = run.engine.summary
        return {
            **common,
            "completion": round(m.completion, 4),
            "steps_done": m.steps_done,
            "steps_total": m.steps_total,
            "contact_s": round(m.contact_s, 3),
            "time_in_band_s": round(m.time_in_band_s, 3),
            "in_band_fraction": round(m.in_band_fraction, 4),
            "out_of_band_events": m.out_of_band_events,
            "cap_events": m.cap_events,
            "stopped_reason": m.stopped_reason,
        }
    led = run.engine.summary
    return {
        **common,
        "completion": round(led.completion, 4),
        "steps_done": led.steps_done,
        "steps_total": led.steps_total,
        "light_s": round(led.light_s, 3),
        "dose_j_cm2": {k: round(v, 4) for k, v in led.dose_j_cm2.items()},
        "max_temperature_c": None
        if math.isinf(led.max_temperature_c)
        else round(led.max_temperature_c, 2),
        "stopped_reason": led.stopped_reason,
    }


class ServiceError(DeviceBridgeError):
    """A request to the service that cannot be carried out (unknown device, busy, ...)."""

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(f"{device}: {message}" if device else message)
        self.device = device


# --------------------------------------------------------------------------- one device


class DeviceWorker:
    """Keeps one device connected, records its telemetry and runs its routines."""

    def __init__(self, service: BridgeService, paired: PairedDevice, session: DeviceSession):
        self.service = service
        self.paired = paired
        self.session = session
        self.serial = paired.serial_number
        self.kind = paired.kind
        self.batcher: TelemetryBatcher | None = None
        self.run: RoutineRun | None = None
        self.published_state: ConnectionState | None = None
        self.published_battery: int | None = None
        self.samples_received = 0
        self._commands: asyncio.Queue[Callable[[], Coroutine[Any, Any, None]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_runs: list[tuple[Routine, int | None]] = []
        # Telemetry is handled inside the session's receive callback (an observer), not by
        # a task reading a queue: one task hand-off per batch per device cost more than
        # the recording and batching together.
        self._remove_telemetry_observer: Callable[[], None] | None = None
        self._events = session.events()
        self._ready_count = 0
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
            (self._run_commands(), "commands"),
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
                self._ready_count += 1
                self._commands.put_nowait(self._on_ready)
            self.publish_state()
            self.service.status_changed()
        elif self.session.battery_percent != self.published_battery:
            self.publish_state()

    def state_body(self) -> dict[str, Any]:
        try:
            info: DeviceInfo | None = self.session.device_info
        except NotConnectedError:
            info = None  # not connected yet since the bridge started
        return {
            "serial": self.serial,
            "name": self.paired.name,
            "kind": self.kind,
            "model": info.model_number if info else self.paired.model,
            "firmware": info.firmware_revision if info else None,
            "state": self.session.state.value,
            "battery_percent": self.session.battery_percent,
            "session_id": self.run.session_id if self.run else None,
        }

    def publish_state(self) -> None:
        self.published_battery = self.session.battery_percent
        body = {**self.state_body(), "updated_at": self.service.now().isoformat()}
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
        pending, self._pending_runs = self._pending_runs, []
        for routine, program_id in pending:
            await self._begin(routine, program_id)

    # ------------------------------------------------------------------ telemetry

    def _on_telemetry(self, item: TelemetryItem) -> None:
        if isinstance(item, TelemetryGap):
            if self.run is not None:
                self.run.lost_samples += item.sample_count
            if self.batcher is not None:
                self._publish_telemetry(self.batcher.gap(item))
            return
        self.samples_received += len(item)
        if self.run is not None:
            self._record(self.run, item)
        if self.batcher is not None:
            self._publish_telemetry(self.batcher.add(item))

    def _publish_telemetry(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return  # most batches complete no message: nothing to look up
        topic = self.service.topics.telemetry(self.serial)
        for body in messages:
            self.service.publisher.publish(topic, body)
            self.service.telemetry_messages += 1
        if self.session.battery_percent != self.published_battery:
            self.publish_state()

    def _record(self, run: RoutineRun, batch: TelemetryBatch) -> None:
        writer = self.service.session_writer
        writer.add_samples(run.session_id, batch.first_sequence, batch.samples)
        run.samples += len(batch)
        decisions = run.engine.feed(batch.samples, batch.first_sequence)
        if decisions:
            writer.add_decisions(run.session_id, decisions)
            for decision in decisions:
                self._publish_decision(run, decision)
                self._commands.put_nowait(functools.partial(self._apply, run, decision))
        if run.engine.finished:
            status: SessionStatus = "completed" if run.engine.summary.completed else "stopped"
            self.finish(status, run.engine.summary.stopped_reason)

    def _publish_decision(self, run: RoutineRun, decision: Decision) -> None:
        self.service.publisher.publish(
            self.service.topics.events(self.serial),
            {
                "type": "decision",
                "session_id": run.session_id,
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

    # ------------------------------------------------------------------ commands

    async def _run_commands(self) -> None:
        while True:
            command = await self._commands.get()
            try:
                await command()
            except DeviceBridgeError as exc:
                LOG.warning("%s: %s", self.serial, exc)

    async def _apply(self, run: RoutineRun, decision: Decision) -> None:
        """Carry an engine decision out on the device (commands only; the record is kept)."""
        if self.run is not run and decision.kind not in (DecisionKind.STOP, DecisionKind.COMPLETE):
            return
        kind = decision.kind
        session = self.session
        if kind in (DecisionKind.PAUSE, DecisionKind.STOP, DecisionKind.COMPLETE):
            await session.stop_all()
        elif isinstance(session, MassagerSession) and isinstance(run.engine, MassageEngine):
            step = run.engine.current_step
            if kind in (DecisionKind.GUIDANCE, DecisionKind.NEXT_STEP):
                await _configure_massager(session, step, decision.intensity)
            elif kind in (DecisionKind.RESUME, DecisionKind.LOWER_INTENSITY):
                await session.set_intensity(decision.intensity or step.intensity)
        elif isinstance(session, MaskSession) and isinstance(run.engine, LedEngine):
            if kind in (
                DecisionKind.GUIDANCE,
                DecisionKind.NEXT_STEP,
                DecisionKind.LOWER_INTENSITY,
            ):
                await _start_led(session, run.engine.current_step, run.engine.setpoints_mw_cm2())
            elif kind is DecisionKind.STOP_STEP:
                await session.stop_led()

    # ------------------------------------------------------------------ routines

    def enqueue(self, command: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``command`` after the device commands queued before it."""
        self._commands.put_nowait(command)

    def schedule_routine(self, routine: Routine, program_id: int | None) -> None:
        """Start now if the device is ready, else when it next connects."""
        if self.run is not None:
            raise ServiceError("a routine is already running", device=self.serial)
        if self.session.state is ConnectionState.READY and self.batcher is not None:
            self._commands.put_nowait(functools.partial(self._begin, routine, program_id))
        else:
            self._pending_runs.append((routine, program_id))

    async def _begin(self, routine: Routine, program_id: int | None) -> None:
        if self.run is not None:
            return
        info = self.session.device_info
        rate_hz = float(info.profile.sample_rate_hz)
        policy = self.service.policy
        engine: MassageEngine | LedEngine = (
            MassageEngine(routine, policy, sample_rate_hz=rate_hz)
            if routine.device_kind is DeviceKindName.MASSAGER
            else LedEngine(routine, policy, sample_rate_hz=rate_hz)
        )
        assert self.batcher is not None
        session_id = self.service.sessions.start_session(
            routine_name=routine.name,
            category=routine.category,
            device_serial=self.serial,
            device_kind=self.kind,
            sample_format=self.batcher.sample_format,
            sample_rate_hz=rate_hz,
            routine_text=routine.source_text,
            program_id=None if program_id is None else str(program_id),
            started_at=self.service.now(),
        )
        run = RoutineRun(session_id, routine, engine, program_id, self.service.now())
        self.run = run
        LOG.info("%s: session %d started (%s)", self.serial, session_id, routine.name)
        decisions = engine.start()
        self.service.session_writer.add_decisions(session_id, decisions)
        for decision in decisions:
            self._publish_decision(run, decision)
            await self._apply(run, decision)
        self.publish_state()

    def finish(self, status: SessionStatus, reason: str | None) -> None:
        run = self.run
        if run is None:
            return
        self.run = None
        summary = summary_of(run)
        # Its telemetry and decisions first, so the record is whole once it says finished.
        self.service.session_writer.commit_session(run.session_id)
        self.service.sessions.finish_session(
            run.session_id, status=status, end_reason=reason, summary=summary
        )
        LOG.info("%s: session %d %s", self.serial, run.session_id, status)
        self.service.publish_summary(
            run.session_id, self.serial, status, reason, summary, run.program_id, run.started_at
        )
        self.publish_state()

    # ------------------------------------------------------------------ stop

    async def stop(self) -> None:
        """STOP_ALL, finish the running session as ``stopped``, close the link."""
        self.stopping = True
        if self.session.state is ConnectionState.READY:
            try:
                await self.session.send(StopAll(), timeout_s=STOP_ALL_TIMEOUT_S)
            except DeviceBridgeError as exc:
                LOG.warning("%s: STOP_ALL at shutdown: %s", self.serial, exc)
        self.finish("stopped", "bridge stopped")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._remove_telemetry_observer is not None:
            self._remove_telemetry_observer()
        if self.batcher is not None:
            self._publish_telemetry(self.batcher.flush(final=True))
        await self.session.close()
        self.publish_state()


async def _configure_massager(
    session: MassagerSession, step: MassageStep, intensity: int | None
) -> None:
    await session.set_mode(MassageMode[step.mode.upper()])
    await session.set_intensity(intensity or step.intensity)
    await session.set_zone(Zone(ZONE_CODES[step.zone]))


async def _start_led(session: MaskSession, step: LedStep, setpoints: Mapping[str, float]) -> None:
    await session.start_led(
        setpoints["red"],
        setpoints["near_infrared"],
        setpoints["blue"],
        max(1, math.ceil(step.duration_s)),
        step.pulse_hz,
    )


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
        max_validity: timedelta = DEFAULT_MAX_VALIDITY,
    ) -> None:
        self.bridge_id = bridge_id
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
            tasks.append(asyncio.create_task(self._status_loop(), name="status"))
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
        worker.start()
        return worker

    def _recover(self) -> None:
        """Sessions a killed bridge left running: mark them interrupted and report them."""
        self.recovered_sessions = self.sessions.recover()
        for session_id in self.recovered_sessions:
            record = self.sessions.session(session_id)
            LOG.warning("session %d was interrupted by a bridge stop", session_id)
            self.publish_summary(
                session_id,
                record.device_serial,
                "interrupted",
                record.end_reason,
                {"routine": record.routine_name, **dict(record.summary)},
                int(record.program_id) if record.program_id else None,
                record.started_at,
            )

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        if self._closed:
            return
        self._closed = True
        LOG.info("bridge %s stopping", self.bridge_id)
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
        self, serial: str, routine: Routine, *, program_id: int | None = None
    ) -> DeviceWorker:
        """Run ``routine`` on the device (now, or when it next connects), recording it."""
        worker = self.worker(serial)
        if routine.device_kind.value != worker.kind:
            raise ServiceError(
                f"routine {routine.name!r} is for a {routine.device_kind.value}, "
                f"this is a {worker.kind}",
                device=serial,
            )
        worker.schedule_routine(routine, program_id)
        return worker

    def start_program(self, serial: str, program_id: int) -> DeviceWorker:
        program = next((p for p in self.programs.programs() if p.id == program_id), None)
        if program is None:
            raise ServiceError(f"no program {program_id} on this bridge", device=serial)
        routine = parse_routine(program.program_text, self.policy, label=f"program {program_id}")
        return self.start_routine(serial, routine, program_id=program_id)

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
            if worker.session.state is not ConnectionState.READY:
                return  # the next connect tries again
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
        programs = [_program_body(p, devices_by_kind) for p in self.programs.programs()]
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


def _program_body(
    program: StoredProgram, devices_by_kind: Mapping[str, list[str]]
) -> dict[str, Any]:
    return {
        "program_id": program.id,
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
    """Replace the status file atomically (a reader never sees half a file)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = status_file(data_dir)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(status, indent=2, sort_keys=True))
    temporary.replace(path)


def read_status_file(data_dir: Path) -> dict[str, Any] | None:
    """The last status the service wrote, with ``alive`` telling whether it still runs."""
    path = status_file(data_dir)
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{path}: unreadable status file: {exc}") from exc
    status["alive"] = status.get("state") == "running" and _pid_alive(int(status.get("pid", 0)))
    return status


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
