"""Telemetry decoding: numpy structured dtypes against a per-sample ``struct`` loop.

Both decode the same frames to the same numbers (checked before timing). Targets
(issue 2): numpy at least 20 times the loop and at least 10 million samples/s.
"""

from __future__ import annotations

import struct
import sys

import numpy as np

import protocols as p
from bench.report import best_of, print_table
from protocols.telemetry import BATCH_HEADER, max_samples_per_batch

FRAME_COUNT = 20_000
REPEATS = 5
TARGET_RATIO = 20.0
TARGET_SAMPLES_PER_S = 10e6
_SAMPLE = struct.Struct("<HhBBBBB")


def make_frames(samples_per_frame: int) -> list[bytes]:
    rng = np.random.default_rng(7)
    dtype = p.MASSAGER_SAMPLE_DTYPE
    byte_count = FRAME_COUNT * samples_per_frame * dtype.itemsize
    raw = rng.integers(0, 256, size=byte_count, dtype=np.uint8)
    samples = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(FRAME_COUNT, samples_per_frame)
    fmt = p.SampleFormat.MASSAGER_V1
    return [
        p.TelemetryBatch(fmt, i * samples_per_frame, i * 10, samples[i]).encode()
        for i in range(FRAME_COUNT)
    ]


def decode_with_struct_loop(frames: list[bytes]) -> list[tuple[int, ...]]:
    """The straightforward decoder: unpack the header, then every sample one by one."""
    out: list[tuple[int, ...]] = []
    header_size = BATCH_HEADER.size
    for frame in frames:
        _type, _fmt, first_seq, _time_ms = BATCH_HEADER.unpack_from(frame)
        for index, offset in enumerate(range(header_size, len(frame), _SAMPLE.size)):
            out.append((first_seq + index, *_SAMPLE.unpack_from(frame, offset)))
    return out


def decode_with_numpy(frames: list[bytes]) -> p.DecodedFrames:
    return p.decode_frames(frames)


def decode_with_numpy_per_frame(frames: list[bytes]) -> list[p.TelemetryBatch]:
    return [p.decode_batch(f) for f in frames]


def run() -> bool:
    rows = []
    passed = True
    for label, payload_bytes in (("MTU 247", 247 - 3), ("MTU 23", 23 - 3)):
        per_frame = max_samples_per_batch(p.SampleFormat.MASSAGER_V1, payload_bytes)
        frames = make_frames(per_frame)
        total = FRAME_COUNT * per_frame
        # Same numbers both ways before anything is timed.
        loop_rows = decode_with_struct_loop(frames[:50])
        fast = decode_with_numpy(frames[:50])
        assert [r[0] for r in loop_rows] == [int(s) for s in fast.sequences]
        assert [r[1] for r in loop_rows] == fast.samples["pressure_dapa"].tolist()
        assert [r[7] for r in loop_rows] == fast.samples["flags"].tolist()

        loop_s = best_of(REPEATS, lambda f=frames: decode_with_struct_loop(f))
        numpy_s = best_of(REPEATS, lambda f=frames: decode_with_numpy(f))
        per_frame_s = best_of(REPEATS, lambda f=frames: decode_with_numpy_per_frame(f))
        loop_rate, numpy_rate, per_frame_rate = total / loop_s, total / numpy_s, total / per_frame_s
        ratio = numpy_rate / loop_rate
        if label == "MTU 247":
            passed = ratio >= TARGET_RATIO and numpy_rate >= TARGET_SAMPLES_PER_S
        rows.append((label, per_frame, "struct loop (baseline)", loop_rate, 1.0))
        rows.append((label, per_frame, "numpy, one call", numpy_rate, ratio))
        per_frame_ratio = per_frame_rate / loop_rate
        rows.append((label, per_frame, "numpy, per frame", per_frame_rate, per_frame_ratio))
    print_table(
        f"telemetry decoding, {FRAME_COUNT:,} frames, best of {REPEATS} "
        f"(target at MTU 247: >= {TARGET_RATIO:.0f}x loop and "
        f">= {TARGET_SAMPLES_PER_S / 1e6:.0f} M samples/s)",
        ["link", "samples/frame", "decoder", "samples/s", "x loop"],
        rows,
    )
    print(f"decode target {'met' if passed else 'MISSED'}")
    return passed


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
