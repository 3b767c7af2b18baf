"""The explicit connection state machine of a device session.

States follow the ones Gadgetbridge found necessary in the field: a session
waiting for its device to advertise again is a different state from one that
is backing off after a failure, and both differ from a link that is up but not
yet usable (notifications being enabled, the stream being restarted).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

from devicebridge.errors import InvalidStateTransitionError


class ConnectionState(enum.Enum):
    DISCONNECTED = "disconnected"  # not connected and not trying to
    WAITING_FOR_DEVICE = "waiting_for_device"  # scanning for the device's next advertisement
    CONNECTING = "connecting"
    INITIALIZING = "initializing"  # link up; notifications and stream being set up
    READY = "ready"
    RECONNECT_WAIT = "reconnect_wait"  # link lost or attempt failed; backing off
    CLOSED = "closed"  # terminal


S = ConnectionState

ALLOWED_TRANSITIONS: Final[dict[ConnectionState, frozenset[ConnectionState]]] = {
    S.DISCONNECTED: frozenset({S.WAITING_FOR_DEVICE, S.CONNECTING, S.CLOSED}),
    S.WAITING_FOR_DEVICE: frozenset({S.CONNECTING, S.RECONNECT_WAIT, S.DISCONNECTED, S.CLOSED}),
    S.CONNECTING: frozenset({S.INITIALIZING, S.RECONNECT_WAIT, S.DISCONNECTED, S.CLOSED}),
    S.INITIALIZING: frozenset({S.READY, S.RECONNECT_WAIT, S.DISCONNECTED, S.CLOSED}),
    S.READY: frozenset({S.RECONNECT_WAIT, S.DISCONNECTED, S.CLOSED}),
    S.RECONNECT_WAIT: frozenset({S.WAITING_FOR_DEVICE, S.CONNECTING, S.DISCONNECTED, S.CLOSED}),
    S.CLOSED: frozenset(),
}

LINK_UP_STATES: Final = frozenset({S.INITIALIZING, S.READY})


def can_transition(current: ConnectionState, requested: ConnectionState) -> bool:
    return requested in ALLOWED_TRANSITIONS[current]


StateListener = Callable[[ConnectionState, ConnectionState], None]


class ConnectionStateMachine:
    """Holds the current state; :meth:`transition` raises on an illegal change."""

    def __init__(self, initial: ConnectionState = S.DISCONNECTED) -> None:
        self._state = initial
        self._listeners: list[StateListener] = []
        self.history: list[ConnectionState] = [initial]

    @property
    def state(self) -> ConnectionState:
        return self._state

    def add_listener(self, listener: StateListener) -> None:
        """``listener(old, new)`` is called after every change."""
        self._listeners.append(listener)

    def transition(self, requested: ConnectionState) -> None:
        if not can_transition(self._state, requested):
            raise InvalidStateTransitionError(self._state, requested)
        old, self._state = self._state, requested
        self.history.append(requested)
        for listener in self._listeners:
            listener(old, requested)
