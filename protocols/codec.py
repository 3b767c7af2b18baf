"""Dispatch on the first byte: any received message to its typed form."""

from __future__ import annotations

from typing import Final, TypeAlias

from protocols.constants import MessageType
from protocols.errors import TruncatedFrameError, UnknownMessageTypeError
from protocols.messages import Ack, Command, Event, ProgramChunk
from protocols.telemetry import TelemetryBatch, decode_batch

AnyMessage: TypeAlias = Command | Ack | Event | ProgramChunk | TelemetryBatch

# Plain ints: comparing with an IntEnum member reads it off the class first, every time.
_TELEMETRY: Final = int(MessageType.TELEMETRY)
_ACK: Final = int(MessageType.ACK)
_EVENT: Final = int(MessageType.EVENT)
_COMMAND: Final = int(MessageType.COMMAND)
_PROGRAM_CHUNK: Final = int(MessageType.PROGRAM_CHUNK)


def decode_message(data: bytes | bytearray | memoryview) -> AnyMessage:
    """Decode one message; raises only :class:`protocols.errors.ProtocolError`."""
    raw = bytes(data)
    if not raw:
        raise TruncatedFrameError(what="message", needed=1, got=0)
    kind = raw[0]
    if kind == _TELEMETRY:
        return decode_batch(raw)
    if kind == _ACK:
        return Ack.decode(raw)
    if kind == _EVENT:
        return Event.decode(raw)
    if kind == _COMMAND:
        return Command.decode(raw)
    if kind == _PROGRAM_CHUNK:
        return ProgramChunk.decode(raw)
    raise UnknownMessageTypeError(kind, data=raw)


def encode_message(message: AnyMessage) -> bytes:
    return message.encode()
