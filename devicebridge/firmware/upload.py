"""Image upload with requests pipelined up to what the device can buffer.

A Zephyr SMP server processes requests one at a time, in the order they
arrive, from a pool of ``buf_count`` buffers that requests and responses share
(both numbers come with MCUmgr parameters). So a client may keep ``buf_count -
1`` requests in flight: while the device writes one chunk to flash and answers
it, the next ones are already on the link, which never idles waiting for an
answer. Each answer carries the offset the device expects next:

* the offset right after the chunk: all is well;
* any other offset: the device dropped this chunk (an earlier one was lost, or
  it already had it) and every chunk sent after it will be dropped as well. The
  upload stops sending, collects the answers still on their way, and goes on
  from the offset the latest one reports;
* 0, for a chunk past the start: the device has no upload in progress any
  more (it finished, its last answer was lost, or it reset): :class:`UploadForgotten`.

An answer that never comes (lost, or its request was) costs one request
timeout: the upload then asks the device where it stands by sending the chunk
at the last offset it confirmed, alone. Answers arrive in order over BLE and
serial, but not necessarily over UDP; since the device handled the requests in
the order they were sent, the answer to the newest request is the one that
counts, and earlier answers that did not come are not waited for.

The first request (``off`` 0, with ``len`` and the image's SHA-256) goes alone:
its answer says whether the device kept a partial upload of this image (and
where it ends) or already holds all of it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from smpclient.requests.image_management import ImageUploadWrite

from devicebridge.clock import wait_for
from devicebridge.firmware.channel import SmpChannel, check_response, decode_response
from devicebridge.firmware.errors import (
    FirmwareVerifyError,
    SmpProtocolError,
    UploadForgotten,
)

_LOGGER = logging.getLogger(__name__)

# Answers missed in a row (each after a request timeout) before the link counts as down.
MAX_SILENT_TIMEOUTS: Final = 3


@dataclass(slots=True)
class UploadStats:
    """What one upload attempt cost and met (for tests, benchmarks and logs)."""

    requests: int = 0
    peak_in_flight: int = 0
    answers_missed: int = 0  # answers that never came (or came after a newer one)
    resyncs: int = 0  # answers that reported another offset than expected
    timeouts: int = 0


@dataclass(frozen=True, slots=True)
class _Sent:
    request: Any
    future: asyncio.Future[bytes]
    offset: int
    end: int


def _cbor_length_bytes(n: int) -> int:
    """Extra bytes CBOR needs, beyond the initial byte, to encode a length of ``n``."""
    return 0 if n < 24 else 1 if n <= 0xFF else 2 if n <= 0xFFFF else 4


class PipelinedUpload:
    """One attempt to upload ``data`` into image slot 0's update slot over ``channel``."""

    def __init__(
        self,
        channel: SmpChannel,
        data: bytes,
        *,
        max_message_bytes: int,
        max_in_flight: int,
        first_timeout_s: float,
        request_timeout_s: float,
        on_offset: Callable[[int, bool], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.channel = channel
        self.data = data
        self.sha256 = hashlib.sha256(data).digest()
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.first_timeout_s = first_timeout_s
        self.request_timeout_s = request_timeout_s
        self.on_offset = on_offset
        self.stats = UploadStats()
        self._reported = -1

    @property
    def device(self) -> str:
        return self.channel.device

    def first_request(self) -> ImageUploadWrite:
        return self._fill(
            {"off": 0, "image": 0, "len": len(self.data), "sha": self.sha256, "upgrade": False}
        )

    async def run(self) -> int:
        """Upload until the device holds the whole image; returns where it resumed from
        (the offset its first answer gave, 0 when it had nothing of this image)."""
        size = len(self.data)
        first = self.first_request()
        future = await self._send(first)
        try:
            frame = await self.channel.receive(future, self.first_timeout_s)
        finally:
            self.channel.forget(first)
        confirmed = self._offset_of(first, frame)
        if confirmed == 0:
            raise SmpProtocolError(
                "the device answered the first chunk with offset 0", device=self.device
            )
        resumed_from = 0 if confirmed == len(first.data) else confirmed
        self._progress(confirmed, resumed=resumed_from > 0)
        if confirmed >= size:
            return resumed_from

        in_flight: collections.deque[_Sent] = collections.deque()
        next_offset = confirmed
        window = self.max_in_flight
        draining = False
        silent = 0
        try:
            while True:
                while not draining and len(in_flight) < window and next_offset < size:
                    request = self._fill({"off": next_offset})
                    future = await self._send(request)
                    sent = _Sent(request, future, next_offset, next_offset + len(request.data))
                    in_flight.append(sent)
                    next_offset = sent.end
                    self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(in_flight))
                if not await self._wait_any(in_flight):
                    # Nothing came back in time: forget what is in flight and ask the
                    # device where it stands, with the chunk it last confirmed, alone.
                    silent += 1
                    self.stats.timeouts += 1
                    if silent > MAX_SILENT_TIMEOUTS:
                        raise TimeoutError(f"no answer to {silent} upload requests in a row")
                    _LOGGER.info("%s: no answer at offset %d; asking again", self.device, confirmed)
                    self._forget_all(in_flight)
                    next_offset, window, draining = confirmed, 1, False
                    continue
                silent = 0
                window = self.max_in_flight
                while in_flight and any(s.future.done() for s in in_flight):
                    sent = in_flight.popleft()
                    if not sent.future.done():
                        # A newer answer came first: this one was lost (or is late).
                        self.stats.answers_missed += 1
                        self.channel.forget(sent.request)
                        continue
                    reported = self._offset_of(sent.request, sent.future.result())
                    if reported == 0:
                        raise UploadForgotten(device=self.device)
                    confirmed = reported
                    self._progress(confirmed, resumed=False)
                    if confirmed >= size:
                        return resumed_from
                    if reported != sent.end and not draining:
                        # Dropped by the device: so will be everything sent after it.
                        self.stats.resyncs += 1
                        draining = True
                if draining and not in_flight:
                    next_offset, draining = confirmed, False
        finally:
            self._forget_all(in_flight)

    # ------------------------------------------------------------------ helpers

    def _fill(self, fields: dict[str, Any]) -> ImageUploadWrite:
        """An upload request at ``fields['off']`` carrying as much of the image as fits."""
        offset = fields["off"]
        empty = ImageUploadWrite(data=b"", **fields)
        room = self.max_message_bytes - len(empty.BYTES)
        n_bytes = min(room - _cbor_length_bytes(room), len(self.data) - offset)
        if n_bytes <= 0:
            raise SmpProtocolError(
                f"the device's SMP buffer ({self.max_message_bytes} bytes) leaves no room "
                "for image data",
                device=self.device,
            )
        return ImageUploadWrite(data=self.data[offset : offset + n_bytes], **fields)

    async def _send(self, request: ImageUploadWrite) -> asyncio.Future[bytes]:
        self.stats.requests += 1
        return await self.channel.send(request)

    async def _wait_any(self, in_flight: collections.deque[_Sent]) -> bool:
        """Whether an answer came within the request timeout."""
        futures = [sent.future for sent in in_flight]
        if any(future.done() for future in futures):
            return True
        try:
            await wait_for(
                self.channel.clock,
                asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED),
                self.request_timeout_s,
            )
        except TimeoutError:
            return False
        return True

    def _offset_of(self, request: ImageUploadWrite, frame: bytes) -> int:
        response = check_response(
            decode_response(request, frame, device=self.device), "image upload", device=self.device
        )
        offset = response.off
        if offset is None or not 0 <= offset <= len(self.data):
            raise SmpProtocolError(
                f"the device answered an upload request with offset {offset!r}", device=self.device
            )
        if offset >= len(self.data) and response.match is False:
            raise FirmwareVerifyError(
                "the device's SHA-256 of the uploaded image does not match the image",
                device=self.device,
            )
        return int(offset)

    def _progress(self, offset: int, *, resumed: bool) -> None:
        if offset <= self._reported and not resumed:
            return
        self._reported = offset
        if self.on_offset is not None:
            self.on_offset(offset, resumed)

    def _forget_all(self, in_flight: collections.deque[_Sent]) -> None:
        while in_flight:
            self.channel.forget(in_flight.popleft().request)
