"""Property-based: no routine, however written, loosens the policy.

Arbitrary routine files are refused with the place of each problem or accepted within the
policy; accepted routines are never admitted more often than the policy allows; and run
on a simulated massager under arbitrary hands, through the real RoutineRunner over the
simulator's bleak backend on a virtual clock, they never make the device exceed it. The
properties themselves are in ``policy_properties`` (reusable with another way to run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from devicebridge.app import demo_routines
from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.routine import Routine, Schedule, parse_routine
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.storage.sessions import SessionStore
from simulators import HandScript, SimulatedWorld, VirtualClock

from .conftest import SEED, connect
from .policy_properties import (
    CATEGORIES,
    RunDecision,
    RunRecord,
    check_admissions,
    check_routine_text,
    check_run,
    hand_scripts,
    histories,
    routine_texts,
    runnable_massage_texts,
    short_policy,
    table,
    toml_value,
)

POLICY = default_policy()
RUN_POLICY = short_policy()
NOW = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
STARTERS = {
    entry.name: entry.read_text("utf-8")
    for entry in (resources.files("devicebridge") / "data" / "routines").iterdir()
    if entry.name.endswith(".toml")
}


@settings(max_examples=400, deadline=None)
@given(text=routine_texts())
def test_any_routine_is_refused_with_its_places_or_kept_within_the_policy(text: str) -> None:
    check_routine_text(text, POLICY)


@st.composite
def admissible_routines(draw: st.DrawFn) -> Routine | None:
    """A starter routine under another category and schedule (None when refused)."""
    text = draw(st.sampled_from(sorted(STARTERS.values())))
    category = toml_value(draw(st.sampled_from(CATEGORIES[:-3])))
    text = re.sub(r"^category = .*$", f"category = {category}", text, flags=re.MULTILINE)
    text = re.sub(r"^\[schedule\]\n(?:[^\[\n].*\n)*", "", text, flags=re.MULTILINE)
    if draw(st.booleans()):
        schedule = {"max_sessions": draw(st.integers(1, 4)), "per_days": draw(st.integers(1, 14))}
        text += "\n" + table("[schedule]", schedule)
    return check_routine_text(text, POLICY)


attempt_times = st.lists(
    st.tuples(
        # Hours since the previous attempt: often within the same day or week.
        st.sampled_from([0.0, 0.5, 0.5, 3.0, 12.0, 23.9, 24.0, 30.0, 70.0]) | st.floats(0, 200),
        # How far each admitted run gets: short runs add up (docs/policy.md).
        st.sampled_from([None, 0.0, 0.3, 0.45, 0.45, 0.5, 1.0, 1.0]),
    ),
    min_size=1,
    max_size=16,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    routine=admissible_routines(),
    loose=st.none() | st.builds(Schedule, st.integers(1, 1000), st.integers(1, 3500)),
    data=st.data(),
    attempts=attempt_times,
)
def test_accepted_routines_are_never_admitted_more_often_than_the_policy_allows(
    routine: Routine | None,
    loose: Schedule | None,
    data: st.DataObject,
    attempts: Sequence[tuple[float, float | None]],
) -> None:
    assume(routine is not None)
    assert routine is not None
    if loose is not None:
        # Admission holds the policy's rules whatever the routine object says (a routine
        # from another path, or a checker that let a loose schedule through).
        routine = dataclasses.replace(routine, schedule=loose)
    history = data.draw(histories(routine.category, NOW))
    at_hours, timeline = 0.0, []
    for gap_hours, completion in attempts:
        at_hours += gap_hours
        timeline.append((at_hours, completion))
    check_admissions(routine, POLICY, history, timeline, NOW)


def test_the_starter_and_demo_routines_validate() -> None:
    for name, text in STARTERS.items():
        assert check_routine_text(text, POLICY) is not None, name
    for duration_s in (1.0, 8.0, 60.0, 240.0):
        for text in demo_routines(duration_s):
            routine = parse_routine(text, POLICY, label="demo")
            assert routine.category == "demo"
            assert POLICY.knows_category(routine.category)


# --------------------------------------------------------------------------- runs


async def run_on_simulator(
    routine: Routine, hand: HandScript, *, policy: SafetyPolicy, mode: RunMode
) -> RunRecord:
    """Run ``routine`` on a simulated massager held by ``hand``; the stored record."""
    clock = VirtualClock()
    world = SimulatedWorld(seed=SEED, clock=clock)
    massager = world.add_massager(hand=hand)
    with (
        tempfile.TemporaryDirectory() as folder,
        SessionStore(Path(folder) / "sessions.sqlite3") as store,
    ):
        try:
            async with world:
                clock.start()
                session = await connect(world, massager)
                runner = RoutineRunner(
                    session, routine, policy, store=store, now=lambda: NOW, mode=mode
                )
                result = await runner.run(max_duration_s=policy.massage_length_cap_s.value + 10)
                await clock.sleep(0.5)  # the device's samples after the end, too
                sequences, samples = store.telemetry(result.session_id or 0)
                first = int(sequences[0]) if sequences.size else massager.next_sequence
                device_first, device_samples = massager.ring.range(
                    first, massager.next_sequence - first
                )
                await session.close()
        finally:
            if clock.is_running:
                await clock.stop()
        decisions = [
            RunDecision(d.kind, d.reason, d.step, d.sequence)
            for d in store.decisions(result.session_id or 0)
        ]
        return RunRecord(
            result.status,
            result.summary,
            float(store.session(result.session_id or 0).sample_rate_hz),
            sequences,
            samples,
            decisions,
            device_first,
            device_samples,
        )


@st.composite
def runs(draw: st.DrawFn) -> tuple[str, HandScript]:
    """A routine the short policy may accept, and a hand mostly on its zones."""
    text, zones = draw(runnable_massage_texts(RUN_POLICY))
    return text, draw(hand_scripts(RUN_POLICY, zones))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(run=runs(), mode=st.sampled_from([RunMode.HOST, RunMode.DEVICE]))
def test_runs_under_any_hand_never_make_the_device_exceed_the_policy(
    run: tuple[str, HandScript], mode: RunMode
) -> None:
    text, hand = run
    routine = check_routine_text(text, RUN_POLICY)
    assume(routine is not None)
    assert routine is not None
    on_simulator = functools.partial(run_on_simulator, policy=RUN_POLICY, mode=mode)
    asyncio.run(check_run(on_simulator, routine, RUN_POLICY, hand))
