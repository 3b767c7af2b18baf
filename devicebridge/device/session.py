"""A live session with one device, over any :class:`~devicebridge.device.transport.base.Transport`.

The session owns the connection state machine (:mod:`devicebridge.core.states`),
matches command acknowledgements to commands by a 16-bit command id, and turns
the telemetry notifications into an ordered stream in which every sample
arrives exactly once (:mod:`devicebridge.core.reassembly`): when the link drops
it reconnects by itself with exponential backoff and jitter, restarts the
stream, and asks the device to resend what was missed.

Transports call the session back with plain functions on the event loop, so
messages are handled in arrival order without a task per message.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from mypy_extensions import mypyc_attr

from devicebridge.clock import Clock, wait_for
from devicebridge.core.backoff import Backoff, BackoffPolicy
from devicebridge.core.faults_detect import ClockDriftEstimator, RestartDetector
from devicebridge.core.reassembly import (
    GapReason,
    TelemetryGap,
    TelemetryItem,
    TelemetryReassembler,
)
from devicebridge.core.sequencing import SEQUENCE_MODULUS, SequenceRange
from devicebridge.core.states import LINK_UP_STATES, ConnectionState, ConnectionStateMachine
from devicebridge.device.transport.base import TRANSPORT_COMMAND_ID, DeviceInfo, Transport
from devicebridge.errors import (
    CommandRejectedError,
    CommandTimeoutError,
    ConnectionLostError,
    DeviceBridgeError,
    DeviceNotFoundError,
    NotConnectedError,
    SessionClosedError,
)
from protocols import (
    Ack,
    BackfillReply,
    BootEvent,
    Command,
    CommandBody,
    DeviceKind,
    Event,
    EventCode,
    FrameError,
    MassageMode,
    ProtocolError,
    RequestBackfill,
    ResultCode,
    SetIntensity,
    SetMode,
    SetZone,
    ShutdownEvent,
    StartLed,
    StartStream,
    StopAll,
    StopLed,
    TelemetryBatch,
    Zone,
    decode_message,
)

_LOGGER = logging.getLogger(__name__)

DEFAULT_COMMAND_TIMEOUT_S: Final = 2.0
DEFAULT_FIND_TIMEOUT_S: Final = 10.0
# Without progress for this long (device time), a backfill is asked again (a device
# resends batches every few ms, so a second of silence means something was lost).
DEFAULT_BACKFILL_STALL_S: Final = 1.0
MAX_BACKFILL_REQUEST_SAMPLES: Final = 0xFFFF_FFFF
# A stalled backfill is asked again this many times before what is left becomes a gap.
MAX_BACKFILL_RETRIES: Final = 3
# The clock drift estimate takes one live batch in this many (its arrival time and sequence
# end): a least-squares slope over at least 20 s needs no more, and every batch paid a
# clock read and the estimate's arithmetic for it.
DRIFT_BATCH_STRIDE: Final = 8
_FIRST_COMMAND_ID: Final = 1
_LAST_COMMAND_ID: Final = TRANSPORT_COMMAND_ID - 1  # that id is the transport's own

S = ConnectionState
T = TypeVar("T")


# A plain Python class in the compiled build too: QA workers send it to the parent process
# by pickle, and a compiled frozen dataclass cannot be unpickled.
@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class SessionStats:
    """Counters of one session (a snapshot; read ``session.stats`` again for fresh ones)."""

    frames_ok: int = 0  # messages decoded
    malformed: int = 0  # frames or messages that could not be decoded (skipped)
    unexpected: int = 0  # decodable messages the host does not expect (ignored)
    gaps: int = 0  # sequence gaps detected in the live stream
    gap_records: int = 0  # TelemetryGap items emitted (samples lost for good)
    lost_samples: int = 0
    backfilled_samples: int = 0
    duplicates: int = 0
    samples_delivered: int = 0
    reconnects: int = 0
    command_timeouts: int = 0
    device_restarts: int = 0  # reboots, brown-outs and shutdowns seen (telemetry restarted)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Ack]
    body: CommandBody
    # Runs synchronously when the ack arrives, before any later message is handled
    # (the backfill reply must be known before the backfilled samples arrive).
    on_ack: Callable[[Ack], None] | None = None


class _End:
    """Marks the end of a subscription."""


_END: Final = _End()


class Subscription(Generic[T]):
    """An async iterator over a session's items, registered when it is created.

    Creating it before :meth:`DeviceSession.start` sees everything from the
    first message. It ends when the session closes; :meth:`aclose` stops it
    earlier.
    """

    def __init__(self, registry: list[Subscription[T]]) -> None:
        self._registry = registry
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue()
        registry.append(self)

    def _put(self, item: T | _End) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # stay ended for further calls
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        if self in self._registry:
            self._registry.remove(self)
        self._put(_END)

    def pending(self) -> int:
        """Items queued and not yet consumed."""
        return self._queue.qsize()


class DeviceSession:
    """One device: commands, telemetry, events, and automatic reconnection."""

    def __init__(
        self,
        transport: Transport,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        backoff_policy: BackoffPolicy | None = None,
        command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S,
        find_timeout_s: float = DEFAULT_FIND_TIMEOUT_S,
        backfill_stall_s: float = DEFAULT_BACKFILL_STALL_S,
        auto_reconnect: bool = True,
        stream_telemetry: bool = True,
        name: str | None = None,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.name = name or transport.description
        self._command_timeout_s = command_timeout_s
        self._find_timeout_s = find_timeout_s
        self._backfill_stall_s = backfill_stall_s
        self._auto_reconnect = auto_reconnect
        self._stream_telemetry = stream_telemetry
        self._machine = ConnectionStateMachine()
        self._machine.add_listener(self._on_state_change)
        self._state_observers: list[Callable[[ConnectionState, ConnectionState], None]] = []
        self._backoff = Backoff(backoff_policy or BackoffPolicy(), rng or random.Random())
        self._reassembler = TelemetryReassembler()
        self._pending: dict[int, _Pending] = {}
        self._next_command_id = _FIRST_COMMAND_ID
        self._telemetry_subs: list[Subscription[TelemetryItem]] = []
        self._telemetry_observers: list[Callable[[TelemetryItem], None]] = []
        self._event_subs: list[Subscription[Event]] = []
        self._ready = asyncio.Event()
        self._closed = asyncio.Event()
        self._started = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._backfill_task: asyncio.Task[None] | None = None
        self._backfill_progress = asyncio.Event()
        self._backfill_stalls = 0  # consecutive stalls of the active backfill
        self._device_info: DeviceInfo | None = None
        self.last_batch: TelemetryBatch | None = None
        self._counts = dict.fromkeys(SessionStats.__dataclass_fields__, 0)
        self._restarts = RestartDetector()
        self._restart_seen_on_link = False  # a restart was handled since the link came up
        self._drift: ClockDriftEstimator | None = None
        self._drift_reported = False
        self._drift_countdown = 1  # live batches until the next one the estimate takes

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> ConnectionState:
        return self._machine.state

    @property
    def state_history(self) -> list[ConnectionState]:
        return list(self._machine.history)

    @property
    def device_info(self) -> DeviceInfo:
        if self._device_info is None:
            raise NotConnectedError("device info not read yet", device=self.name)
        return self._device_info

    @property
    def battery_percent(self) -> int | None:
        """From the latest telemetry sample, else from the Battery Service read at connect."""
        if self.last_batch is not None and len(self.last_batch):
            return int(self.last_batch.samples["battery_percent"][-1])
        return self._device_info.battery_percent if self._device_info else None

    @property
    def live_sequence_end(self) -> int | None:
        """The sequence number after the newest live sample received (None before one)."""
        return self._reassembler.next_live_sequence

    @property
    def reconnects(self) -> int:
        """How often the link came back (``stats.reconnects`` without the snapshot)."""
        return self._counts["reconnects"]

    @property
    def stats(self) -> SessionStats:
        counters = self._reassembler.counters
        return SessionStats(
            frames_ok=self._counts["frames_ok"],
            malformed=self._counts["malformed"],
            unexpected=self._counts["unexpected"],
            gaps=counters.gaps_detected,
            gap_records=counters.gap_records,
            lost_samples=counters.lost_samples,
            backfilled_samples=counters.backfilled_samples,
            duplicates=counters.duplicates_dropped,
            samples_delivered=counters.delivered_samples,
            reconnects=self._counts["reconnects"],
            command_timeouts=self._counts["command_timeouts"],
            device_restarts=counters.device_restarts,
        )

    @property
    def clock_drift_ppm(self) -> float | None:
        """How much faster (+) the device's sample clock runs than this session's clock."""
        return self._drift.drift_ppm if self._drift is not None else None

    def telemetry(self) -> Subscription[TelemetryItem]:
        """Telemetry batches and gap records in sequence order (``async for``)."""
        return Subscription(self._telemetry_subs)

    def observe_telemetry(self, observer: Callable[[TelemetryItem], None]) -> Callable[[], None]:
        """Call ``observer`` synchronously with every telemetry item; returns the remover.

        Observers see exactly what subscriptions see (batches and gap records, each once,
        in sequence order), but at once, inside the transport's receive callback and before
        any subscription queues the item: a safety check there does not wait behind the
        tasks of other devices. Keep observers short and non-blocking; an exception is
        logged and does not stop delivery.
        """
        self._telemetry_observers.append(observer)

        def remove() -> None:
            if observer in self._telemetry_observers:
                self._telemetry_observers.remove(observer)

        return remove

    def events(self) -> Subscription[Event]:
        return Subscription(self._event_subs)

    def observe_state(
        self, observer: Callable[[ConnectionState, ConnectionState], None]
    ) -> Callable[[], None]:
        """Call ``observer(old, new)`` at every connection state change; returns the remover.

        For a caller that must act on a link loss at once (a routine timed by the host's
        clock has no telemetry that would stop arriving)."""
        self._state_observers.append(observer)

        def remove() -> None:
            if observer in self._state_observers:
                self._state_observers.remove(observer)

        return remove

    async def wait_closed(self) -> None:
        """Return once the session is closed (its subscriptions have ended)."""
        await self._closed.wait()

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once the session is READY (again); timeout on the session's clock."""
        if self.state is S.CLOSED:
            raise SessionClosedError(f"{self.name}: session closed")
        try:
            await wait_for(self.clock, self._ready.wait(), timeout_s)
        except TimeoutError:
            raise DeviceNotFoundError(self.name, timeout_s=timeout_s, where="not ready") from None

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> DeviceSession:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def resume_after(self, last_sequence: int) -> None:
        """Before :meth:`start`: an earlier host already has the samples up to
        ``last_sequence`` (a bridge that stopped mid-session); what the device still holds
        after it comes first, backfilled, then the live stream. A device that restarted
        meanwhile no longer holds them (its restart is reported as usual)."""
        if self._started:
            raise RuntimeError("resume_after() only before start()")
        self._reassembler.expect(last_sequence + 1)

    async def start(self) -> None:
        """Connect, read the device info, start the stream; raises if the first connect fails."""
        if self.state is S.CLOSED:
            raise SessionClosedError(f"{self.name}: session closed")
        self.transport.set_receivers(self._on_message, self._on_link_lost, self._on_malformed)
        self._machine.transition(S.CONNECTING)
        try:
            await self.transport.connect()
            await self._initialize()
        except BaseException:
            # close() may have run meanwhile (a different expression from the
            # check above on purpose: mypy would keep the narrowed type across awaits).
            if self._machine.state is not S.CLOSED:
                await self._disconnect_quietly()
                self._machine.transition(S.DISCONNECTED)
            raise
        self._started = True

    async def close(self) -> None:
        """Stop reconnecting, disconnect, and end every subscription. Idempotent."""
        if self.state is S.CLOSED:
            return
        self._machine.transition(S.CLOSED)
        for task in (self._reconnect_task, self._backfill_task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail_pending(SessionClosedError(f"{self.name}: session closed"))
        await self._disconnect_quietly()
        for telemetry in self._telemetry_subs:
            telemetry._put(_END)
        for events in self._event_subs:
            events._put(_END)
        self._telemetry_subs.clear()
        self._telemetry_observers.clear()
        self._event_subs.clear()
        self._closed.set()

    async def _disconnect_quietly(self) -> None:
        try:
            await self.transport.disconnect()
        except DeviceBridgeError as exc:
            _LOGGER.debug("%s: disconnect: %s", self.name, exc)

    async def _initialize(self) -> None:
        self._machine.transition(S.INITIALIZING)
        info = await self.transport.read_device_info()
        self._device_info = info
        self._reassembler.set_sample_rate(info.profile.sample_rate_hz)
        self._restarts.set_sample_rate(info.profile.sample_rate_hz)
        if self._drift is None:
            self._drift = ClockDriftEstimator(info.profile.sample_rate_hz)
        if self._stream_telemetry:
            await self._command(StartStream())
        self._machine.transition(S.READY)
        self._backoff.on_connected(self.clock.now_s())
        self._kick_backfill()

    def _on_state_change(self, old: ConnectionState, new: ConnectionState) -> None:
        _LOGGER.debug("%s: %s -> %s", self.name, old.name, new.name)
        if new is S.READY:
            self._ready.set()
        else:
            self._ready.clear()
        for observer in tuple(self._state_observers):
            try:
                observer(old, new)
            except Exception:  # one broken observer must not break the state machine
                _LOGGER.exception("%s: state observer failed", self.name)

    # ------------------------------------------------------------------ link loss

    def _on_link_lost(self) -> None:
        if self.state not in LINK_UP_STATES:
            return  # a connect in progress reports its own failure
        self._machine.transition(S.RECONNECT_WAIT)
        self._backoff.on_link_lost(self.clock.now_s())
        self._fail_pending(ConnectionLostError("link lost", device=self.name))
        self._reassembler.on_link_reset()
        self._restarts.on_link_reset()
        self._restart_seen_on_link = False
        if self._backfill_task is not None:
            self._backfill_task.cancel()
            self._backfill_task = None
        reconnecting = self._reconnect_task is not None and not self._reconnect_task.done()
        if not self._started:
            return  # start() is still running and reports the failure itself
        if not self._auto_reconnect:
            self._machine.transition(S.DISCONNECTED)
        elif not reconnecting:
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect_loop(), name=f"reconnect {self.name}"
            )

    async def _reconnect_loop(self) -> None:
        while self.state is not S.CLOSED:
            delay_s = self._backoff.next_delay_s()
            _LOGGER.info("%s: reconnecting in %.2f s", self.name, delay_s)
            await self.clock.sleep(delay_s)
            self._machine.transition(S.WAITING_FOR_DEVICE)
            try:
                await self.transport.wait_for_device(self._find_timeout_s)
            except DeviceBridgeError as exc:
                _LOGGER.info("%s: %s", self.name, exc)
                self._machine.transition(S.RECONNECT_WAIT)
                continue
            self._machine.transition(S.CONNECTING)
            try:
                await self.transport.connect()
                await self._initialize()
            except DeviceBridgeError as exc:
                _LOGGER.info("%s: reconnect failed: %s", self.name, exc)
                await self._disconnect_quietly()
                if self.state is not S.RECONNECT_WAIT:
                    self._machine.transition(S.RECONNECT_WAIT)
                continue
            self._counts["reconnects"] += 1
            _LOGGER.info("%s: reconnected", self.name)
            return

    # ------------------------------------------------------------------ commands

    def _allocate_command_id(self) -> int:
        for _ in range(_LAST_COMMAND_ID):
            command_id = self._next_command_id
            self._next_command_id += 1
            if self._next_command_id > _LAST_COMMAND_ID:
                self._next_command_id = _FIRST_COMMAND_ID
            if command_id not in self._pending:
                return command_id
        raise RuntimeError("every command id is in use")

    async def send(self, body: CommandBody, *, timeout_s: float | None = None) -> Ack:
        """Send a command and wait for its acknowledgement.

        Raises :class:`CommandTimeoutError` after ``timeout_s`` (clock time),
        :class:`CommandRejectedError` for a non-OK result, and
        :class:`NotConnectedError` / :class:`ConnectionLostError` without a link.
        """
        if self.state is S.CLOSED:
            raise SessionClosedError(f"{self.name}: session closed")
        if self.state not in LINK_UP_STATES:
            raise NotConnectedError(f"not connected ({self.state.value})", device=self.name)
        return await self._command(body, timeout_s=timeout_s)

    def send_soon(self, body: CommandBody, *, timeout_s: float | None = None) -> asyncio.Task[Ack]:
        """Start a command from synchronous code (a telemetry observer); returns its task.

        On a transport with ``write_control_nowait`` (serial) the command is written before
        this returns; otherwise (bleak writes are coroutines) the task starts the write in
        the next loop iteration. The task gives the ack or raises like :meth:`send`.
        """
        if self.state is S.CLOSED:
            raise SessionClosedError(f"{self.name}: session closed")
        if self.state not in LINK_UP_STATES:
            raise NotConnectedError(f"not connected ({self.state.value})", device=self.name)
        loop = asyncio.get_running_loop()
        name = f"{body.opcode.name} {self.name}"
        write_now: Callable[[bytes], None] | None = getattr(
            self.transport, "write_control_nowait", None
        )
        if write_now is None:
            return loop.create_task(self._command(body, timeout_s=timeout_s), name=name)
        timeout_s = self._command_timeout_s if timeout_s is None else timeout_s
        command_id = self._allocate_command_id()
        entry = _Pending(loop.create_future(), body)
        self._pending[command_id] = entry
        try:
            write_now(Command.of(command_id, body).encode())
        except BaseException:
            self._forget_pending(command_id, entry)
            raise
        task = loop.create_task(self._await_ack(command_id, entry, timeout_s), name=name)
        # Also when the task is cancelled before it ever ran.
        task.add_done_callback(lambda _: self._forget_pending(command_id, entry))
        return task

    def _forget_pending(self, command_id: int, entry: _Pending) -> None:
        if self._pending.get(command_id) is entry:
            del self._pending[command_id]
        if not entry.future.done():
            entry.future.cancel()

    async def _await_ack(self, command_id: int, entry: _Pending, timeout_s: float) -> Ack:
        try:
            ack = await wait_for(self.clock, asyncio.shield(entry.future), timeout_s)
        except TimeoutError:
            self._counts["command_timeouts"] += 1
            raise CommandTimeoutError(
                command_id=command_id,
                opcode=entry.body.opcode,
                timeout_s=timeout_s,
                device=self.name,
            ) from None
        if ack.result is not ResultCode.OK:
            raise CommandRejectedError(
                command_id=command_id,
                opcode=ack.opcode,
                result=ack.result,
                device=self.name,
                payload=ack.payload,
            )
        return ack

    async def _command(
        self,
        body: CommandBody,
        *,
        timeout_s: float | None = None,
        on_ack: Callable[[Ack], None] | None = None,
        accept: frozenset[ResultCode] = frozenset({ResultCode.OK}),
    ) -> Ack:
        timeout_s = self._command_timeout_s if timeout_s is None else timeout_s
        command_id = self._allocate_command_id()
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = _Pending(future, body, on_ack)
        try:
            await self.transport.write_control(Command.of(command_id, body).encode())
            ack = await wait_for(self.clock, asyncio.shield(future), timeout_s)
        except TimeoutError:
            self._counts["command_timeouts"] += 1
            raise CommandTimeoutError(
                command_id=command_id, opcode=body.opcode, timeout_s=timeout_s, device=self.name
            ) from None
        finally:
            self._pending.pop(command_id, None)
            if not future.done():
                future.cancel()
        if ack.result not in accept:
            raise CommandRejectedError(
                command_id=command_id,
                opcode=ack.opcode,
                result=ack.result,
                device=self.name,
                payload=ack.payload,
            )
        return ack

    def _fail_pending(self, error: DeviceBridgeError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)
                # Mark it retrieved: a waiter that already timed out never will.
                entry.future.exception()

    async def stop_all(self) -> None:
        """Safety stop: every actuator off. Devices always accept it."""
        await self.send(StopAll())

    # ------------------------------------------------------------------ receive

    def _on_malformed(self, error: FrameError) -> None:
        self._counts["malformed"] += 1
        _LOGGER.warning("%s: malformed frame skipped: %s", self.name, error)

    def _on_message(self, data: bytes) -> None:
        if self._machine.state is S.CLOSED:
            return
        try:
            message = decode_message(data)
        except ProtocolError as exc:
            self._counts["malformed"] += 1
            _LOGGER.warning("%s: malformed message skipped: %s", self.name, exc)
            return
        self._counts["frames_ok"] += 1
        if isinstance(message, TelemetryBatch):
            self._on_batch(message)
        elif isinstance(message, Ack):
            self._on_ack(message)
        elif isinstance(message, Event):
            restart = _RESTART_EVENTS.get(message.code)
            if restart is not None:
                self._on_restart_event(restart, message)
            for events in self._event_subs:
                events._put(message)
        else:
            self._counts["unexpected"] += 1
            _LOGGER.debug("%s: ignored unexpected %s", self.name, type(message).__name__)

    def _on_ack(self, ack: Ack) -> None:
        pending = self._pending.pop(ack.command_id, None)
        if pending is None or pending.future.done():
            self._counts["unexpected"] += 1
            _LOGGER.debug("%s: ack for no pending command: %s", self.name, ack)
            return
        if pending.on_ack is not None:
            pending.on_ack(ack)
        pending.future.set_result(ack)

    def _on_batch(self, batch: TelemetryBatch) -> None:
        reassembler = self._reassembler
        if batch.backfill:
            items = reassembler.on_backfill(batch)
            self._backfill_progress.set()
        else:
            if self._restarts.restarted(batch.first_sequence, reassembler.next_live_sequence):
                self._on_device_restart(GapReason.DEVICE_REBOOTED)
            self.last_batch = batch
            items = reassembler.on_live(batch)
            self._drift_countdown -= 1
            if self._drift_countdown <= 0:  # the estimate takes every DRIFT_BATCH_STRIDE-th
                self._track_drift()
        self._deliver(items)
        if reassembler.queue:  # nothing held back: nothing missing to ask for
            self._kick_backfill()

    def _on_restart_event(self, reason: GapReason, event: Event) -> None:
        if self._reassembler.next_live_sequence is None:
            return  # nothing received yet: the stream starts with what comes next
        if event.code == EventCode.BOOT and self._restart_seen_on_link:
            return  # the BOOT of the restart the counter already showed on this link
        self._on_device_restart(reason, _sequence_end(event, self.name))

    def _on_device_restart(self, reason: GapReason, sequence_end: int | None = None) -> None:
        """The device rebooted or shut down: what it held is gone, its counter restarts."""
        counters = self._reassembler.counters
        restarts = counters.device_restarts
        items = self._reassembler.on_device_restart(reason, sequence_end=sequence_end)
        self._restart_seen_on_link = True
        if counters.device_restarts != restarts:  # not the BOOT of a shutdown seen before
            _LOGGER.warning("%s: %s", self.name, reason.value.replace("_", " "))
            if self._backfill_task is not None:
                self._backfill_task.cancel()
                self._backfill_task = None
            info = self._device_info
            self._drift = ClockDriftEstimator(info.profile.sample_rate_hz) if info else None
        self._deliver(items)

    def _track_drift(self) -> None:
        """Feed the drift estimate (on every DRIFT_BATCH_STRIDE-th live batch)."""
        self._drift_countdown = DRIFT_BATCH_STRIDE
        drift = self._drift
        end = self._reassembler.next_live_sequence
        if drift is None or end is None:
            return
        drift.feed(self.clock.now_s(), end)
        # ``significant`` only reads the estimate: not asked once the drift is reported.
        if not self._drift_reported and drift.significant:
            self._drift_reported = True
            _LOGGER.warning(
                "%s: the device clock runs %+.1f %% off this host's: device-timed steps "
                "are off by as much",
                self.name,
                (drift.drift_ppm or 0.0) / 1e4,
            )

    def _deliver(self, items: list[TelemetryItem]) -> None:
        # Both lists are only ever changed in place: the same lists all through.
        observers, subs = self._telemetry_observers, self._telemetry_subs
        for item in items:
            if isinstance(item, TelemetryGap):
                _LOGGER.warning(
                    "%s: samples %d..%d lost (%s)",
                    self.name,
                    item.first_sequence,
                    item.end_sequence - 1,
                    item.reason.value,
                )
            for observer in tuple(observers):
                try:
                    observer(item)
                except Exception:  # one broken observer must not starve the others
                    _LOGGER.exception("%s: telemetry observer failed", self.name)
            for sub in subs:
                sub._put(item)

    # ------------------------------------------------------------------ backfill

    def _kick_backfill(self) -> None:
        if self._machine.state is not S.READY:
            return
        task = self._backfill_task
        if task is not None and not task.done():
            return
        request = self._reassembler.next_request()
        if request is None:
            return
        self._backfill_task = asyncio.get_running_loop().create_task(
            self._run_backfill(request), name=f"backfill {self.name}"
        )

    def _on_backfill_ack(self, ack: Ack) -> None:
        if ack.result not in (ResultCode.OK, ResultCode.DATA_UNAVAILABLE):
            return  # _run_backfill gives the range up
        try:
            reply = BackfillReply.decode(ack.payload)
        except ProtocolError as exc:
            _LOGGER.warning("%s: unreadable backfill reply: %s", self.name, exc)
            self._deliver(self._reassembler.abandon_active(GapReason.BACKFILL_FAILED))
            return
        self._deliver(
            self._reassembler.on_backfill_reply(
                reply.first_sequence, reply.sample_count, available=ack.ok
            )
        )

    async def _run_backfill(self, request: SequenceRange) -> None:
        _LOGGER.info(
            "%s: requesting backfill of samples %d..%d", self.name, request.first, request.end - 1
        )
        body = RequestBackfill(
            request.first % SEQUENCE_MODULUS, min(request.count, MAX_BACKFILL_REQUEST_SAMPLES)
        )
        try:
            await self._command(
                body,
                on_ack=self._on_backfill_ack,
                accept=frozenset({ResultCode.OK, ResultCode.DATA_UNAVAILABLE}),
            )
            # Wait for the samples while they keep coming.
            while self._reassembler.awaiting_backfill:
                self._backfill_progress.clear()
                try:
                    await wait_for(
                        self.clock, self._backfill_progress.wait(), self._backfill_stall_s
                    )
                    self._backfill_stalls = 0  # samples arrived: the link carries them again
                except TimeoutError:
                    self._backfill_stalls += 1
                    if self._backfill_stalls <= MAX_BACKFILL_RETRIES:
                        # Part of the answer was lost on the way: ask again for the rest.
                        _LOGGER.warning(
                            "%s: backfill stalled; asking again (%d/%d)",
                            self.name,
                            self._backfill_stalls,
                            MAX_BACKFILL_RETRIES,
                        )
                        self._reassembler.retry_active()
                        break
                    _LOGGER.warning("%s: backfill stalled; giving the rest up", self.name)
                    self._deliver(self._reassembler.abandon_active(GapReason.BACKFILL_FAILED))
                    self._backfill_stalls = 0
        except (CommandRejectedError, CommandTimeoutError) as exc:
            _LOGGER.warning("%s: backfill failed: %s", self.name, exc)
            if self.state is S.READY:
                self._deliver(self._reassembler.abandon_active(GapReason.BACKFILL_FAILED))
        except (ConnectionLostError, NotConnectedError, SessionClosedError):
            return  # after a reconnect the rest is requested again
        self._backfill_task = None
        self._kick_backfill()


_RESTART_EVENTS: Final[dict[int, GapReason]] = {
    EventCode.BOOT: GapReason.DEVICE_REBOOTED,
    EventCode.SHUTDOWN: GapReason.DEVICE_SHUT_DOWN,
}


def _sequence_end(event: Event, name: str) -> int | None:
    """How many samples the (old) boot took, from a BOOT or SHUTDOWN payload, if given."""
    try:
        if event.code == EventCode.BOOT:
            return BootEvent.decode(event.payload).previous_sequence_end
        return ShutdownEvent.decode(event.payload).sequence_end
    except ProtocolError as exc:
        _LOGGER.warning("%s: unreadable %s payload: %s", name, EventCode(event.code).name, exc)
        return None


class MassagerSession(DeviceSession):
    """A handheld facial massager."""

    async def set_intensity(self, level: int) -> None:
        await self.send(SetIntensity(level))

    async def set_mode(self, mode: MassageMode) -> None:
        await self.send(SetMode(mode))

    async def set_zone(self, zone: Zone) -> None:
        await self.send(SetZone(zone))


class MaskSession(DeviceSession):
    """An LED face mask."""

    async def start_led(
        self,
        red_mw_cm2: float,
        near_infrared_mw_cm2: float,
        blue_mw_cm2: float,
        duration_s: int,
        pulse_hz: float = 0.0,
    ) -> None:
        await self.send(
            StartLed(red_mw_cm2, near_infrared_mw_cm2, blue_mw_cm2, duration_s, pulse_hz)
        )

    async def stop_led(self) -> None:
        await self.send(StopLed())


def session_class_for(kind: DeviceKind | int | None) -> type[DeviceSession]:
    if kind == DeviceKind.MASSAGER:
        return MassagerSession
    if kind == DeviceKind.LED_MASK:
        return MaskSession
    return DeviceSession
