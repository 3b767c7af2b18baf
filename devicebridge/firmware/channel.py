"""SMP requests over any smpclient transport: several in flight, matched by sequence number.

smpclient's ``SMPClient.request`` sends one request and takes the next message
that arrives as its answer, with a wall-clock timeout. :class:`SmpChannel` keeps
one reader on the transport and hands every response to the request with the
same sequence number, so requests can be pipelined, a late answer to an
abandoned request is dropped instead of being taken for the next one, and every
timeout runs on the injected clock (virtual time in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
from typing import Any, Final

from smp import error as smperr
from smp import image_management as smpimg
from smpclient.generics import error, error_v1
from smpclient.transport import SMPTransport, SMPTransportDisconnected

from devicebridge.clock import Clock, wait_for
from devicebridge.firmware.errors import SmpCommandError, SmpProtocolError

_LOGGER = logging.getLogger(__name__)

IMAGE_GROUP: Final = 1  # SMP group id of image management
# res/ver/op, flags, length, group, sequence, command (network byte order). Read with
# struct, not smp's Header: that one refuses command ids missing from smp's own table
# (such as Zephyr's image slot info).
SMP_HEADER: Final = struct.Struct("!BBHHBB")
SMP_HEADER_BYTES: Final = SMP_HEADER.size


def smp_message_bytes(header: bytes | bytearray) -> int:
    """The length of the SMP message that starts with ``header`` (at least 8 bytes)."""
    return SMP_HEADER_BYTES + int(SMP_HEADER.unpack_from(header)[2])


def smp_sequence(header: bytes | bytearray) -> int:
    return int(SMP_HEADER.unpack_from(header)[4])


class SmpChannel:
    """Requests and their responses over one smpclient transport, timed on ``clock``."""

    def __init__(self, transport: SMPTransport, clock: Clock, *, device: str) -> None:
        self.transport = transport
        self.clock = clock
        self.device = device
        self.bytes_sent = 0
        self.bytes_received = 0
        self.late_responses = 0  # answers to requests nobody waits for any more
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._send_lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._reader is not None and self._failure is None

    async def open(self, address: str, timeout_s: float) -> None:
        """Connect the transport (within ``timeout_s`` on the clock) and start reading."""
        await self.close()
        await wait_for(self.clock, self.transport.connect(address, timeout_s), timeout_s)
        self._failure = None
        self._reader = asyncio.get_running_loop().create_task(
            self._read_forever(), name=f"SMP reader {self.device}"
        )

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            return
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        self._fail_waiting(SMPTransportDisconnected(f"{self.device}: closed"))
        await self.transport.disconnect()

    async def send(self, request: Any) -> asyncio.Future[bytes]:
        """Send ``request``; the future resolves with its response's bytes."""
        if self._failure is not None:
            raise self._failure
        if self._reader is None:
            raise SMPTransportDisconnected(f"{self.device}: not connected")
        sequence = request.header.sequence
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        stale = self._waiting.pop(sequence, None)
        if stale is not None and not stale.done():
            stale.cancel()  # a request 256 sequence numbers ago that never got its answer
        self._waiting[sequence] = future
        data = request.BYTES
        try:
            # One request's packets must not interleave with another's on the link.
            async with self._send_lock:
                await self.transport.send(data)
        except BaseException:
            self._waiting.pop(sequence, None)
            raise
        self.bytes_sent += len(data)
        return future

    def forget(self, request: Any) -> None:
        """Nobody waits for ``request``'s answer any more (it is dropped when it comes)."""
        future = self._waiting.pop(request.header.sequence, None)
        if future is not None and not future.done():
            future.cancel()

    async def receive(self, future: asyncio.Future[bytes], timeout_s: float) -> bytes:
        """The response ``future`` resolves with, within ``timeout_s`` on the clock."""
        return await wait_for(self.clock, asyncio.shield(future), timeout_s)

    async def request(self, request: Any, timeout_s: float) -> Any:
        """Send ``request`` and return its decoded response (success or error model)."""
        future = await self.send(request)
        try:
            frame = await self.receive(future, timeout_s)
        finally:
            self.forget(request)
        return decode_response(request, frame, device=self.device)

    async def _read_forever(self) -> None:
        try:
            while True:
                frame = await self.transport.receive()
                self.bytes_received += len(frame)
                if len(frame) < SMP_HEADER_BYTES:
                    continue
                future = self._waiting.pop(smp_sequence(frame), None)
                if future is None or future.done():
                    self.late_responses += 1
                    _LOGGER.debug("%s: dropped a response nobody waits for", self.device)
                    continue
                future.set_result(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the link failed: every waiter hears why
            self._failure = exc
            self._fail_waiting(exc)

    def _fail_waiting(self, exc: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(exc)
                # Retrieved here so a future nobody awaits any more does not log.
                with contextlib.suppress(BaseException):
                    future.exception()


def decode_response(request: Any, frame: bytes, *, device: str) -> Any:
    """``frame`` as ``request``'s response model, or its SMP v1 / v2 error model."""
    for model in (request._Response, request._ErrorV1, request._ErrorV2):
        try:
            return model.loads(frame)
        except Exception:  # whatever the device sent: pydantic, CBOR and header errors
            continue
    raise SmpProtocolError(
        f"the answer to {type(request).__name__} is not an SMP response "
        f"({len(frame)} bytes: {frame[:16].hex()}...)",
        device=device,
    )


def check_response(response: Any, what: str, *, device: str) -> Any:
    """``response`` if it is not an error; otherwise :class:`SmpCommandError` naming the result."""
    if not error(response):
        return response
    rc, rc_name = _error_text(response)
    raise SmpCommandError(command=what, rc=rc, rc_name=rc_name, device=device)


def _error_text(response: Any) -> tuple[int, str]:
    """The result code of an SMP error response, and its name."""
    names: type[enum.IntEnum]
    if error_v1(response):
        rc, names = int(response.rc), smperr.MGMT_ERR
    else:
        err = response.err
        rc = int(err.rc)
        names = smpimg.IMG_MGMT_ERR if err.group == IMAGE_GROUP else smperr.MGMT_ERR
    try:
        return rc, names(rc).name
    except ValueError:
        return rc, str(rc)
