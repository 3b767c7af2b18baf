"""SMP over a serial console, on a pty of its own (Zephyr's "SMP over console" framing).

Each SMP message travels as ``base64(u16 length, message, u16 CRC-16/XMODEM)``
cut into lines: the first starts with ``06 09``, the rest with ``04 14``, each
ends with ``\\n``. Anything else on the line is console text and is ignored.
This is not the OFCP serial framing (COBS), hence a second pty per device.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Final

from simulators.links.pty import RawPty
from simulators.smp.constants import (
    SERIAL_CONTINUE,
    SERIAL_LINE_BYTES,
    SERIAL_LINE_END,
    SERIAL_START,
)
from simulators.smp.firmware import SmpFirmware

_U16: Final = struct.Struct("!H")
MAX_LINE_BYTES: Final = 4096  # a console line longer than this is noise: drop it


def crc16_xmodem(data: bytes) -> int:
    return binascii.crc_hqx(data, 0)


def encode_console_frame(message: bytes, line_bytes: int = SERIAL_LINE_BYTES) -> bytes:
    """``message`` as SMP console lines of at most ``line_bytes`` bytes each."""
    body = _U16.pack(len(message) + _U16.size) + message + _U16.pack(crc16_xmodem(message))
    encoded = base64.b64encode(body)
    per_line = ((line_bytes - len(SERIAL_START) - len(SERIAL_LINE_END)) // 4) * 4
    lines = []
    for index, start in enumerate(range(0, len(encoded), per_line)):
        marker = SERIAL_START if index == 0 else SERIAL_CONTINUE
        lines.append(marker + encoded[start : start + per_line] + SERIAL_LINE_END)
    return b"".join(lines)


class ConsoleFrameDecoder:
    """Incremental decoder of SMP console lines (``feed`` bytes, get whole messages)."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._frame: bytearray | None = None
        self._expected = 0
        self.errors = 0

    def feed(self, data: bytes) -> list[bytes]:
        messages = []
        for byte in data:
            if byte != SERIAL_LINE_END[0]:
                if len(self._line) < MAX_LINE_BYTES:
                    self._line.append(byte)
                continue
            line, self._line = bytes(self._line), bytearray()
            message = self._line_done(line.rstrip(b"\r"))
            if message is not None:
                messages.append(message)
        return messages

    def _line_done(self, line: bytes) -> bytes | None:
        marker, payload = line[:2], line[2:]
        if marker == SERIAL_START:
            self._frame = bytearray()
            self._expected = 0
        elif marker != SERIAL_CONTINUE or self._frame is None:
            return None  # console text
        try:
            self._frame += base64.b64decode(payload, validate=True)
        except binascii.Error:
            self.errors += 1
            self._frame = None
            return None
        if not self._expected and len(self._frame) >= _U16.size:
            self._expected = _U16.unpack_from(self._frame)[0] + _U16.size
        if not self._expected or len(self._frame) < self._expected:
            return None
        frame, self._frame = bytes(self._frame[: self._expected]), None
        message, crc = frame[_U16.size : -_U16.size], _U16.unpack(frame[-_U16.size :])[0]
        if crc16_xmodem(message) != crc:
            self.errors += 1
            return None
        return message


class SmpSerialPort(RawPty):
    """The SMP console of one device on a pty: ``await start()``, open ``path``, ``stop()``."""

    def __init__(self, firmware: SmpFirmware, *, line_bytes: int = SERIAL_LINE_BYTES) -> None:
        super().__init__("SMP port")
        self.firmware = firmware
        self.line_bytes = line_bytes
        self._decoder = ConsoleFrameDecoder()

    def _started(self) -> None:
        # The host's bytes take wall time through the pty: the fast clock must let them.
        self.firmware.clock.attach_io_link()

    def _stopping(self) -> None:
        self.firmware.clock.detach_io_link()

    @property
    def frame_errors(self) -> int:
        return self._decoder.errors

    def _received(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            self.firmware.handle(message, self._send)

    def _send(self, response: bytes) -> None:
        self._send_bytes(encode_console_frame(response, self.line_bytes))
