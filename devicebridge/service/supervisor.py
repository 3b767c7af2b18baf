"""``devicebridge serve``: the long-running bridge.

A supervisor keeps one :class:`~devicebridge.device.session.DeviceSession` per paired device
(each reconnects by itself once connected; the first connect is retried here), a
recorder stores telemetry into the :class:`~devicebridge.storage.sessions.SessionStore`
while a routine runs and batches it into about one MQTT message per device per second,
and, when a broker is configured, everything published goes through the on-disk
:class:`~devicebridge.storage.outbox.Outbox` and the
:class:`~devicebridge.integrations.mqtt.MqttLink` (docs/mqtt.md). Signed programs pushed by
therapists are verified, checked against the bridge's own policy, stored and acknowledged by
the program inbox (:mod:`devicebridge.service.inbox`),
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
import contextlib
import functools
import logging
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from devicebridge import __version__
from devicebridge.clock import Clock
from devicebridge.core.engine import Decision
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.routine import Routine, parse_routine
from devicebridge.core.signed_program import DEFAULT_MAX_VALIDITY
from devicebridge.core.states import ConnectionState
from devicebridge.device.program_transfer import install_program, program_from_routine
from devicebridge.device.session import DeviceSession
from devicebridge.errors import (
    DeviceBridgeError,
    RoutineError,
    ServiceError,
)
from devicebridge.integrations.homeassistant import (
    HOME_ASSISTANT_STATUS_TOPIC,
    DiscoveredEntity,
    discovery_messages,
)
from devicebridge.integrations.mqtt import MqttLink, MqttSettings, Topics
from devicebridge.run.recovery import Resumable, recover_sessions, resumable
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.run.view import RunnerState
from devicebridge.service.inbox import AcceptedProgram, ProgramInbox
from devicebridge.service.local_api import LocalApiServer
from devicebridge.service.publishing import Publisher
from devicebridge.service.status import write_status_file
from devicebridge.service.telemetry import DEFAULT_TELEMETRY_BATCH_S
from devicebridge.service.worker import DeviceWorker
from devicebridge.storage.outbox import OUTBOX_FILENAME, Outbox
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore, StoredProgram
from devicebridge.storage.registry import PairedDevice
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionRecord, SessionStore
from devicebridge.storage.writer import StoreWriter
from protocols import program_crc32 as program_crc32_of

LOG = logging.getLogger(__name__)


DEFAULT_STATUS_INTERVAL_S: Final = 10.0
STATE_POLL_S: Final = 0.25  # how often connection states are compared (clock time)
SHUTDOWN_DRAIN_S: Final = 5.0  # wall time the outbox gets to drain when stopping
ADHERENCE_SESSIONS: Final = 100  # session summaries kept in the retained adherence message

Now = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


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
        # Telemetry and decisions of running sessions: committed together in the store
        # writer's process every FLUSH_INTERVAL_S, so a hundred devices cost four commits
        # a second, not a thousand (a killed bridge loses at most that much).
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
        :class:`~devicebridge.run.recovery.SessionResumption`), and the report follows then."""
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
        self.publisher.flush()
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
        self.publisher.flush()
        if self.outbox is not None:
            self.outbox.close()
        LOG.info("bridge %s stopped", self.bridge_id)

    # ------------------------------------------------------------------ routines

    def worker(self, serial: str) -> DeviceWorker:
        try:
            return self.workers[serial]
        except KeyError:
            raise ServiceError("not supervised by this bridge", device=serial) from None

    async def start_routine(
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
        :class:`~devicebridge.errors.RoutineRefusedError`, recorded and published.
        """
        worker = self.worker(serial)
        if routine.device_kind.value != worker.kind:
            raise ServiceError(
                f"routine {routine.name!r} is for a {routine.device_kind.value}, "
                f"this is a {worker.kind}",
                device=serial,
            )
        runner = await worker.start_routine(
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

    async def start_program(
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
        return await self.start_routine(
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
        """Install every valid program for this device kind not yet on this device (none on
        a device that cannot hold programs: it runs them from the host)."""
        if not worker.holds_programs:
            return
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
        devices_by_kind: dict[str, list[str]] = {}  # those a program can be installed on
        for worker in self.workers.values():
            if worker.holds_programs:
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
