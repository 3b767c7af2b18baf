"""Serial transport over pyserial: COBS frames with a CRC-32 (see protocols.serial_framing).

pyserial opens and configures the port; the bytes then move with ``os.read`` and
``os.write`` on its non-blocking file descriptor, driven by the event loop's
``add_reader``/``add_writer`` (POSIX), so the loop never blocks on the port.
A malformed frame is counted, logged and skipped: the COBS delimiter
resynchronises the stream at the next frame.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Final

import serial

from devicebridge.clock import Clock, wait_for
from devicebridge.device.transport.base import (
    TRANSPORT_COMMAND_ID,
    DeviceInfo,
    LinkLostReceiver,
    MalformedReceiver,
    MessageReceiver,
)
from devicebridge.errors import (
    CommandRejectedError,
    CommandTimeoutError,
    ConnectionLostError,
    DeviceNotFoundError,
    NotConnectedError,
    TransportError,
)
from protocols import (
    Ack,
    Command,
    DeviceProfile,
    FrameDecoder,
    FrameError,
    GetInfo,
    MessageType,
    ProtocolError,
    encode_frame,
)
from protocols.serial_framing import MAX_MESSAGE_BYTES

_LOGGER = logging.getLogger(__name__)

DEFAULT_BAUDRATE: Final = 115_200
DEFAULT_INFO_TIMEOUT_S: Final = 3.0
READ_CHUNK_BYTES: Final = 65_536
PORT_POLL_INTERVAL_S: Final = 0.25
# Errors that mean the other end of the line went away (pty closed, USB unplugged).
_HANGUP_ERRNOS: Final = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EBADF})


class SerialTransport:
    """One device on a serial port (a :class:`~devicebridge.device.transport.base.Transport`)."""

    def __init__(
        self,
        port: str,
        clock: Clock,
        *,
        baudrate: int = DEFAULT_BAUDRATE,
        info_timeout_s: float = DEFAULT_INFO_TIMEOUT_S,
    ) -> None:
        self.port = port
        self._clock = clock
        self._baudrate = baudrate
        self._info_timeout_s = info_timeout_s
        self._serial: serial.Serial | None = None
        self._fd: int | None = None
        self._decoder = FrameDecoder()
        self._out = bytearray()
        self._waiting_writable = False  # _flush is registered for when the port drains
        self._on_message: MessageReceiver | None = None
        self._on_link_lost: LinkLostReceiver | None = None
        self._on_malformed: MalformedReceiver | None = None
        self._info_waiter: asyncio.Future[Ack] | None = None
        self.malformed_frames = 0

    @property
    def clock(self) -> Clock:
        """The clock this transport waits on (sessions over it should share it)."""
        return self._clock

    @property
    def description(self) -> str:
        return f"serial {self.port}"

    @property
    def is_connected(self) -> bool:
        return self._fd is not None

    @property
    def max_message_bytes(self) -> int:
        return MAX_MESSAGE_BYTES

    @property
    def max_program_chunk_bytes(self) -> int:
        return MAX_MESSAGE_BYTES

    def set_receivers(
        self,
        on_message: MessageReceiver,
        on_link_lost: LinkLostReceiver,
        on_malformed: MalformedReceiver | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_link_lost = on_link_lost
        self._on_malformed = on_malformed

    # ------------------------------------------------------------------ link

    async def wait_for_device(self, timeout_s: float) -> None:
        deadline_s = self._clock.now_s() + timeout_s
        while not self._port_exists():
            if self._clock.now_s() >= deadline_s:
                raise DeviceNotFoundError(self.port, timeout_s=timeout_s, where="serial")
            await self._clock.sleep(PORT_POLL_INTERVAL_S)

    def _port_exists(self) -> bool:
        # One stat of a device node: cheap enough to do on the event loop.
        return os.path.exists(self.port)

    async def connect(self) -> None:
        if self._fd is not None:
            return
        try:
            port = serial.Serial(self.port, self._baudrate, timeout=0, write_timeout=0)
        except (serial.SerialException, OSError, ValueError) as exc:
            if not self._port_exists():
                raise DeviceNotFoundError(self.port, where="serial") from exc
            raise TransportError(f"cannot open: {exc}", device=self.description) from exc
        # The decoder restarts with the link: a partial frame from before is garbage.
        self._decoder = FrameDecoder()
        self._out.clear()
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

    async def disconnect(self) -> None:
        self._close()

    def _close(self) -> None:
        fd, port = self._fd, self._serial
        self._fd, self._serial = None, None
        if fd is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            self._waiting_writable = False
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError) as exc:
                _LOGGER.debug("%s: close: %s", self.description, exc)
        if self._info_waiter is not None and not self._info_waiter.done():
            self._info_waiter.set_exception(
                ConnectionLostError("closed during GET_INFO", device=self.description)
            )

    def _lost(self, reason: str) -> None:
        _LOGGER.info("%s: link lost (%s)", self.description, reason)
        self._close()
        if self._on_link_lost is not None:
            self._on_link_lost()

    # ------------------------------------------------------------------ receive

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _HANGUP_ERRNOS:
                self._lost(os.strerror(exc.errno or 0))
                return
            raise
        if not data:
            self._lost("end of file")
            return
        messages, errors = self._decoder.feed(data)
        for error in errors:
            self.malformed_frames += 1
            _LOGGER.warning("%s: dropped a malformed frame: %s", self.description, error)
            if self._on_malformed is not None:
                self._on_malformed(error)
        for message in messages:
            if self._take_info_ack(message):
                continue
            if self._on_message is not None:
                self._on_message(message)

    def _take_info_ack(self, message: bytes) -> bool:
        waiter = self._info_waiter
        if waiter is None or waiter.done() or not message or message[0] != MessageType.ACK:
            return False
        try:
            ack = Ack.decode(message)
        except ProtocolError:
            return False
        if ack.command_id != TRANSPORT_COMMAND_ID:
            return False
        waiter.set_result(ack)
        return True

    # ------------------------------------------------------------------ send

    async def write_control(self, data: bytes) -> None:
        self._write(encode_frame(data))

    def write_control_nowait(self, data: bytes) -> None:
        """The same write from synchronous code: the frame goes to the fd before returning.

        (What is left when the kernel buffer is full goes out when the port is writable.)
        A safety stop decided inside a receive callback is on the line at once.
        """
        self._write(encode_frame(data))

    async def write_program_chunk(self, data: bytes) -> None:
        # One line carries every message; the device tells a chunk apart by its type.
        self._write(encode_frame(data))

    def _write(self, frame: bytes) -> None:
        if self._fd is None:
            raise NotConnectedError("not connected", device=self.description)
        self._out += frame
        if not self._waiting_writable:  # else it goes out, in order, when the port drains
            self._flush()

    def _flush(self) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            while self._out:
                written = os.write(fd, self._out)
                del self._out[:written]
        except BlockingIOError:
            # The kernel buffer is full: finish when the port is writable again.
            if not self._waiting_writable:
                asyncio.get_running_loop().add_writer(fd, self._flush)
                self._waiting_writable = True
            return
        except OSError as exc:
            self._lost(f"write: {exc}")
            raise ConnectionLostError(f"write failed: {exc}", device=self.description) from exc
        if self._waiting_writable:
            asyncio.get_running_loop().remove_writer(fd)
            self._waiting_writable = False

    async def read_device_info(self) -> DeviceInfo:
        if self._fd is None:
            raise NotConnectedError("not connected", device=self.description)
        waiter: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._info_waiter = waiter
        try:
            self._write(encode_frame(Command.of(TRANSPORT_COMMAND_ID, GetInfo()).encode()))
            ack = await wait_for(self._clock, asyncio.shield(waiter), self._info_timeout_s)
        except TimeoutError:
            raise CommandTimeoutError(
                command_id=TRANSPORT_COMMAND_ID,
                opcode=GetInfo.opcode,
                timeout_s=self._info_timeout_s,
                device=self.description,
            ) from None
        finally:
            self._info_waiter = None
        if not ack.ok:
            raise CommandRejectedError(
                command_id=ack.command_id,
                opcode=ack.opcode,
                result=ack.result,
                device=self.description,
                payload=ack.payload,
            )
        try:
            profile = DeviceProfile.decode(ack.payload)
        except FrameError as exc:
            raise TransportError(
                f"unreadable device profile: {exc}", device=self.description
            ) from exc
        # The serial link has no battery characteristic; the session learns the
        # level from telemetry samples.
        return DeviceInfo(
            serial_number=profile.serial_number,
            model_number=profile.model_number,
            firmware_revision=profile.firmware_revision,
            hardware_revision=profile.hardware_revision,
            manufacturer_name=profile.manufacturer_name,
            battery_percent=None,
            profile=profile,
        )
