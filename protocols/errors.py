"""Errors raised by the wire protocol.

Every decoder in :mod:`protocols` raises only :class:`ProtocolError` or one of
its subclasses, whatever bytes it is given::

    ProtocolError
    ├── FrameError                 a message or frame that cannot be decoded
    │   ├── TruncatedFrameError    fewer bytes than the layout needs
    │   ├── UnknownMessageTypeError
    │   ├── InvalidFieldError      a field outside its documented range
    │   ├── FramingError           serial: bad COBS encoding or oversized frame
    │   └── CrcMismatchError       serial: the CRC-32 does not match
    └── EncodeError                a value that cannot be encoded (caller bug)
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised by :mod:`protocols`."""


class FrameError(ProtocolError):
    """A received message or frame could not be decoded.

    ``what`` names the message or field being decoded, so that logs say where
    the bytes went wrong; ``data`` keeps (up to 64 bytes of) the offending input.
    """

    def __init__(self, message: str, *, what: str, data: bytes = b"") -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.data = bytes(data[:64])


class TruncatedFrameError(FrameError):
    """The input is shorter than the layout requires."""

    def __init__(self, *, what: str, needed: int, got: int, data: bytes = b"") -> None:
        super().__init__(f"needs {needed} bytes, got {got}", what=what, data=data)
        self.needed = needed
        self.got = got


class UnknownMessageTypeError(FrameError):
    """The first byte is not a message type this protocol version defines."""

    def __init__(self, message_type: int, *, data: bytes = b"") -> None:
        super().__init__(f"unknown message type 0x{message_type:02x}", what="message", data=data)
        self.message_type = message_type


class InvalidFieldError(FrameError):
    """A field holds a value outside its documented range."""

    def __init__(self, message: str, *, what: str, field: str, data: bytes = b"") -> None:
        super().__init__(f"field {field!r}: {message}", what=what, data=data)
        self.field = field


class FramingError(FrameError):
    """A serial frame is not valid COBS or exceeds the maximum frame size."""


class CrcMismatchError(FrameError):
    """A serial frame's CRC-32 does not match its contents."""

    def __init__(self, *, expected: int, actual: int, data: bytes = b"") -> None:
        super().__init__(
            f"CRC-32 mismatch: frame says 0x{expected:08x}, contents give 0x{actual:08x}",
            what="serial frame",
            data=data,
        )
        self.expected = expected
        self.actual = actual


class EncodeError(ProtocolError):
    """A value cannot be represented on the wire (a bug in the caller)."""
