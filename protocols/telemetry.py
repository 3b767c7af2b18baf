"""Telemetry batches: a 10-byte header and fixed-size samples, decoded with numpy.

One notification carries one batch::

    offset size field
    0      1    message type (0x10 TELEMETRY)
    1      1    bits 0-3 sample format, bit 7 backfill flag, bits 4-6 zero
    2      4    sequence number of the first sample (u32, wraps)
    6      4    device time of the first sample in ms (u32, wraps)
    10     n*k  n samples of k bytes each (k set by the format)

Samples are contiguous at the device's sample rate, so sample ``i`` has
sequence ``first_sequence + i`` and time ``device_time_ms + i * 1000 / rate``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from mypy_extensions import mypyc_attr

from protocols.constants import (
    CENTI_C_PER_C,
    CENTI_MW_CM2_PER_MW_CM2,
    DAPA_PER_KPA,
    MessageType,
    SampleFormat,
)
from protocols.errors import FrameError, InvalidFieldError, TruncatedFrameError

BATCH_HEADER: Final = struct.Struct("<BBII")
BATCH_HEADER_BYTES: Final = BATCH_HEADER.size
_unpack_header: Final = BATCH_HEADER.unpack_from
BACKFILL_FLAG: Final = 0x80
_FORMAT_MASK: Final = 0x0F
_RESERVED_MASK: Final = 0x70

MASSAGER_SAMPLE_DTYPE: Final = np.dtype(
    [
        ("pressure_dapa", "<u2"),  # 10 Pa units: 0.01 kPa
        ("skin_temperature_centi_c", "<i2"),  # 0.01 °C
        ("battery_percent", "u1"),
        ("zone", "u1"),  # protocols.constants.Zone
        ("intensity", "u1"),  # 0..10
        ("mode", "u1"),  # protocols.constants.MassageMode
        ("flags", "u1"),  # MASSAGER_FLAG_*
    ]
)
MASSAGER_FLAG_CONTACT: Final = 0x01
MASSAGER_FLAG_MOTOR_ON: Final = 0x02
MASSAGER_FLAG_BUTTON_HELD: Final = 0x04
MASSAGER_FLAG_PROGRAM_RUNNING: Final = 0x08

LED_MASK_SAMPLE_DTYPE: Final = np.dtype(
    [
        ("red_centi_mw_cm2", "<u2"),  # 0.01 mW/cm²
        ("near_infrared_centi_mw_cm2", "<u2"),
        ("blue_centi_mw_cm2", "<u2"),
        ("skin_temperature_centi_c", "<i2"),
        ("battery_percent", "u1"),
        ("flags", "u1"),  # LED_MASK_FLAG_*
    ]
)
LED_MASK_FLAG_WORN: Final = 0x01
LED_MASK_FLAG_TREATMENT_RUNNING: Final = 0x02
LED_MASK_FLAG_PROGRAM_RUNNING: Final = 0x08

SAMPLE_DTYPES: Final[dict[SampleFormat, np.dtype[np.void]]] = {
    SampleFormat.MASSAGER_V1: MASSAGER_SAMPLE_DTYPE,
    SampleFormat.LED_MASK_V1: LED_MASK_SAMPLE_DTYPE,
}

SEQUENCE_MODULUS: Final = 1 << 32
_TELEMETRY_TYPE: Final = int(MessageType.TELEMETRY)


def sample_dtype(sample_format: SampleFormat) -> np.dtype[np.void]:
    return SAMPLE_DTYPES[sample_format]


# Hot-path lookups: plain ints and dicts, no enum construction or dtype attribute reads.
_SAMPLE_FORMAT_OF_CODE: Final[dict[int, SampleFormat]] = {int(f): f for f in SampleFormat}
_SAMPLE_SIZES: Final[dict[SampleFormat, int]] = {f: d.itemsize for f, d in SAMPLE_DTYPES.items()}


def max_samples_per_batch(sample_format: SampleFormat, payload_bytes: int) -> int:
    """How many samples fit in one notification of ``payload_bytes`` (ATT MTU - 3)."""
    count = (payload_bytes - BATCH_HEADER_BYTES) // _SAMPLE_SIZES[sample_format]
    return count if count > 0 else 0


# A plain Python class in the compiled build too (the module's functions are compiled):
# its __init__ writes the instance's __dict__, which a native class does not have.
@mypyc_attr(native_class=False)
@dataclass(frozen=True, eq=False)
class TelemetryBatch:
    """Samples of one notification (or several merged ones), in sequence order."""

    sample_format: SampleFormat
    first_sequence: int
    device_time_ms: int
    samples: npt.NDArray[np.void]
    backfill: bool = False

    # The generated __init__ of a frozen dataclass sets each field through
    # object.__setattr__; one batch is made per notification, so write them directly
    # (the same fields, values and order).
    def __init__(
        self,
        sample_format: SampleFormat,
        first_sequence: int,
        device_time_ms: int,
        samples: npt.NDArray[np.void],
        backfill: bool = False,
    ) -> None:
        fields = self.__dict__
        fields["sample_format"] = sample_format
        fields["first_sequence"] = first_sequence
        fields["device_time_ms"] = device_time_ms
        fields["samples"] = samples
        fields["backfill"] = backfill

    def __len__(self) -> int:
        return self.samples.shape[0]  # type: ignore[no-any-return]  # an int: no int()

    @property
    def sequences(self) -> npt.NDArray[np.uint64]:
        """Sequence number of every sample, unwrapped past 2**32 where needed."""
        return np.uint64(self.first_sequence) + np.arange(len(self), dtype=np.uint64)

    @property
    def end_sequence(self) -> int:
        """One past the last sample's sequence number (not wrapped)."""
        return self.first_sequence + len(self)

    def encode(self) -> bytes:
        expected = SAMPLE_DTYPES[self.sample_format]
        if self.samples.dtype != expected:
            raise ValueError(f"samples have dtype {self.samples.dtype}, format needs {expected}")
        return encode_batch(
            self.sample_format,
            self.first_sequence,
            self.device_time_ms,
            self.samples.tobytes(),
            self.backfill,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TelemetryBatch):
            return NotImplemented
        return (
            self.sample_format == other.sample_format
            and self.first_sequence == other.first_sequence
            and self.device_time_ms == other.device_time_ms
            and self.backfill == other.backfill
            and self.samples.dtype == other.samples.dtype
            and np.array_equal(self.samples, other.samples)
        )

    __hash__ = None  # type: ignore[assignment]


def encode_batch(
    sample_format: SampleFormat,
    first_sequence: int,
    device_time_ms: int,
    sample_bytes: bytes | bytearray,
    backfill: bool = False,
) -> bytes:
    """One TELEMETRY message of samples given as their bytes (of ``sample_format``'s
    layout): what :meth:`TelemetryBatch.encode` gives for them, without an array and a batch
    object (a device sends its ring's bytes as they are). Sequence and time wrap at 2**32."""
    # Plain ints: struct packs an enum member through __index__, several times slower.
    header = BATCH_HEADER.pack(
        _TELEMETRY_TYPE,
        int(sample_format) | (BACKFILL_FLAG if backfill else 0),
        first_sequence % SEQUENCE_MODULUS,
        device_time_ms % SEQUENCE_MODULUS,
    )
    return header + sample_bytes


def _decode_header(data: bytes | bytearray | memoryview) -> tuple[SampleFormat, bool, int, int]:
    if len(data) < BATCH_HEADER_BYTES:
        raise TruncatedFrameError(
            what="telemetry batch", needed=BATCH_HEADER_BYTES, got=len(data), data=bytes(data)
        )
    message_type, format_byte, first_seq, time_ms = _unpack_header(data)
    if message_type != _TELEMETRY_TYPE:
        raise InvalidFieldError(
            f"0x{message_type:02x} is not TELEMETRY",
            what="telemetry batch",
            field="type",
            data=bytes(data),
        )
    if format_byte & _RESERVED_MASK:
        raise InvalidFieldError(
            f"reserved bits set in 0x{format_byte:02x}",
            what="telemetry batch",
            field="format",
            data=bytes(data),
        )
    # A dict of the members: SampleFormat(code) gives the same member, several times slower.
    sample_format = _SAMPLE_FORMAT_OF_CODE.get(format_byte & _FORMAT_MASK)
    if sample_format is None:
        raise InvalidFieldError(
            f"unknown sample format {format_byte & _FORMAT_MASK}",
            what="telemetry batch",
            field="format",
            data=bytes(data),
        )
    return sample_format, format_byte & BACKFILL_FLAG != 0, first_seq, time_ms


def decode_batch(data: bytes | bytearray | memoryview) -> TelemetryBatch:
    """Decode one notification; the samples are a read-only view on a copy of ``data``."""
    sample_format, backfill, first_seq, time_ms = _decode_header(data)
    body_len = len(data) - BATCH_HEADER_BYTES
    if body_len == 0 or body_len % _SAMPLE_SIZES[sample_format]:
        raise FrameError(
            f"{body_len} sample bytes is not a positive multiple of the "
            f"{_SAMPLE_SIZES[sample_format]}-byte {sample_format.name} sample",
            what="telemetry batch",
            data=bytes(data),
        )
    # Positional arguments: numpy parses keywords of frombuffer far more slowly.
    samples = np.frombuffer(bytes(data), SAMPLE_DTYPES[sample_format], -1, BATCH_HEADER_BYTES)
    return TelemetryBatch(sample_format, first_seq, time_ms, samples, backfill)


_FRAME_HEADER_FIELDS: Final = [
    ("message_type", "u1"),
    ("format", "u1"),
    ("first_sequence", "<u4"),
    ("device_time_ms", "<u4"),
]


def frames_dtype(sample_format: SampleFormat, samples_per_frame: int) -> np.dtype[np.void]:
    """A structured dtype for whole frames of one format and sample count."""
    return np.dtype(
        [*_FRAME_HEADER_FIELDS, ("samples", SAMPLE_DTYPES[sample_format], (samples_per_frame,))]
    )


@dataclass(frozen=True, eq=False)
class DecodedFrames:
    """Many frames of the same length decoded together (column arrays, one row per sample)."""

    sample_format: SampleFormat
    first_sequences: npt.NDArray[np.uint32]  # one per frame
    device_times_ms: npt.NDArray[np.uint32]  # one per frame
    backfill: npt.NDArray[np.bool_]  # one per frame
    samples: npt.NDArray[np.void]  # shape (frames * samples_per_frame,)

    @property
    def sequences(self) -> npt.NDArray[np.uint64]:
        per_frame = self.samples.shape[0] // max(1, self.first_sequences.shape[0])
        offsets = np.arange(per_frame, dtype=np.uint64)
        return (self.first_sequences.astype(np.uint64)[:, None] + offsets[None, :]).ravel()


def decode_frames(frames: Sequence[bytes]) -> DecodedFrames:
    """Decode many equal-length telemetry frames of one format in one vectorised call.

    This is the fast path for backfill and for recorded data; for mixed lengths
    decode groups of equal length or use :func:`decode_batch`.
    """
    if not frames:
        raise FrameError("no frames given", what="telemetry frames")
    length = len(frames[0])
    sample_format, _, _, _ = _decode_header(frames[0])
    size = SAMPLE_DTYPES[sample_format].itemsize
    per_frame, remainder = divmod(length - BATCH_HEADER_BYTES, size)
    if per_frame <= 0 or remainder:
        raise FrameError(
            f"{length}-byte frame does not hold whole {sample_format.name} samples",
            what="telemetry frames",
            data=frames[0],
        )
    joined = b"".join(frames)
    if len(joined) != length * len(frames):
        raise FrameError(
            "frames differ in length; group them by length first", what="telemetry frames"
        )
    records = np.frombuffer(joined, dtype=frames_dtype(sample_format, per_frame))
    bad_type = records["message_type"] != MessageType.TELEMETRY
    bad_format = (records["format"] & (_FORMAT_MASK | _RESERVED_MASK)) != int(sample_format)
    if bool(np.any(bad_type | bad_format)):
        index = int(np.argmax(bad_type | bad_format))
        raise InvalidFieldError(
            f"frame {index} has another message type or sample format",
            what="telemetry frames",
            field="type/format",
            data=frames[index],
        )
    # Copy the sample bytes as plain uint8 rows (a memcpy per row) and view them
    # with the sample dtype: much faster than reshaping the strided structured view.
    raw = np.frombuffer(joined, dtype=np.uint8).reshape(len(frames), length)
    samples = raw[:, BATCH_HEADER_BYTES:].copy().view(SAMPLE_DTYPES[sample_format]).reshape(-1)
    return DecodedFrames(
        sample_format,
        records["first_sequence"],
        records["device_time_ms"],
        (records["format"] & BACKFILL_FLAG) != 0,
        samples,
    )


def concatenate(batches: Sequence[TelemetryBatch]) -> TelemetryBatch:
    """Join consecutive batches of one format into one (they must be contiguous)."""
    if not batches:
        raise ValueError("no batches to concatenate")
    first = batches[0]
    expected = first.first_sequence
    for batch in batches:
        if batch.sample_format != first.sample_format:
            raise ValueError("batches of different sample formats")
        if batch.first_sequence != expected:
            raise ValueError(f"gap: expected sequence {expected}, got {batch.first_sequence}")
        expected = batch.end_sequence
    return TelemetryBatch(
        first.sample_format,
        first.first_sequence,
        first.device_time_ms,
        np.concatenate([b.samples for b in batches]),
        first.backfill,
    )


# --------------------------------------------------------------------------- physical units

PRESSURE_KPA_PER_UNIT: Final = 1 / DAPA_PER_KPA
TEMPERATURE_C_PER_UNIT: Final = 1 / CENTI_C_PER_C
IRRADIANCE_MW_CM2_PER_UNIT: Final = 1 / CENTI_MW_CM2_PER_MW_CM2


def pressure_kpa(samples: npt.NDArray[np.void]) -> npt.NDArray[np.float64]:
    return samples["pressure_dapa"].astype(np.float64) * PRESSURE_KPA_PER_UNIT


def skin_temperature_c(samples: npt.NDArray[np.void]) -> npt.NDArray[np.float64]:
    return samples["skin_temperature_centi_c"].astype(np.float64) * TEMPERATURE_C_PER_UNIT


def irradiance_mw_cm2(samples: npt.NDArray[np.void], channel: str) -> npt.NDArray[np.float64]:
    """``channel`` is ``"red"``, ``"near_infrared"`` or ``"blue"``."""
    return samples[f"{channel}_centi_mw_cm2"].astype(np.float64) * IRRADIANCE_MW_CM2_PER_UNIT
