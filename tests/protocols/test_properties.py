"""Property-based tests of every decoder: arbitrary bytes raise only ProtocolError,
and encode then decode gives back the same message."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols as p
from protocols.messages import MAX_INTENSITY_LEVEL
from protocols.serial_framing import MAX_MESSAGE_BYTES
from protocols.telemetry import SAMPLE_DTYPES

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "decode_message": p.decode_message,
    "decode_batch": p.decode_batch,
    "Command.decode+body": lambda b: p.Command.decode(b).body(),
    "Ack.decode": p.Ack.decode,
    "Event.decode": p.Event.decode,
    "ProgramChunk.decode": p.ProgramChunk.decode,
    "DeviceProfile.decode": p.DeviceProfile.decode,
    "BackfillReply.decode": p.BackfillReply.decode,
    "AdvertisedIdentity.decode": p.AdvertisedIdentity.decode,
    "decode_frame_body": p.decode_frame_body,
    "decode_frames": lambda b: p.decode_frames([b, b]),
    "RequestBackfill.decode_params": p.RequestBackfill.decode_params,
    "SetIntensity.decode_params": p.SetIntensity.decode_params,
    "SetMode.decode_params": p.SetMode.decode_params,
    "SetZone.decode_params": p.SetZone.decode_params,
    "StartLed.decode_params": p.StartLed.decode_params,
    "ProgramBegin.decode_params": p.ProgramBegin.decode_params,
    "ProgramCommit.decode_params": p.ProgramCommit.decode_params,
}

# Bytes that start like real messages reach deeper branches than uniform noise.
_prefixes = st.sampled_from(
    [b"", b"\x01", b"\x02", b"\x10\x01", b"\x10\x02", b"\x10\x81", b"\x20", b"\x30"]
)
arbitrary_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda a, b: a + b, _prefixes, st.binary(max_size=300)),
)


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(data=arbitrary_bytes)
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_raise_only_protocol_error(name: str, data: bytes) -> None:
    with contextlib.suppress(p.ProtocolError):
        DECODERS[name](data)


@given(chunks=st.lists(st.binary(max_size=200), max_size=20))
@settings(max_examples=300, deadline=None)
def test_frame_decoder_never_raises(chunks: list[bytes]) -> None:
    decoder = p.FrameDecoder()
    for chunk in chunks:
        messages, errors = decoder.feed(chunk)
        assert all(isinstance(e, p.FrameError) for e in errors)
        assert all(isinstance(m, bytes) and m for m in messages)


# --------------------------------------------------------------------------- round trips

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
centi = st.integers(0, 0xFFFF).map(lambda v: v / 100)


def _samples(sample_format: p.SampleFormat, count: int, seed: int) -> np.ndarray:
    dtype = SAMPLE_DTYPES[sample_format]
    raw = np.random.default_rng(seed).integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return np.frombuffer(raw.tobytes(), dtype=dtype)


batches = st.builds(
    lambda fmt, count, seed, first, time_ms, backfill: p.TelemetryBatch(
        fmt, first, time_ms, _samples(fmt, count, seed), backfill
    ),
    st.sampled_from(list(p.SampleFormat)),
    st.integers(1, 40),
    st.integers(0, 2**32),
    u32,
    u32,
    st.booleans(),
)

command_bodies = st.one_of(
    st.sampled_from(
        [
            p.GetInfo(),
            p.StartStream(),
            p.StopStream(),
            p.Ping(),
            p.StopLed(),
            p.StopAll(),
            p.ProgramStart(),
            p.ProgramAbort(),
        ]
    ),
    st.builds(p.RequestBackfill, u32, u32),
    st.builds(p.SetIntensity, st.integers(0, MAX_INTENSITY_LEVEL)),
    st.builds(p.SetMode, st.sampled_from(list(p.MassageMode))),
    st.builds(p.SetZone, st.sampled_from(list(p.Zone))),
    st.builds(p.StartLed, centi, centi, centi, u16, st.integers(0, 0xFFFF).map(lambda v: v / 10)),
    st.builds(p.ProgramBegin, u16, u32, u32),
    st.builds(p.ProgramCommit, u16),
)

short_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16)


@given(batch=batches)
def test_telemetry_batch_round_trip(batch: p.TelemetryBatch) -> None:
    decoded = p.decode_message(batch.encode())
    assert decoded == batch


@given(batch=batches, copies=st.integers(1, 5))
def test_decode_frames_matches_per_frame_decoding(batch: p.TelemetryBatch, copies: int) -> None:
    frames = [batch.encode()] * copies
    many = p.decode_frames(frames)
    assert many.samples.shape[0] == len(batch) * copies
    assert np.array_equal(many.samples[: len(batch)], batch.samples)
    assert list(many.sequences[: len(batch)]) == list(batch.sequences)
    assert bool(many.backfill[0]) is batch.backfill


@given(command_id=u16, body=command_bodies)
def test_command_round_trip(command_id: int, body: p.CommandBody) -> None:
    command = p.Command.of(command_id, body)
    decoded = p.decode_message(command.encode())
    assert decoded == command
    assert isinstance(decoded, p.Command)
    assert decoded.body() == body


@given(
    command_id=u16,
    opcode=st.integers(0, 255),
    result=st.integers(0, 255),
    payload=st.binary(max_size=64),
)
def test_ack_round_trip_keeps_unknown_codes(
    command_id: int, opcode: int, result: int, payload: bytes
) -> None:
    ack = p.Ack(command_id, opcode, result, payload)
    decoded = p.decode_message(ack.encode())
    assert isinstance(decoded, p.Ack)
    assert (decoded.command_id, int(decoded.opcode), int(decoded.result), decoded.payload) == (
        command_id,
        opcode,
        result,
        payload,
    )


@given(seq=u16, time_ms=u32, code=st.integers(0, 255), payload=st.binary(max_size=32))
def test_event_round_trip(seq: int, time_ms: int, code: int, payload: bytes) -> None:
    event = p.Event(seq, time_ms, code, payload)
    decoded = p.decode_message(event.encode())
    assert isinstance(decoded, p.Event)
    assert (decoded.event_sequence, decoded.device_time_ms, int(decoded.code), decoded.payload) == (
        seq,
        time_ms,
        code,
        payload,
    )


@given(transfer_id=u16, offset=u32, data=st.binary(max_size=200))
def test_program_chunk_round_trip(transfer_id: int, offset: int, data: bytes) -> None:
    chunk = p.ProgramChunk(transfer_id, offset, data)
    assert p.decode_message(chunk.encode()) == chunk


@given(
    kind=st.sampled_from(list(p.DeviceKind)),
    caps=u32,
    rate=st.integers(1, 0xFFFF),
    ring=u32,
    strings=st.lists(short_text, min_size=5, max_size=5),
)
def test_device_profile_round_trip(
    kind: p.DeviceKind, caps: int, rate: int, ring: int, strings: list[str]
) -> None:
    profile = p.DeviceProfile(1, kind, p.Capability(caps), rate, ring, *strings)
    assert p.DeviceProfile.decode(profile.encode()) == profile


@given(first=u32, count=u32)
def test_backfill_reply_round_trip(first: int, count: int) -> None:
    reply = p.BackfillReply(first, count)
    assert p.BackfillReply.decode(reply.encode()) == reply


@given(
    kind=st.sampled_from(list(p.DeviceKind)),
    battery=st.one_of(st.none(), st.integers(0, 100)),
    busy=st.booleans(),
    pairing=st.booleans(),
    serial=st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789-", min_size=1, max_size=16),
)
def test_advertised_identity_round_trip(
    kind: p.DeviceKind, battery: int | None, busy: bool, pairing: bool, serial: str
) -> None:
    identity = p.AdvertisedIdentity(1, kind, battery, busy, pairing, serial)
    assert p.AdvertisedIdentity.decode(identity.encode()) == identity


@given(
    messages=st.lists(st.binary(min_size=1, max_size=MAX_MESSAGE_BYTES), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10_000), max_size=10),
)
@settings(deadline=None)
def test_serial_frames_survive_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(p.encode_frame(m) for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    decoder = p.FrameDecoder()
    received: list[bytes] = []
    for piece in pieces:
        got, errors = decoder.feed(piece)
        assert errors == []
        received.extend(got)
    assert received == messages


@given(
    message=st.binary(min_size=1, max_size=256),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_corrupted_frame_is_reported_and_next_frame_decodes(
    message: bytes, position: int, flip: int
) -> None:
    frame = bytearray(p.encode_frame(message))
    index = position % (len(frame) - 1)  # never the delimiter
    frame[index] ^= flip
    follow_up = p.encode_frame(b"\x05next")
    decoder = p.FrameDecoder()
    messages, errors = decoder.feed(bytes(frame) + follow_up)
    # The corruption may turn a byte into a delimiter, splitting the frame in two:
    # every piece is reported, never decoded into a wrong message, and the next frame decodes.
    assert messages[-1] == b"\x05next"
    assert message not in messages[:-1]
    assert len(errors) >= 1
