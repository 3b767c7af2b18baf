"""The device program format (protocols.program): golden bytes, round trips, any bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols as p
from protocols.constants import MAX_PROGRAM_STEPS
from protocols.program import HEADER_BYTES, LED_STEP_BYTES, MASSAGE_STEP_BYTES

# The example of docs/protocol.md section 7.
EXAMPLE = p.Program(
    p.DeviceKind.MASSAGER,
    p.ProgramLimits(
        session_length_cap_s=1200, skin_temperature_stop_centi_c=4300, no_contact_pause_ds=30
    ),
    (p.MassageProgramStep(p.Zone.CHEEK_LEFT, p.MassageMode.VIBRATION, 5, 600, 400, 1200, 1500),),
)
EXAMPLE_BYTES = bytes.fromhex(
    "4f465047 01 01 01 00 b004 cc10 1e00 0000"  # header
    "04 01 05 00 5802 9001 b004 dc05"  # cheek left, vibration 5, 60 s, 4-12 kPa, cap 15
)
LED_EXAMPLE_BYTES = bytes.fromhex(
    "4f465047 01 02 01 00 b004 cc10 1e00 0000"
    "c409 e803 0000 5802 0000 dc05 5802 0000"  # red 25, NIR 10 mW/cm2, 600 s, caps 15 / 6
)

u16 = st.integers(0, 0xFFFF)
limits = st.builds(
    p.ProgramLimits, st.integers(1, 0xFFFF), st.integers(-0x8000, 0x7FFF), st.integers(1, 0xFFFF)
)


@st.composite
def massage_steps(draw: st.DrawFn) -> p.MassageProgramStep:
    low = draw(st.integers(0, 0xFFFD))
    high = draw(st.integers(low + 1, 0xFFFE))
    cap = draw(st.integers(high, 0xFFFF))
    return p.MassageProgramStep(
        draw(st.sampled_from([z for z in p.Zone if z is not p.Zone.NONE])),
        draw(st.sampled_from([m for m in p.MassageMode if m is not p.MassageMode.OFF])),
        draw(st.integers(1, 10)),
        draw(st.integers(1, 0xFFFF)),
        low,
        high,
        cap,
    )


led_steps = st.builds(
    p.LedProgramStep, st.integers(1, 0xFFFF), u16, u16, st.integers(1, 0xFFFF), u16, u16, u16, u16
)
programs = st.one_of(
    st.builds(
        p.Program,
        st.just(p.DeviceKind.MASSAGER),
        limits,
        st.lists(massage_steps(), min_size=1, max_size=MAX_PROGRAM_STEPS).map(tuple),
    ),
    st.builds(
        p.Program,
        st.just(p.DeviceKind.LED_MASK),
        limits,
        st.lists(led_steps, min_size=1, max_size=MAX_PROGRAM_STEPS).map(tuple),
    ),
)


def test_golden_bytes_of_the_documented_examples() -> None:
    assert EXAMPLE.encode() == EXAMPLE_BYTES
    assert p.Program.decode(EXAMPLE_BYTES) == EXAMPLE
    assert p.program_crc32(EXAMPLE_BYTES) == 0x1FF71432
    led = p.Program.decode(LED_EXAMPLE_BYTES)
    assert led.device_kind is p.DeviceKind.LED_MASK
    (step,) = led.steps
    assert isinstance(step, p.LedProgramStep)
    assert (step.red_centi_mw_cm2, step.near_infrared_centi_mw_cm2, step.duration_s) == (
        2500,
        1000,
        600,
    )
    assert (step.red_dose_cap_centi_j_cm2, step.near_infrared_dose_cap_centi_j_cm2) == (1500, 600)
    assert led.encode() == LED_EXAMPLE_BYTES
    assert EXAMPLE.limits.skin_temperature_stop_c == 43.0
    assert EXAMPLE.limits.no_contact_pause_s == 3.0
    assert EXAMPLE.encoded_size == HEADER_BYTES + MASSAGE_STEP_BYTES
    assert led.encoded_size == HEADER_BYTES + LED_STEP_BYTES


@settings(max_examples=200)
@given(programs)
def test_round_trip(program: p.Program) -> None:
    data = program.encode()
    assert len(data) == program.encoded_size <= p.MAX_PROGRAM_BYTES
    assert p.Program.decode(data) == program


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        program = p.Program.decode(data)
    except p.ProtocolError:
        return
    assert program.encode() == data


@settings(max_examples=150)
@given(programs, st.data())
def test_corrupted_programs_decode_or_raise_protocol_error(
    program: p.Program, data: st.DataObject
) -> None:
    raw = bytearray(program.encode())
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut]), bytes(raw) + b"\x00"):
        try:
            decoded = p.Program.decode(candidate)
        except p.ProtocolError:
            continue
        assert decoded.encode() == candidate


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"XFPG" + EXAMPLE_BYTES[4:], "magic"),
        (EXAMPLE_BYTES[:4] + b"\x02" + EXAMPLE_BYTES[5:], "version"),
        (EXAMPLE_BYTES[:5] + b"\x07" + EXAMPLE_BYTES[6:], "device_kind"),
        (EXAMPLE_BYTES[:6] + b"\x00" + EXAMPLE_BYTES[7:], "step_count"),
        (EXAMPLE_BYTES[:16] + b"\x0e" + EXAMPLE_BYTES[17:], "steps[0].zone"),
        (EXAMPLE_BYTES[:17] + b"\x00" + EXAMPLE_BYTES[18:], "steps[0].mode"),
        (EXAMPLE_BYTES[:18] + b"\x0b" + EXAMPLE_BYTES[19:], "steps[0].intensity"),
        # band max 12 kPa above a cap of 10 kPa
        (EXAMPLE_BYTES[:26] + b"\xe8\x03", "steps[0].pressure_max_dapa"),
        (EXAMPLE_BYTES[:8] + b"\x00\x00" + EXAMPLE_BYTES[10:], "session_length_cap_s"),
    ],
)
def test_invalid_fields_say_which(data: bytes, field: str) -> None:
    with pytest.raises(p.InvalidFieldError) as caught:
        p.Program.decode(data)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_length_errors() -> None:
    with pytest.raises(p.TruncatedFrameError):
        p.Program.decode(EXAMPLE_BYTES[:10])
    with pytest.raises(p.TruncatedFrameError):
        p.Program.decode(EXAMPLE_BYTES[:-1])
    with pytest.raises(p.FrameError, match="after the last step"):
        p.Program.decode(EXAMPLE_BYTES + b"\x00")


def test_encoding_an_invalid_program_is_an_encode_error() -> None:
    step = EXAMPLE.steps[0]
    assert isinstance(step, p.MassageProgramStep)
    too_high = p.MassageProgramStep(step.zone, step.mode, 11, 600, 400, 1200, 1500)
    with pytest.raises(p.EncodeError, match="intensity"):
        p.Program(p.DeviceKind.MASSAGER, EXAMPLE.limits, (too_high,)).encode()
    with pytest.raises(p.EncodeError, match="LedProgramStep in a MASSAGER"):
        p.Program(
            p.DeviceKind.MASSAGER, EXAMPLE.limits, (p.LedProgramStep(1, 0, 0, 1, 0, 0, 0, 0),)
        ).encode()
    with pytest.raises(p.EncodeError, match="steps"):
        p.Program(p.DeviceKind.MASSAGER, EXAMPLE.limits, ()).encode()
    with pytest.raises(p.EncodeError, match="no channel is lit"):
        p.Program(
            p.DeviceKind.LED_MASK, EXAMPLE.limits, (p.LedProgramStep(0, 0, 0, 1, 0, 0, 0, 0),)
        ).encode()


def test_event_and_rejection_payloads() -> None:
    step = p.ProgramStepEvent(3, p.ProgramStepReason.STEP_DONE)
    assert step.encode() == b"\x03\x01"
    assert p.ProgramStepEvent.decode(b"\x03\x01") == step
    assert p.ProgramStepEvent.decode(b"\x03\x63").reason == 0x63  # unknown: kept as a number
    finished = p.ProgramFinishedEvent(p.ProgramEndReason.SESSION_CAP)
    assert finished.encode() == b"\x06"
    assert p.ProgramFinishedEvent.decode(b"\x06\xff") == finished  # trailing field ignored
    limit = p.HardLimitEvent(p.HardLimit.PRESSURE_CAP, 2)
    assert p.HardLimitEvent.decode(limit.encode()) == limit
    rejection = p.ProgramRejection(p.ProgramRejectReason.INCOMPLETE, 260)
    assert rejection.encode() == bytes.fromhex("02 04010000")
    assert p.ProgramRejection.decode(rejection.encode()) == rejection
    for decode, short in (
        (p.ProgramStepEvent.decode, b"\x01"),
        (p.ProgramFinishedEvent.decode, b""),
        (p.HardLimitEvent.decode, b"\x01"),
        (p.ProgramRejection.decode, b"\x02\x00"),
    ):
        with pytest.raises(p.TruncatedFrameError):
            decode(short)
    # Treatment reasons keep their codes in PROGRAM_FINISHED.
    for reason in p.TreatmentEndReason:
        assert p.ProgramEndReason[reason.name] == reason.value


def test_a_program_start_event_names_the_program_and_older_layouts_still_decode() -> None:
    from protocols import ProgramStepEvent, ProgramStepReason

    started = ProgramStepEvent(0, ProgramStepReason.STARTED, 0xDEADBEEF)
    assert started.encode() == bytes([0, 0]) + (0xDEADBEEF).to_bytes(4, "little")
    assert ProgramStepEvent.decode(started.encode()) == started
    # Without the CRC (a step change, or firmware before it): the same two bytes as before.
    step = ProgramStepEvent(2, ProgramStepReason.STEP_DONE)
    assert step.encode() == bytes([2, 1])
    assert ProgramStepEvent.decode(bytes([0, 0])).program_crc32 is None
