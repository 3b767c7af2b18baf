"""The safety path: telemetry observers, STOP_ALL started from one, the grouped store writer."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from devicebridge.core.actuation import SAFETY_KINDS
from devicebridge.core.engine import MassageEngine
from devicebridge.core.faults_detect import FaultChecks
from devicebridge.core.policy import SafetyPolicy
from devicebridge.core.reassembly import TelemetryItem
from devicebridge.device.session import MassagerSession
from devicebridge.device.transport.serial import SerialTransport
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.storage.sessions import SessionStore
from devicebridge.storage.writer import StoreWriter
from protocols import Command, Opcode, SampleFormat, StopAll, TelemetryBatch, Zone
from protocols.telemetry import MASSAGER_SAMPLE_DTYPE
from simulators import HandScript, HandSegment, SimulatedWorld, VirtualClock
from simulators.links.serial_port import PtySerialPort

from .conftest import WriteLog, connect, massage_routine, massage_step, routine_from, runner_for

HAND = HandScript(
    [
        HandSegment(1.005, 1.0, Zone.CHEEK_LEFT, 7.0),
        HandSegment(2.005, 0.3, Zone.CHEEK_LEFT, 20.0),  # above the 15 kPa cheek cap
        HandSegment(2.305, 1.0, Zone.CHEEK_LEFT, 7.0),
        HandSegment(3.305, 0.3, Zone.CHEEK_LEFT, 20.0),
        HandSegment(3.605, 4.0, Zone.CHEEK_LEFT, 7.0),
    ]
)


async def test_observers_see_every_item_once_in_order_before_subscriptions(
    world: SimulatedWorld, clock: VirtualClock
) -> None:
    massager = world.add_massager(hand=HAND)
    async with world:
        clock.start()
        session = await connect(world, massager)
        subscription = session.telemetry()
        observed: list[tuple[TelemetryItem, int]] = []
        enough = asyncio.Event()

        def observe(item: TelemetryItem) -> None:
            observed.append((item, subscription.pending()))
            if len(observed) >= 30:
                enough.set()

        remove = session.observe_telemetry(observe)
        await session.start()
        await asyncio.wait_for(enough.wait(), timeout=30.0)  # hang safety net
        remove()
        count = len(observed)
        await clock.sleep(0.5)  # removed: no more calls
        assert len(observed) == count
        delivered = [await anext(subscription) for _ in range(count)]
        await session.close()
    # The same objects, each once, in sequence order...
    assert [item for item, _ in observed] == delivered
    assert all(a is b for (a, _), b in zip(observed, delivered, strict=True))
    firsts = [item.first_sequence for item, _ in observed]
    assert firsts == sorted(set(firsts))
    # ...and each before the subscription had it (nothing was consumed meanwhile).
    assert [pending for _, pending in observed] == list(range(count))


async def test_runner_decisions_equal_the_queued_path_and_each_safety_stop_writes_stop_all(
    world: SimulatedWorld, clock: VirtualClock, policy: SafetyPolicy, store: SessionStore
) -> None:
    massager = world.add_massager(hand=HAND)
    routine = routine_from(massage_routine(massage_step("cheek_left", 5, 4.0, 12.0)), policy)
    async with world:
        clock.start()
        session = await connect(world, massager)
        log = WriteLog(session, clock)
        # The queued path, next to the runner: the engine fed from a subscription.
        queued = session.telemetry()
        runner = runner_for(session, routine, policy, store, mode=RunMode.HOST)
        result = await runner.run(max_duration_s=60)
        reference = MassageEngine(routine, policy, sample_rate_hz=100.0, fault_checks=FaultChecks())
        expected = reference.start()
        while not reference.finished:
            item = await anext(queued)
            if isinstance(item, TelemetryBatch):
                expected += reference.feed(item.samples, item.first_sequence)
        await session.close()
    assert result.status == "completed", result
    assert list(result.decisions) == expected
    safety = [d for d in result.decisions if d.kind in SAFETY_KINDS]
    assert [d.reason for d in safety] == ["pressure_cap", "pressure_cap"]
    # One STOP_ALL per safety decision, written in the batch that carried the sample,
    # plus the final one.
    stops = log.times_of(Opcode.STOP_ALL)
    assert runner.stop_all_writes == len(stops) == len(safety) + 1
    for decision, stop_s in zip(safety, stops, strict=False):
        assert decision.sequence is not None
        assert 0 <= stop_s - decision.sequence / 100 <= 0.1 + 1e-9
    # Everything stored before run() returned, in order.
    stored = store.decisions(result.session_id or 0)
    assert [(d.kind, d.sequence) for d in stored] == [
        (str(d.kind), d.sequence) for d in result.decisions
    ]
    sequences, _ = store.telemetry(result.session_id or 0)
    assert sequences.tolist() == list(range(int(sequences[0]), int(sequences[-1]) + 1))


class RecordingSerial(SerialTransport):
    """Records each frame handed to the fd, and whether it went out synchronously."""

    def __init__(self, port: str, clock: VirtualClock) -> None:
        super().__init__(port, clock)
        self.nowait: list[int] = []

    def write_control_nowait(self, data: bytes) -> None:
        super().write_control_nowait(data)
        self.nowait.append(Command.decode(data).opcode)


async def test_send_soon_over_serial_writes_the_frame_before_returning() -> None:
    clock = VirtualClock()
    world = SimulatedWorld(seed=5, clock=clock)
    massager = world.add_massager()
    async with world:
        port = PtySerialPort(massager)
        await port.start()
        # The clock stays still: only pty I/O moves, so no command timeout can fire.
        transport = RecordingSerial(port.path, clock)
        session = MassagerSession(transport, clock, name="pty")
        await session.start()
        task = session.send_soon(StopAll())
        assert transport.nowait == [Opcode.STOP_ALL]  # on the line, no task step needed
        ack = await asyncio.wait_for(task, timeout=5.0)  # hang safety net
        assert ack.ok
        assert ack.opcode == Opcode.STOP_ALL
        await session.close()
        await port.stop()


async def test_store_writer_groups_commits_and_commits_a_session_on_demand(
    tmp_path: Path,
) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        ids = [
            store.start_session(
                routine_name="r",
                category="c",
                device_serial=f"S{i}",
                device_kind="massager",
                sample_format=SampleFormat.MASSAGER_V1,
                sample_rate_hz=100,
            )
            for i in range(2)
        ]
        writer = StoreWriter(store, interval_s=3600.0)  # no timer commit in this test
        for first in range(0, 50, 10):
            for session_id in ids:
                samples = np.zeros(10, dtype=store_dtype())
                samples["pressure_dapa"] = np.arange(first, first + 10)
                writer.add_samples(session_id, first, samples)
        assert store.telemetry(ids[0])[0].size == 0  # nothing committed yet
        writer.commit_session(ids[0]).result()
        assert store.telemetry(ids[0])[0].tolist() == list(range(50))
        assert store.telemetry(ids[1])[0].size == 0  # the other run is not this one's
        writer.close()
        # close() hands the rest to the writer's process; its commit becomes visible.
        assert await _poll(lambda: store.telemetry(ids[1])[0].size == 50)


async def test_store_writer_writes_contiguous_batches_as_one_row_and_keeps_gaps(
    tmp_path: Path,
) -> None:
    with SessionStore(tmp_path / "s.sqlite3") as store:
        session_id = store.start_session(
            routine_name="r",
            category="c",
            device_serial="S",
            device_kind="massager",
            sample_format=SampleFormat.MASSAGER_V1,
            sample_rate_hz=100,
        )
        writer = StoreWriter(store, interval_s=3600.0)  # committed by commit_session only
        # 0..30 in three batches, a gap, then 50..70 in two.
        for first in (0, 10, 20, 50, 60):
            samples = np.zeros(10, dtype=store_dtype())
            samples["pressure_dapa"] = np.arange(first, first + 10)
            writer.add_samples(session_id, first, samples)
        writer.commit_session(session_id).result()
        writer.close()
        sequences, samples = store.telemetry(session_id)
        assert sequences.tolist() == [*range(30), *range(50, 70)]
        assert samples["pressure_dapa"].tolist() == sequences.tolist()
        rows = store._db.execute(
            "SELECT first_sequence, sample_count FROM telemetry_chunks ORDER BY first_sequence"
        ).fetchall()
        assert rows == [(0, 30), (50, 20)]


def store_dtype() -> np.dtype[np.void]:
    return MASSAGER_SAMPLE_DTYPE


async def _poll(predicate: Callable[[], bool]) -> bool:
    """A hang safety net around a thread's commit (real time, not a correctness wait)."""
    for _ in range(5000):
        if predicate():
            return True
        await asyncio.sleep(0.001)
    return False


@pytest.mark.parametrize("mode", [RunMode.HOST, RunMode.DEVICE])
async def test_a_finished_run_is_freed_without_the_garbage_collector(
    world: SimulatedWorld,
    clock: VirtualClock,
    policy: SafetyPolicy,
    store: SessionStore,
    mode: RunMode,
) -> None:
    # With a hundred devices ending runs, what a run left in reference cycles waited for
    # the collector's older-generation passes, which held the event loop for 10-20 ms
    # (and every safety stop due meanwhile): a run must be freed as soon as it is dropped.
    massager = world.add_massager(hand=HAND)
    routine = routine_from(massage_routine(massage_step("cheek_left", 5, 4.0, 12.0)), policy)
    async with world:
        clock.start()
        session = await connect(world, massager)
        writer = StoreWriter(store)
        gc.collect()
        gc.disable()
        try:
            runner = RoutineRunner(session, routine, policy, store=store, writer=writer, mode=mode)
            result = await runner.run(max_duration_s=60)
            assert result.status == "completed", result
            assert any(d.kind in SAFETY_KINDS for d in result.decisions)
            # The runner only: the compiled build's engine and judge are mypyc classes,
            # whose instances must not be weakly referenced (their weakrefs are not cleared).
            run_freed = weakref.ref(runner)
            del runner
            assert run_freed() is None, gc.get_referrers(run_freed())
        finally:
            gc.enable()
        writer.close()
        await session.close()
