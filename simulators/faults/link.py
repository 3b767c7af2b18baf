"""A link that damages what it carries: lost, late, corrupt, cut, repeated, reordered."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, cast

import numpy as np

from protocols import encode_frame
from simulators.devices.link import Channel, DeviceLink, FramedLink
from simulators.faults.spec import MESSAGE_FAULTS, TYPE_DAMAGE_MASK, Fault, FaultKind

if TYPE_CHECKING:
    from simulators.faults.injector import FaultInjector


def corrupt_message(message: bytes, rng: np.random.Generator, bits: int) -> bytes:
    """A damaged unframed message (BLE): the type byte gets an unknown value, plus bit flips.

    Bit errors on air never reach a BLE host (the link layer's CRC makes the packet be
    sent again), so what a host meets is a message damaged before it was sent. Setting
    the type byte's high bit guarantees the damage is detectable by the receiver.
    """
    damaged = bytearray(message)
    damaged[0] ^= TYPE_DAMAGE_MASK
    for _ in range(max(0, bits - 1)):
        if len(damaged) > 1:
            index = int(rng.integers(1, len(damaged)))
            damaged[index] ^= 1 << int(rng.integers(0, 8))
    return bytes(damaged)


def corrupt_frame(frame: bytes, rng: np.random.Generator, bits: int) -> bytes:
    """A serial frame with ``bits`` bits flipped (never the trailing delimiter)."""
    damaged = bytearray(frame)
    body = len(damaged) - 1
    for _ in range(max(1, bits)):
        index = int(rng.integers(0, body))
        damaged[index] ^= 1 << int(rng.integers(0, 8))
    return bytes(damaged)


class ActiveFault:
    """A fault as installed on one device: its generator and its running state."""

    def __init__(self, fault: Fault, rng: np.random.Generator, ordinal: int) -> None:
        self.fault = fault
        self.rng = rng
        self.ordinal = ordinal
        self.burst_left = 0
        self.stuck_raw: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.hits = 0


def is_framed(link: DeviceLink) -> bool:
    """Whether ``link`` carries serial frames (:class:`~simulators.devices.link.FramedLink`)."""
    return link.framed if isinstance(link, FaultyLink) else hasattr(link, "send_frame")


class FaultyLink:
    """A link layer (:class:`~simulators.devices.link.LinkLayer`) that applies an injector's
    message faults to what a device sends through it.

    On a framed link (the pty and TCP ports, or a :class:`FaultyLink` around one) the faults
    hit the encoded frame bytes, passed on with ``send_frame``; on other links (BLE) the
    message.
    """

    def __init__(self, inner: DeviceLink, injector: FaultInjector) -> None:
        self.inner = inner
        self.injector = injector
        self._held: tuple[Channel, bytes] | None = None
        self._delayed: collections.deque[tuple[float, Channel, bytes]] = collections.deque()
        self._delivery: asyncio.Task[None] | None = None
        self._release_s = 0.0
        self.closed = False
        # The inner link is fixed for the wrapper's life, and so is whether it is framed.
        self._framed = is_framed(inner)

    @property
    def max_payload_bytes(self) -> int:
        return self.inner.max_payload_bytes

    @property
    def framed(self) -> bool:
        return self._framed

    def send(self, channel: Channel, message: bytes) -> None:
        self._transmit(channel, encode_frame(message) if self._framed else message)

    def send_frame(self, channel: Channel, frame: bytes) -> None:
        """An encoded frame from a layer outside this one (only on a framed link)."""
        if not self._framed:
            raise TypeError("send_frame on a FaultyLink around a link without framing")
        self._transmit(channel, frame)

    def _transmit(self, channel: Channel, payload: bytes) -> None:
        if self.closed:
            return
        injector = self.injector
        if not injector.has_faults and not self._delayed:
            # No fault to drop, damage or delay it, nothing delayed to queue behind: what
            # the way below does then, without its lists.
            self._deliver(channel, payload)
            return
        now_s = injector.clock.now_s()
        payloads = [payload]
        for active in injector.active_faults(now_s, MESSAGE_FAULTS):
            fault = active.fault
            if channel not in fault.channels or not payloads:
                continue
            payloads = self._apply(active, channel, payloads, now_s)
        delay_s = self._latency_s(channel, now_s)
        for payload in payloads:
            if delay_s > 0 or self._delayed:
                self._delay(channel, payload, now_s + delay_s)
            else:
                self._deliver(channel, payload)

    def _apply(
        self, active: ActiveFault, channel: Channel, payloads: list[bytes], now_s: float
    ) -> list[bytes]:
        fault, rng = active.fault, active.rng
        kind = fault.kind
        if kind is FaultKind.LATENCY:
            return payloads
        if kind is FaultKind.DROP:
            if active.burst_left == 0 and rng.random() < float(fault.param("rate")):
                active.burst_left = int(fault.param("burst"))
            if active.burst_left > 0:
                active.burst_left -= 1
                self.injector.record(active, f"{channel.value} notification dropped")
                return []
            return payloads
        out: list[bytes] = []
        for payload in payloads:
            if rng.random() >= float(fault.param("rate")):
                out.append(payload)
                continue
            if kind is FaultKind.CORRUPT:
                bits = int(fault.param("bits"))
                damaged = (
                    corrupt_frame(payload, rng, bits)
                    if self.framed
                    else corrupt_message(payload, rng, bits)
                )
                out.append(damaged)
                self.injector.record(active, f"{channel.value} frame corrupted")
            elif kind is FaultKind.TRUNCATE:
                body = payload[:-1] if self.framed else payload
                if len(body) < 2:
                    out.append(payload)
                    continue
                cut = body[: int(rng.integers(1, len(body)))]
                out.append(cut + b"\x00" if self.framed else cut)
                self.injector.record(active, f"{channel.value} frame truncated to {len(cut)} B")
            elif kind is FaultKind.DUPLICATE:
                out += [payload, payload]
                self.injector.record(active, f"{channel.value} frame duplicated")
            elif kind is FaultKind.REORDER:
                if self._held is None:
                    self._held = (channel, payload)
                    self.injector.record(active, f"{channel.value} frame held back")
                else:
                    out.append(payload)
        return out

    def _latency_s(self, channel: Channel, now_s: float) -> float:
        delay_s = 0.0
        for active in self.injector.active_faults(now_s, {FaultKind.LATENCY}):
            if channel in active.fault.channels:
                jitter_s = float(active.fault.param("jitter_s"))
                delay_s += float(active.fault.param("delay_s"))
                if jitter_s > 0:
                    delay_s += float(active.rng.uniform(0.0, jitter_s))
                if active.hits == 0:
                    self.injector.record(active, f"{channel.value} notifications delayed")
                else:
                    active.hits += 1
        return delay_s

    def _deliver(self, channel: Channel, payload: bytes) -> None:
        self._send_inner(channel, payload)
        # A held frame goes out right after the one that overtook it.
        if self._held is not None and self._held[0] is channel:
            held, self._held = self._held, None
            self._send_inner(*held)

    def _send_inner(self, channel: Channel, payload: bytes) -> None:
        if self._framed:
            cast(FramedLink, self.inner).send_frame(channel, payload)
        else:
            self.inner.send(channel, payload)

    def _delay(self, channel: Channel, payload: bytes, due_s: float) -> None:
        # In order: a later notification never overtakes an earlier one (one radio queue).
        self._release_s = max(self._release_s, due_s)
        self._delayed.append((self._release_s, channel, payload))
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.get_running_loop().create_task(
                self._deliver_delayed(), name="FaultyLink latency"
            )

    async def _deliver_delayed(self) -> None:
        clock = self.injector.clock
        while self._delayed and not self.closed:
            due_s, channel, payload = self._delayed[0]
            await clock.sleep_until(due_s)
            if not self._delayed or self._delayed[0][2] is not payload:
                return  # closed while waiting: the link dropped what it had
            self._delayed.popleft()
            self._deliver(channel, payload)

    def device_closed(self) -> None:
        self.close()
        self.inner.device_closed()

    def detached(self) -> None:
        self.close()

    def close(self) -> None:
        """The link is gone: what is held or delayed is lost with it."""
        self.closed = True
        self._held = None
        self._delayed.clear()
        if self._delivery is not None and not self._delivery.done():
            self._delivery.cancel()
        self._delivery = None
