"""A simulated device on a real pseudo-terminal, so the host's pyserial code path runs.

The simulator holds the pty's master side; the host opens :attr:`PtySerialPort.path`
(the slave, ``/dev/pts/N``) like any USB serial adapter. Messages travel both
ways as ``encode_frame(message)`` frames. The master is non-blocking and driven
by the event loop: a full pty never blocks the loop, the rest waits in a
buffer until the host reads.
"""

from __future__ import annotations

import asyncio
import os
import tty
from typing import Final

from protocols import FrameDecoder, encode_frame
from protocols.serial_framing import MAX_MESSAGE_BYTES
from simulators.device import SimulatedDevice
from simulators.link import Channel

READ_CHUNK_BYTES: Final = 4096
# A UART that nobody reads drops data; so does this port beyond 1 MiB queued.
DEFAULT_MAX_BUFFERED_BYTES: Final = 1 << 20


class PtySerialPort:
    """One device behind one pty. ``await start()``, give the host ``path``, ``await stop()``."""

    def __init__(
        self,
        device: SimulatedDevice,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        self.device = device
        self._max_message_bytes = max_message_bytes
        self._max_buffered_bytes = max_buffered_bytes
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder = FrameDecoder()
        self._outgoing = bytearray()
        self._writer_registered = False
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frame_errors = 0

    @property
    def path(self) -> str:
        """The slave device path (``/dev/pts/N``) for the host to open."""
        if self._path is None:
            raise RuntimeError("the port is not started")
        return self._path

    @property
    def buffered_bytes(self) -> int:
        return len(self._outgoing)

    async def start(self) -> None:
        if self._master_fd is not None:
            return
        master_fd, slave_fd = os.openpty()
        # Raw: no echo, no line editing, no CR/LF translation of binary frames.
        tty.setraw(slave_fd)
        os.set_blocking(master_fd, False)
        self._master_fd, self._slave_fd = master_fd, slave_fd
        # We keep the slave open ourselves: with no slave open, reads on the
        # master fail with EIO, and a host that reopens the port would lose data.
        self._path = os.ttyname(slave_fd)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(master_fd, self._on_readable)
        self.device.attach_link(self)

    async def stop(self) -> None:
        master_fd, self._master_fd = self._master_fd, None
        if master_fd is None:
            return
        if self.device.link is self:
            self.device.detach_link()
        assert self._loop is not None
        self._loop.remove_reader(master_fd)
        if self._writer_registered:
            self._loop.remove_writer(master_fd)
            self._writer_registered = False
        self._outgoing.clear()
        os.close(master_fd)
        if self._slave_fd is not None:
            os.close(self._slave_fd)
            self._slave_fd = None

    # ------------------------------------------------------------------ DeviceLink

    @property
    def max_payload_bytes(self) -> int:
        return self._max_message_bytes

    def send(self, channel: Channel, message: bytes) -> None:
        if channel is Channel.BATTERY:
            return  # no Battery Service on serial: every sample carries the level
        self._write(encode_frame(message))

    def device_closed(self) -> None:
        """The device powered off: the pty stays, it just goes quiet."""

    # ------------------------------------------------------------------ I/O

    def _on_readable(self) -> None:
        if self._master_fd is None:
            return
        try:
            data = os.read(self._master_fd, READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # EIO when the slave side hung up; nothing to read until it reopens.
            return
        messages, errors = self._decoder.feed(data)
        self.frame_errors += len(errors)
        for message in messages:
            self.device.receive(Channel.CONTROL, message)

    def _write(self, frame: bytes) -> None:
        master_fd = self._master_fd
        if master_fd is None:
            return
        if self._outgoing:
            if len(self._outgoing) + len(frame) > self._max_buffered_bytes:
                self.frames_dropped += 1
                return
            self._outgoing += frame
            self.frames_sent += 1
            return
        try:
            written = os.write(master_fd, frame)
        except (BlockingIOError, InterruptedError):
            written = 0
        self.frames_sent += 1
        if written < len(frame):
            self._outgoing += frame[written:]
            self._register_writer()

    def _register_writer(self) -> None:
        if not self._writer_registered and self._loop is not None and self._master_fd is not None:
            self._loop.add_writer(self._master_fd, self._on_writable)
            self._writer_registered = True

    def _on_writable(self) -> None:
        master_fd = self._master_fd
        if master_fd is None:
            return
        try:
            written = os.write(master_fd, self._outgoing)
        except (BlockingIOError, InterruptedError):
            return
        del self._outgoing[:written]
        if not self._outgoing and self._loop is not None:
            self._loop.remove_writer(master_fd)
            self._writer_registered = False
