"""Dispatch on the first byte: any received message to its typed form."""

from __future__ import annotations

from typing import TypeAlias

from protocols.constants import MessageType
from protocols.errors import TruncatedFrameError, UnknownMessageTypeError
from protocols.messages import Ack, Command, Event, ProgramChunk
from protocols.telemetry import TelemetryBatch, decode_batch

AnyMessage: TypeAlias = Command | Ack | Event | ProgramChunk | TelemetryBatch


def decode_message(data: bytes | bytearray | memoryview) -> AnyMessage:
    """Decode one message; raises only :class:`protocols.errors.ProtocolError`."""
    raw = bytes(data)
    if not raw:
        raise TruncatedFrameError(what="message", needed=1, got=0)
    kind = raw[0]
    if kind == MessageType.TELEMETRY:
        return decode_batch(raw)
    if kind == MessageType.ACK:
        return Ack.decode(raw)
    if kind == MessageType.EVENT:
        return Event.decode(raw)
    if kind == MessageType.COMMAND:
        return Command.decode(raw)
    if kind == MessageType.PROGRAM_CHUNK:
        return ProgramChunk.decode(raw)
    raise UnknownMessageTypeError(kind, data=raw)


def encode_message(message: AnyMessage) -> bytes:
    return message.encode()
