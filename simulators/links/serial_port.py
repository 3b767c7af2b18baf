"""A simulated device on a real pseudo-terminal, so the host's pyserial code path runs.

The simulator holds the pty's master side (:class:`simulators.links.pty.RawPty`); the host
opens :attr:`PtySerialPort.path` like any USB serial adapter. Messages travel both ways
as ``encode_frame(message)`` frames.
"""

from __future__ import annotations

from typing import Final

from protocols import FrameDecoder, encode_frame
from protocols.serial_framing import MAX_MESSAGE_BYTES
from simulators.devices.device import SimulatedDevice
from simulators.devices.link import Channel
from simulators.links.pty import RawPty

# A UART that nobody reads drops data; so does this port beyond 1 MiB queued.
DEFAULT_MAX_BUFFERED_BYTES: Final = 1 << 20


class PtySerialPort(RawPty):
    """One device behind one pty. ``await start()``, give the host ``path``, ``await stop()``."""

    def __init__(
        self,
        device: SimulatedDevice,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        super().__init__("port")
        self.device = device
        self._max_message_bytes = max_message_bytes
        self._max_buffered_bytes = max_buffered_bytes
        self._decoder = FrameDecoder()
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frame_errors = 0

    def _started(self) -> None:
        self.device.clock.attach_io_link()
        self.device.attach_link(self)

    def _stopping(self) -> None:
        self.device.clock.detach_io_link()
        if self.device.link is self:
            self.device.detach_link()

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

    def _received(self, data: bytes) -> None:
        messages, errors = self._decoder.feed(data)
        self.frame_errors += len(errors)
        for message in messages:
            self.device.receive(Channel.CONTROL, message)

    def _write(self, frame: bytes) -> None:
        if self._master_fd is None:
            return
        if self._outgoing and len(self._outgoing) + len(frame) > self._max_buffered_bytes:
            self.frames_dropped += 1
            return
        self._send_bytes(frame)
        self.frames_sent += 1
