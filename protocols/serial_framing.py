"""Framing of protocol messages on a serial line: COBS with a CRC-32 and a 0x00 delimiter.

A frame on the wire is ``COBS(message + crc32_le(message)) + b"\\x00"``. COBS
(Cheshire & Baker, 1999) removes every zero byte from the encoded body, so the
zero delimiter resynchronises a receiver after any corruption; the CRC-32 is
the IEEE 802.3 polynomial as computed by :func:`zlib.crc32`.

The decoder is incremental and does no I/O: :meth:`FrameDecoder.feed` takes
whatever bytes arrived and returns the complete messages and the errors of the
frames that could not be decoded, so a bad frame never stops the stream.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Final

from cobs import cobs

from protocols.errors import CrcMismatchError, EncodeError, FrameError, FramingError

DELIMITER: Final = b"\x00"
CRC_BYTES: Final = 4
MAX_MESSAGE_BYTES: Final = 1024
# COBS adds one byte per 254 plus one; CRC and slack on top.
MAX_ENCODED_FRAME_BYTES: Final = MAX_MESSAGE_BYTES + CRC_BYTES + MAX_MESSAGE_BYTES // 254 + 2
_CRC: Final = struct.Struct("<I")


def encode_frame(message: bytes) -> bytes:
    """One delimited serial frame carrying ``message``."""
    if not message:
        raise EncodeError("cannot frame an empty message")
    if len(message) > MAX_MESSAGE_BYTES:
        raise EncodeError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
    body = message + _CRC.pack(zlib.crc32(message))
    return bytes(cobs.encode(body)) + DELIMITER


def decode_frame_body(encoded: bytes) -> bytes:
    """Decode one frame without its delimiter; raise :class:`FrameError` when bad."""
    if len(encoded) > MAX_ENCODED_FRAME_BYTES:
        raise FramingError(
            f"frame of {len(encoded)} bytes exceeds {MAX_ENCODED_FRAME_BYTES}",
            what="serial frame",
            data=encoded,
        )
    try:
        body = bytes(cobs.decode(encoded))
    except cobs.DecodeError as exc:
        raise FramingError(f"invalid COBS ({exc})", what="serial frame", data=encoded) from exc
    if len(body) <= CRC_BYTES:
        raise FramingError(
            f"{len(body)} decoded bytes leave no message after the CRC",
            what="serial frame",
            data=encoded,
        )
    message, crc_bytes = body[:-CRC_BYTES], body[-CRC_BYTES:]
    (expected,) = _CRC.unpack(crc_bytes)
    actual = zlib.crc32(message)
    if expected != actual:
        raise CrcMismatchError(expected=expected, actual=actual, data=encoded)
    return message


@dataclass
class FrameDecoder:
    """Incremental serial frame parser (feed bytes, get messages and errors).

    Bytes before the first delimiter after a start or an overflow are treated
    as a partial frame and reported as one error, so a receiver that joins a
    stream mid-frame reports at most one error and then locks on.
    """

    max_frame_bytes: int = MAX_ENCODED_FRAME_BYTES
    _buffer: bytearray = field(default_factory=bytearray)
    _discarding: bool = False
    frames_ok: int = 0
    frames_bad: int = 0

    def feed(self, data: bytes) -> tuple[list[bytes], list[FrameError]]:
        messages: list[bytes] = []
        errors: list[FrameError] = []
        start = 0
        while True:
            end = data.find(DELIMITER, start)
            if end < 0:
                self._append(data[start:], errors)
                break
            self._append(data[start:end], errors)
            start = end + 1
            if self._discarding:
                self._discarding = False
                self._buffer.clear()
                continue
            if not self._buffer:
                continue  # consecutive delimiters are allowed as idle fill
            encoded = bytes(self._buffer)
            self._buffer.clear()
            try:
                messages.append(decode_frame_body(encoded))
                self.frames_ok += 1
            except FrameError as exc:
                self.frames_bad += 1
                errors.append(exc)
        return messages, errors

    def _append(self, chunk: bytes, errors: list[FrameError]) -> None:
        if self._discarding or not chunk:
            return
        self._buffer += chunk
        if len(self._buffer) > self.max_frame_bytes:
            self.frames_bad += 1
            errors.append(
                FramingError(
                    f"no delimiter within {self.max_frame_bytes} bytes; discarding until the next",
                    what="serial frame",
                    data=bytes(self._buffer),
                )
            )
            self._buffer.clear()
            self._discarding = True
