"""A raw pseudo-terminal whose master side the simulator drives on the event loop.

The host opens :attr:`RawPty.path` (the slave, ``/dev/pts/N``) like any USB serial
adapter. The master is non-blocking: reads come through the loop's reader callback, and a
write the pty cannot take at once waits in a buffer, sent as the host reads, so a full pty
never blocks the loop. Subclasses say what the bytes mean (:meth:`RawPty._received`).
"""

from __future__ import annotations

import abc
import asyncio
import os
import tty
from typing import Final

READ_CHUNK_BYTES: Final = 4096


class RawPty(abc.ABC):
    def __init__(self, label: str) -> None:
        self._label = label
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outgoing = bytearray()
        self._writer_registered = False

    @property
    def path(self) -> str:
        if self._path is None:
            raise RuntimeError(f"the {self._label} is not started")
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
        self._started()

    async def stop(self) -> None:
        master_fd, self._master_fd = self._master_fd, None
        if master_fd is None:
            return
        self._stopping()
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

    @abc.abstractmethod
    def _received(self, data: bytes) -> None:
        """Bytes the host wrote."""

    def _started(self) -> None:  # noqa: B027  (optional hook)
        """Hook: the pty is open."""

    def _stopping(self) -> None:  # noqa: B027  (optional hook)
        """Hook: the pty is about to close."""

    def _send_bytes(self, data: bytes) -> None:
        """Write now what the pty takes; queue the rest (in order) until it drains."""
        master_fd = self._master_fd
        if master_fd is None:
            return
        if self._outgoing:
            self._outgoing += data
            return
        try:
            written = os.write(master_fd, data)
        except (BlockingIOError, InterruptedError):
            written = 0
        if written < len(data):
            self._outgoing += data[written:]
            if not self._writer_registered and self._loop is not None:
                self._loop.add_writer(master_fd, self._on_writable)
                self._writer_registered = True

    def _on_readable(self) -> None:
        if self._master_fd is None:
            return
        try:
            data = os.read(self._master_fd, READ_CHUNK_BYTES)
        except OSError:
            # EAGAIN, or EIO when the slave side hung up: nothing to read until it reopens.
            return
        self._received(data)

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
