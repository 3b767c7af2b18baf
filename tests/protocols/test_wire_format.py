"""Golden byte vectors: the exact layouts documented in docs/protocol.md."""

from __future__ import annotations

import numpy as np
import pytest

import protocols as p
from protocols.telemetry import max_samples_per_batch


def test_command_layout() -> None:
    command = p.Command.of(0x1234, p.SetIntensity(7))
    assert command.encode() == bytes.fromhex("01 3412 10 07")


def test_start_led_layout() -> None:
    body = p.StartLed(red_mw_cm2=25.0, near_infrared_mw_cm2=10.5, blue_mw_cm2=0, duration_s=600)
    assert p.Command.of(1, body).encode() == bytes.fromhex("01 0100 20 c409 1a04 0000 5802 0000")


def test_ack_layout() -> None:
    ack = p.Ack(
        0x1234, p.Opcode.REQUEST_BACKFILL, p.ResultCode.OK, p.BackfillReply(100, 20).encode()
    )
    assert ack.encode() == bytes.fromhex("02 3412 04 00 64000000 14000000")


def test_event_layout() -> None:
    event = p.Event(3, 1000, p.EventCode.CONTACT_CHANGED, b"\x01")
    assert event.encode() == bytes.fromhex("20 0300 e8030000 03 01")


def test_massager_batch_layout() -> None:
    samples = np.zeros(1, dtype=p.MASSAGER_SAMPLE_DTYPE)
    samples[0] = (550, 3340, 87, int(p.Zone.CHIN), 5, int(p.MassageMode.VIBRATION), 0x03)
    batch = p.TelemetryBatch(p.SampleFormat.MASSAGER_V1, 42, 5000, samples)
    assert batch.encode() == bytes.fromhex("10 01 2a000000 88130000 2602 0c0d 57 0a 05 01 03")
    backfilled = p.TelemetryBatch(p.SampleFormat.MASSAGER_V1, 42, 5000, samples, backfill=True)
    assert backfilled.encode()[1] == 0x81


def test_mask_batch_layout() -> None:
    samples = np.zeros(1, dtype=p.LED_MASK_SAMPLE_DTYPE)
    samples[0] = (2500, 1000, 0, 3500, 90, 0x03)
    batch = p.TelemetryBatch(p.SampleFormat.LED_MASK_V1, 1, 10, samples)
    assert batch.encode() == bytes.fromhex("10 02 01000000 0a000000 c409 e803 0000 ac0d 5a 03")


def test_serial_frame_layout() -> None:
    # COBS(message + CRC-32 little-endian) + 0x00; CRC-32 of b"\x05" is 0xa2681b02.
    assert p.encode_frame(b"\x05") == bytes.fromhex("06 05 021b68a2 00")


def test_crc_is_crc32_iso_hdlc() -> None:
    # The standard check value of CRC-32/ISO-HDLC (IEEE 802.3) over "123456789".
    frame = p.encode_frame(b"123456789")
    assert p.decode_frame_body(frame[:-1]) == b"123456789"
    assert frame[-5:-1] == bytes.fromhex("2639f4cb")


def test_one_sample_fits_the_default_mtu() -> None:
    payload = 23 - 3
    assert max_samples_per_batch(p.SampleFormat.MASSAGER_V1, payload) == 1
    assert max_samples_per_batch(p.SampleFormat.LED_MASK_V1, payload) == 1
    assert max_samples_per_batch(p.SampleFormat.MASSAGER_V1, 247 - 3) == 26


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", p.TruncatedFrameError),
        (b"\x99", p.UnknownMessageTypeError),
        (bytes.fromhex("10 01 00000000 00000000"), p.FrameError),  # no samples
        (bytes.fromhex("10 03 00000000 00000000 00"), p.InvalidFieldError),  # unknown format
        (bytes.fromhex("10 11 00000000 00000000") + bytes(9), p.InvalidFieldError),  # reserved bit
        (bytes.fromhex("10 01 00000000 00000000") + bytes(8), p.FrameError),  # partial sample
        (bytes.fromhex("02 0100"), p.TruncatedFrameError),
    ],
)
def test_malformed_messages_name_what_is_wrong(data: bytes, error: type[p.ProtocolError]) -> None:
    with pytest.raises(error) as info:
        p.decode_message(data)
    assert str(info.value)


def test_unknown_opcode_decodes_but_body_refuses() -> None:
    command = p.Command.decode(bytes.fromhex("01 0100 6e"))
    assert command.opcode == 0x6E
    with pytest.raises(p.InvalidFieldError, match="unknown opcode 0x6e"):
        command.body()


def test_parameters_are_checked() -> None:
    with pytest.raises(p.InvalidFieldError, match="level"):
        p.Command.decode(bytes.fromhex("01 0100 10 0b")).body()
    with pytest.raises(p.FrameError, match="START_STREAM parameters"):
        p.Command.decode(bytes.fromhex("01 0100 02 00")).body()
    with pytest.raises(p.EncodeError):
        p.SetIntensity(11).encode_params()


def test_unwrapped_sequences_cross_the_u32_boundary() -> None:
    samples = np.zeros(3, dtype=p.MASSAGER_SAMPLE_DTYPE)
    batch = p.TelemetryBatch(p.SampleFormat.MASSAGER_V1, 2**32 - 2, 0, samples)
    decoded = p.decode_batch(batch.encode())
    assert decoded.first_sequence == 2**32 - 2
    assert list(batch.sequences) == [2**32 - 2, 2**32 - 1, 2**32]
