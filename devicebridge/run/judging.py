"""The safety path of a run: every telemetry item judged where the session receives it.

:class:`TelemetryJudge` is the part of :class:`~devicebridge.run.runner.RoutineRunner` that
every telemetry batch of a run passes through, inside the transport's receive callback (the
session's telemetry observer): the engine first, a safety stop started before the observer
returns, then the batch recorded (counted, handed to the store writer, the live view marked
stale). What it cannot do itself, it asks of the runner through the callables it is given:
start STOP_ALL, take the engine's decisions (commands, store, listeners), tell the device
its whole state again after a reconnect.

It is its own class, with no coroutines, so that the compiled build compiles it with the
pure cores (``[tool.devicebridge.compile]`` in pyproject.toml): with a routine on each of
a hundred devices its per-batch layers were as much of the bridge's cost as the engine
(``python -m bench service``). The runner's coroutines stay Python (see pyproject.toml).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from devicebridge.core.actuation import SAFETY_KINDS
from devicebridge.core.engine import Decision, LedEngine, MassageEngine
from devicebridge.core.reassembly import GapReason, TelemetryGap, TelemetryItem
from devicebridge.core.timed import TimedMassageEngine
from devicebridge.device.session import DeviceSession
from devicebridge.storage.writer import StoreWriter
from protocols import SampleFormat, TelemetryBatch


def _run_released(*_: object) -> None:
    raise RuntimeError("a released TelemetryJudge was asked to act: its run is over")


class TelemetryJudge:
    """Judges and records the telemetry of one run on ``session``.

    Batches of ``sample_format`` go to the engine given to :meth:`engine_started` (none to
    one that runs by time: it is timed by the host's clock) and then to the store writer
    given to :meth:`record_to`; gap records are counted. Until :meth:`arm`, what arrives
    while :attr:`observing` waits in order. The callables: ``safety_stop`` starts STOP_ALL
    (called before the batch is recorded); ``handle`` takes decisions (never empty);
    ``after_reconnect`` runs on the first batch after the link came back; ``on_end`` once,
    when the run ends (:meth:`end`); ``publish``, when given, after every batch (a live
    view that wants every change).
    """

    def __init__(
        self,
        session: DeviceSession,
        sample_format: SampleFormat,
        *,
        safety_stop: Callable[[], None],
        handle: Callable[[Sequence[Decision]], None],
        after_reconnect: Callable[[], None],
        on_end: Callable[[], None],
        publish: Callable[[], None] | None = None,
    ) -> None:
        self._session = session
        self._sample_format = sample_format
        self._safety_stop = safety_stop
        self._handle = handle
        self._after_reconnect = after_reconnect
        self._on_end = on_end
        self._publish = publish
        self.engine: MassageEngine | LedEngine | TimedMassageEngine | None = None
        # The engine the samples are fed to (``engine`` unless the routine runs by time).
        self._sample_engine: MassageEngine | LedEngine | None = None
        self._writer: StoreWriter | None = None
        self._session_id = 0
        self.gaps = 0
        self.lost_samples = 0
        self.samples_recorded = 0
        self.device_ended: str | None = None  # the device rebooted or shut down mid-routine
        self.last_batch: TelemetryBatch | None = None
        self.reconnects_seen = 0
        # Something the live view shows changed since the runner last built it.
        self.state_stale = False
        self.observing = False  # the run's observer is on: what arrives belongs to it
        self.armed = False  # the engine started: batches are taken as they come
        self._backlog: deque[TelemetryItem] = deque()
        self.ended: str | None = None  # why the run ended: finished, device, error, requested
        self.failure: Exception | None = None  # raised again in the runner's task

    # ------------------------------------------------------------------ set-up

    def engine_started(
        self,
        engine: MassageEngine | LedEngine | TimedMassageEngine,
        sample_engine: MassageEngine | LedEngine | None,
    ) -> None:
        self.engine = engine
        self._sample_engine = sample_engine

    def record_to(self, writer: StoreWriter | None, session_id: int | None) -> None:
        """Batches from now on go to ``writer`` as samples of ``session_id`` (None: not
        stored)."""
        if writer is None or session_id is None:
            self._writer = None
            return
        self._writer, self._session_id = writer, session_id

    def arm(self) -> None:
        """The engine has started: take what came meanwhile, in order, then live."""
        self.armed = True
        while self._backlog:
            self._take(self._backlog.popleft())

    def stop_observing(self) -> None:
        self.observing = self.armed = False
        self._backlog.clear()

    def release(self) -> None:
        """The run is over: stop observing and let go of the runner's callables.

        They are the runner's bound methods, so until then the runner and its judge hold
        each other: a run's runner, engine, decisions and records would wait for the
        collector's older-generation passes, which at a hundred devices ending runs held
        the event loop for 10-20 ms (``python -m bench latency``); let go, they are freed
        as the runner is. A callable called after this is a bug, and says so."""
        self.stop_observing()
        self._safety_stop = self._after_reconnect = _run_released
        self._handle = _run_released
        self._publish = None

    @property
    def judging(self) -> bool:
        return self.armed and self.ended is None

    # ------------------------------------------------------------------ the end

    def end(self, reason: str) -> None:
        """The run ends (the first reason stays)."""
        if self.ended is None:
            self.ended = reason
            self._on_end()

    def fail(self, exc: Exception) -> None:
        """The run ends with ``exc`` (raised again in the runner's task)."""
        self.failure = exc
        self.end("error")

    # ------------------------------------------------------------------ per item

    def observe(self, item: TelemetryItem) -> None:
        """The session's telemetry observer: runs inside the transport's receive callback."""
        if not self.observing:
            return
        if self.armed:
            self._take(item)
        else:
            self._backlog.append(item)

    def _take(self, item: TelemetryItem) -> None:
        """Judge (a safety stop starts at once), then record one item; end the run if due."""
        if self.ended is not None:
            return  # the run is over: nothing after its end belongs to it
        engine = self.engine
        assert engine is not None
        try:
            self.record(item, self.judge(item))
        except Exception as exc:  # raised again in the runner's task, which ends the run
            self.fail(exc)
            return
        if engine.finished:
            self.end("finished")
        elif self.device_ended is not None:
            self.end("device")

    def judge(self, item: TelemetryItem) -> list[Decision]:
        """Engine on one item; a safety decision starts STOP_ALL before this returns."""
        if isinstance(item, TelemetryGap):
            self.gaps += 1
            self.lost_samples += item.sample_count
            if item.reason is GapReason.DEVICE_REBOOTED:
                self.device_ended = "device rebooted"
            elif item.reason is GapReason.DEVICE_SHUT_DOWN:
                self.device_ended = "device shut down"
            return []
        if item.sample_format is not self._sample_format:
            return []
        engine = self._sample_engine
        if engine is None:
            return []  # recorded, but a routine by time is timed by the host's clock
        decisions = engine.feed(item.samples, item.first_sequence)
        if decisions:  # most batches decide nothing
            self.stop_if_unsafe(decisions)
        return decisions

    def stop_if_unsafe(self, decisions: Sequence[Decision]) -> None:
        """Safety first: STOP_ALL starts now if any decision is a safety stop (the one place
        that says so, for decisions from telemetry and from time alike)."""
        for decision in decisions:
            if decision.kind in SAFETY_KINDS:
                self._safety_stop()
                return

    def record(self, item: TelemetryItem, decisions: list[Decision]) -> None:
        """The rest of one judged item: store, reconnect handling, decisions, live view."""
        if isinstance(item, TelemetryGap):
            return
        if item.sample_format is not self._sample_format:
            return
        self.last_batch = item
        samples = item.samples
        self.samples_recorded += len(samples)
        writer = self._writer
        if writer is not None:
            writer.add_samples(self._session_id, item.first_sequence, samples)
        reconnects = self._session.reconnects
        if reconnects != self.reconnects_seen:
            self.reconnects_seen = reconnects
            self._after_reconnect()
        if decisions:
            self._handle(decisions)  # the live view is marked there too
        elif self.engine is not None:
            self.state_stale = True
            if self._publish is not None:
                self._publish()
