"""The run-level policy property (tests/routines/policy_properties.py) through ``serve``: the
routine arrives as a program signed by a therapist, the bridge verifies, stores and installs
it, and a client starts it; under any hand the device never exceeds the policy."""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings

from devicebridge.core.routine import Routine
from devicebridge.run.runner import RunMode
from devicebridge.service.supervisor import BridgeService
from devicebridge.storage.lock import try_acquire
from simulators import HandScript, SimulatedWorld, VirtualClock
from tests.routines.policy_properties import (
    RunDecision,
    RunRecord,
    check_routine_text,
    check_run,
    short_policy,
)
from tests.routines.test_policy_properties import runs

from .conftest import BRIDGE, SEED, WAIT_S, Therapist, paired, session_factory

RUN_POLICY = short_policy()


async def run_through_serve(routine: Routine, hand: HandScript, *, mode: RunMode) -> RunRecord:
    """Push ``routine`` as a signed program to a bridge serving a massager held by ``hand``,
    run it from the bridge, and give back what the bridge stored."""
    clock = VirtualClock()
    world = SimulatedWorld(seed=SEED, clock=clock)
    massager = world.add_massager(hand=hand)
    therapist = Therapist()
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(folder)
        therapist.trust_on(data_dir)
        lock = try_acquire(data_dir)
        try:
            async with world:
                service = BridgeService(
                    bridge_id=BRIDGE,
                    data_dir=data_dir,
                    policy=RUN_POLICY,
                    clock=clock,
                    devices=[paired(massager)],
                    session_factory=session_factory(world),
                    rng=random.Random(SEED),
                    run_mode=mode,
                )
                clock.start()
                task = asyncio.create_task(service.run())
                try:
                    async with asyncio.timeout(WAIT_S):
                        await service.wait_started()
                        worker = service.workers[massager.serial_number]
                        while worker.batcher is None:  # noqa: ASYNC110 - virtual time moves
                            await asyncio.sleep(0.005)
                        ack = service.handle_push(therapist.sign(routine.source_text.encode()))
                        assert ack is not None
                        assert ack["status"] == "accepted", ack
                        await service.start_program(worker.serial, int(ack["program_id"]))
                        result = await worker.wait_routine()
                        assert result is not None
                        await clock.sleep(0.5)  # the device's samples after the end, too
                        store = service.sessions
                        sequences, samples = store.telemetry(result.session_id or 0)
                        first = int(sequences[0]) if sequences.size else massager.next_sequence
                        device_first, device_samples = massager.ring.range(
                            first, massager.next_sequence - first
                        )
                        decisions = [
                            RunDecision(d.kind, d.reason, d.step, d.sequence)
                            for d in store.decisions(result.session_id or 0)
                        ]
                        rate = float(store.session(result.session_id or 0).sample_rate_hz)
                finally:
                    service.request_stop()
                    await task
                    await clock.stop()
        finally:
            lock.release()
    return RunRecord(
        result.status,
        result.summary,
        rate,
        sequences,
        samples,
        decisions,
        device_first,
        device_samples,
    )


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(run=runs())
def test_a_signed_program_run_by_serve_never_makes_the_device_exceed_the_policy(
    run: tuple[str, HandScript],
) -> None:
    text, hand = run
    routine = check_routine_text(text, RUN_POLICY)
    assume(routine is not None)
    assert routine is not None

    async def through_serve(routine: Routine, hand: HandScript) -> RunRecord:
        return await run_through_serve(routine, hand, mode=RunMode.AUTO)

    asyncio.run(check_run(through_serve, routine, RUN_POLICY, hand))
