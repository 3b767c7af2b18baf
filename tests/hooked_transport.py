"""A transport around another, whose writes go through a test's hooks.

How a test sees, delays, loses or fails what the host writes without replacing a method of
the real transport: the ``Transport`` protocol is the seam, and transports compose (as
httpx's do). ``session.transport = HookedTransport(session.transport, control=hook)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from devicebridge.device.transport.base import (
    DeviceInfo,
    LinkLostReceiver,
    MalformedReceiver,
    MessageReceiver,
    Transport,
)

Write = Callable[[bytes], Awaitable[None]]
# ``hook(data, write)``: await ``write(data)`` to send it on (or not, or later, or fail).
WriteHook = Callable[[bytes, Write], Awaitable[None]]


class HookedTransport:
    """``inner`` with its control writes through ``control`` and its program chunk writes
    through ``program_chunk``; everything else is ``inner``'s."""

    def __init__(
        self,
        inner: Transport,
        *,
        control: WriteHook | None = None,
        program_chunk: WriteHook | None = None,
    ) -> None:
        self.inner = inner
        self.control = control
        self.program_chunk = program_chunk

    def __getattr__(self, name: str) -> Any:
        # Optional parts of the protocol (write_control_nowait on serial) are the inner
        # transport's, but a synchronous write would go around the control hook.
        if name == "write_control_nowait" and self.control is not None:
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    @property
    def max_message_bytes(self) -> int:
        return self.inner.max_message_bytes

    @property
    def max_program_chunk_bytes(self) -> int:
        return self.inner.max_program_chunk_bytes

    def set_receivers(
        self,
        on_message: MessageReceiver,
        on_link_lost: LinkLostReceiver,
        on_malformed: MalformedReceiver | None = None,
    ) -> None:
        self.inner.set_receivers(on_message, on_link_lost, on_malformed)

    async def wait_for_device(self, timeout_s: float) -> None:
        await self.inner.wait_for_device(timeout_s)

    async def connect(self) -> None:
        await self.inner.connect()

    async def disconnect(self) -> None:
        await self.inner.disconnect()

    async def read_device_info(self) -> DeviceInfo:
        return await self.inner.read_device_info()

    async def write_control(self, data: bytes) -> None:
        if self.control is None:
            await self.inner.write_control(data)
        else:
            await self.control(data, self.inner.write_control)

    async def write_program_chunk(self, data: bytes) -> None:
        if self.program_chunk is None:
            await self.inner.write_program_chunk(data)
        else:
            await self.program_chunk(data, self.inner.write_program_chunk)
