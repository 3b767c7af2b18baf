"""Telemetry as MQTT messages: about one per device per second, cut by device time."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from devicebridge.core.reassembly import TelemetryGap
from protocols import (
    SampleFormat,
    TelemetryBatch,
)

LOG = logging.getLogger(__name__)


DEFAULT_TELEMETRY_BATCH_S: Final = 1.0


class TelemetryBatcher:
    """Cuts one device's ordered sample stream into messages of ``batch_s`` of samples.

    Messages are cut by sample count (device time), not by host time, so their size and
    boundaries do not depend on when batches reach the host. A gap ends the current
    message; it is reported in the ``gaps`` of the next one (samples before its
    ``first_sequence`` that are lost for good).
    """

    def __init__(
        self, serial: str, sample_format: SampleFormat, sample_rate_hz: float, batch_s: float
    ) -> None:
        self.serial = serial
        self.sample_format = sample_format
        self.sample_rate_hz = sample_rate_hz
        self.samples_per_message = max(1, round(sample_rate_hz * batch_s))
        # The samples are kept as their raw wire bytes in one growing buffer: a message
        # is then one slice and one base64 call, with no per-batch numpy concatenation
        # (structured-dtype concatenation costs more than the copy itself).
        self._format_name = sample_format.name.lower()
        self._buffer = bytearray()
        self._count = 0
        self._first_sequence = 0
        self._device_time_ms = 0
        self._gaps: list[dict[str, Any]] = []
        self.samples_published = 0

    def add(self, batch: TelemetryBatch) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._count and batch.first_sequence != self._first_sequence + self._count:
            out.extend(self.flush())  # not contiguous (should not happen after reassembly)
        if not self._count:
            self._first_sequence = batch.first_sequence
            self._device_time_ms = batch.device_time_ms
        samples = batch.samples
        # tobytes(): a buffer view of a structured array (``samples.data``) spells out its
        # record format on every call, several times what copying a batch costs.
        self._buffer += samples.tobytes()
        self._count += int(samples.shape[0])
        if self._count >= self.samples_per_message:
            per_message = self.samples_per_message
            message_bytes = per_message * samples.dtype.itemsize
            buffer = self._buffer
            offset = 0
            while self._count >= per_message:
                raw = bytes(buffer[offset : offset + message_bytes])
                out.append(
                    self._message(self._first_sequence, self._device_time_ms, per_message, raw)
                )
                offset += message_bytes
                self._first_sequence += per_message
                self._device_time_ms += round(per_message * 1000 / self.sample_rate_hz)
                self._count -= per_message
            del buffer[:offset]
        return out

    def gap(self, gap: TelemetryGap) -> list[dict[str, Any]]:
        out = self.flush()
        self._gaps.append(
            {
                "first_sequence": gap.first_sequence,
                "count": gap.sample_count,
                "reason": gap.reason.value,
            }
        )
        return out

    def flush(self, *, final: bool = False) -> list[dict[str, Any]]:
        if self._count:
            raw = bytes(self._buffer)
            message = self._message(self._first_sequence, self._device_time_ms, self._count, raw)
            self._buffer.clear()
            self._count = 0
            return [message]
        if final and self._gaps:
            return [self._message(self._first_sequence, self._device_time_ms, 0, b"")]
        return []

    def _message(
        self, first_sequence: int, device_time_ms: int, count: int, raw: bytes
    ) -> dict[str, Any]:
        gaps, self._gaps = self._gaps, []
        self.samples_published += count
        return {
            "serial": self.serial,
            "sample_format": self._format_name,
            "sample_rate_hz": self.sample_rate_hz,
            "first_sequence": first_sequence,
            "device_time_ms": device_time_ms,
            "count": count,
            "samples_b64": base64.b64encode(raw).decode("ascii"),
            "gaps": gaps,
        }


def decode_telemetry_message(body: Mapping[str, Any]) -> npt.NDArray[np.void]:
    """The samples of a telemetry message as a numpy structured array (for subscribers)."""
    from protocols.telemetry import SAMPLE_DTYPES

    sample_format = SampleFormat[str(body["sample_format"]).upper()]
    raw = base64.b64decode(str(body["samples_b64"]))
    return np.frombuffer(raw, dtype=SAMPLE_DTYPES[sample_format])
