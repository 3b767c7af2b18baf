"""The connection state machine and the reconnect backoff (pure cores)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devicebridge.core.backoff import Backoff, BackoffPolicy
from devicebridge.core.states import (
    ALLOWED_TRANSITIONS,
    ConnectionState,
    ConnectionStateMachine,
    can_transition,
)
from devicebridge.errors import DeviceBridgeError, InvalidStateTransitionError

S = ConnectionState


def test_normal_life_cycle_with_a_reconnect() -> None:
    machine = ConnectionStateMachine()
    seen: list[tuple[S, S]] = []
    machine.add_listener(lambda old, new: seen.append((old, new)))
    for state in (
        S.CONNECTING,
        S.INITIALIZING,
        S.READY,
        S.RECONNECT_WAIT,
        S.WAITING_FOR_DEVICE,
        S.CONNECTING,
        S.INITIALIZING,
        S.READY,
        S.CLOSED,
    ):
        machine.transition(state)
    assert machine.state is S.CLOSED
    assert seen[0] == (S.DISCONNECTED, S.CONNECTING)
    assert len(seen) == 9


@pytest.mark.parametrize(
    ("start", "target"),
    [(S.DISCONNECTED, S.READY), (S.READY, S.CONNECTING), (S.CLOSED, S.CONNECTING)],
)
def test_illegal_transition_raises_with_both_states(start: S, target: S) -> None:
    machine = ConnectionStateMachine(start)
    with pytest.raises(InvalidStateTransitionError) as info:
        machine.transition(target)
    assert isinstance(info.value, DeviceBridgeError)
    assert (info.value.current, info.value.requested) == (start, target)
    assert machine.state is start


def test_closed_is_terminal_and_every_other_state_can_close() -> None:
    assert ALLOWED_TRANSITIONS[S.CLOSED] == frozenset()
    for state in S:
        if state is not S.CLOSED:
            assert can_transition(state, S.CLOSED)


def test_backoff_grows_is_capped_and_jittered_reproducibly() -> None:
    policy = BackoffPolicy(initial_s=0.5, multiplier=2.0, max_s=4.0)
    first = Backoff(policy, random.Random(7))
    second = Backoff(policy, random.Random(7))
    delays = [first.next_delay_s() for _ in range(8)]
    assert delays == [second.next_delay_s() for _ in range(8)]
    caps = [policy.cap_s(i) for i in range(8)]
    assert caps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(0.0 <= d <= c for d, c in zip(delays, caps, strict=True))


def test_backoff_resets_only_after_a_stable_connection() -> None:
    backoff = Backoff(BackoffPolicy(stable_after_s=10.0), random.Random(1))
    for _ in range(3):
        backoff.next_delay_s()
    backoff.on_connected(now_s=100.0)
    backoff.on_link_lost(now_s=105.0)  # flapping: keep growing
    assert backoff.attempt == 3
    backoff.on_connected(now_s=200.0)
    backoff.on_link_lost(now_s=215.0)
    assert backoff.attempt == 0


@given(st.integers(min_value=0, max_value=10_000))
def test_backoff_cap_never_exceeds_max(attempt: int) -> None:
    policy = BackoffPolicy(initial_s=0.1, multiplier=3.0, max_s=20.0)
    assert 0.1 <= policy.cap_s(attempt) <= 20.0


def test_backoff_policy_validates() -> None:
    with pytest.raises(ValueError, match="initial_s"):
        BackoffPolicy(initial_s=0)
    with pytest.raises(ValueError, match="multiplier"):
        BackoffPolicy(multiplier=0.5)
