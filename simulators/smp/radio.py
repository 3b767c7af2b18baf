"""The airtime of one BLE connection, shared by both directions packet by packet.

A connection meets every connection interval (7.5 ms to 4 s; ``ble-and-ecosystem.md``).
In a connection event the central and the peripheral take turns, a packet one
way and a packet the other way, and the event goes on for as long as either has
more to send; once neither has, it closes, and whatever is queued afterwards
waits for the next event. The application throughput of a link with data length
extension is about 0.8 Mbps, shared by both directions.

The model: one budget of ``bytes_per_s``; messages are cut into ATT packets
(``payload_bytes`` each, plus 3 bytes of opcode and handle); the radio sends one
packet at a time, taking turns between the directions when both have something
to send, each packet taking its size / ``bytes_per_s``; when it has run out of
packets, the next one starts at the next connection event (``interval_s`` apart,
counted from the connection). :meth:`Radio.send` queues a message and calls
back when its first packet and its last packet have arrived.

So a client that waits for each answer before it sends the next request leaves
the link idle until the next connection event every time; one that keeps
requests queued keeps the event going.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from protocols.constants import ATT_HEADER_BYTES

# The shortest connection interval BLE allows: the least a waiting client loses to it.
DEFAULT_CONNECTION_INTERVAL_S: Final = 0.0075

Action = Callable[[], None]


class Direction(enum.Enum):
    TO_DEVICE = "central to peripheral"  # write commands
    TO_HOST = "peripheral to central"  # notifications


class _Clock(Protocol):
    def now_s(self) -> float: ...

    async def sleep_until(self, t_s: float) -> None: ...


def airtime_bytes(message_bytes: int, payload_bytes: int) -> int:
    """Bytes on air for a message cut into ATT packets of ``payload_bytes`` (MTU - 3)."""
    packets = max(1, -(-message_bytes // payload_bytes))
    return message_bytes + ATT_HEADER_BYTES * packets


@dataclass(slots=True, eq=False)
class _Message:
    packets: collections.deque[int]  # bytes on air of each packet still to send
    on_first_packet: Action | None
    on_last_packet: Action
    started: bool = False


@dataclass(slots=True)
class _Queues:
    to_device: collections.deque[_Message] = field(default_factory=collections.deque)
    to_host: collections.deque[_Message] = field(default_factory=collections.deque)

    def of(self, direction: Direction) -> collections.deque[_Message]:
        return self.to_device if direction is Direction.TO_DEVICE else self.to_host


class Radio:
    """One shared airtime budget; packets of the two directions take turns."""

    def __init__(
        self,
        clock: _Clock,
        bytes_per_s: float,
        *,
        interval_s: float = DEFAULT_CONNECTION_INTERVAL_S,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be positive, got {bytes_per_s}")
        if interval_s < 0:
            raise ValueError(f"interval_s must not be negative, got {interval_s}")
        self.clock = clock
        self.bytes_per_s = bytes_per_s
        self.interval_s = interval_s
        self._anchor_s = clock.now_s()  # the connection's first event
        self.bytes_on_air = 0
        self.errors: list[BaseException] = []
        self._queues = _Queues()
        self._last: Direction = Direction.TO_HOST
        self._free_at_s = self._anchor_s
        self._sending = False  # a packet is on air
        self._generation = 0  # bumped by clear(): a packet in progress is abandoned
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        return not self._queues.to_device and not self._queues.to_host

    def send(
        self,
        direction: Direction,
        message_bytes: int,
        payload_bytes: int,
        *,
        on_first_packet: Action | None = None,
        on_last_packet: Action,
    ) -> None:
        """Queue a message of ``message_bytes`` cut into packets of ``payload_bytes``."""
        payload_bytes = max(1, payload_bytes)
        if self.idle and not self._sending:
            # The last event closed when there was nothing left to send: this goes at
            # the next connection event.
            self._free_at_s = self._next_event_s(max(self._free_at_s, self.clock.now_s()))
        sizes = collections.deque(
            min(payload_bytes, message_bytes - start) + ATT_HEADER_BYTES
            for start in range(0, max(message_bytes, 1), payload_bytes)
        )
        self._queues.of(direction).append(_Message(sizes, on_first_packet, on_last_packet))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name="SMP radio airtime"
            )
        self._wake.set()

    def clear(self) -> None:
        """The link is gone: nothing queued goes on air any more (and the next
        connection's events start now)."""
        self._queues = _Queues()
        self._generation += 1
        self._anchor_s = self.clock.now_s()
        self._wake.set()

    def _next_event_s(self, t_s: float) -> float:
        """The start of the first connection event at or after ``t_s``."""
        if self.interval_s == 0:
            return t_s
        events = math.ceil((t_s - self._anchor_s) / self.interval_s - 1e-9)
        return self._anchor_s + max(0, events) * self.interval_s

    async def stop(self) -> None:
        worker, self._worker = self._worker, None
        self.clear()
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    def _next_direction(self) -> Direction | None:
        other = Direction.TO_DEVICE if self._last is Direction.TO_HOST else Direction.TO_HOST
        if self._queues.of(other):
            return other
        if self._queues.of(self._last):
            return self._last
        return None

    async def _run(self) -> None:
        while True:
            direction = self._next_direction()
            if direction is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            queue = self._queues.of(direction)
            message = queue[0]
            size = message.packets.popleft()
            self._last = direction
            generation = self._generation
            # Back to back while there is traffic, however late this task got to run.
            self._free_at_s += size / self.bytes_per_s
            self._sending = True
            try:
                await self.clock.sleep_until(self._free_at_s)
            finally:
                self._sending = False
            if generation != self._generation:
                continue  # cleared while this packet was on air
            self.bytes_on_air += size
            first = not message.started
            message.started = True
            if not message.packets:
                queue.popleft()
            try:
                if first and message.on_first_packet is not None:
                    message.on_first_packet()
                if not message.packets:
                    message.on_last_packet()
            except Exception as exc:  # a simulator bug: kept for stop() to raise
                self.errors.append(exc)
