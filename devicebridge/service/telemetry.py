"""Telemetry as MQTT messages: about one per device per second, cut by device time, with
the device's events that restate its samples."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from devicebridge.core.reassembly import TelemetryGap
from protocols import (
    Event,
    EventCode,
    SampleFormat,
    TelemetryBatch,
)

LOG = logging.getLogger(__name__)


DEFAULT_TELEMETRY_BATCH_S: Final = 1.0

# Device events that say again what every sample carries (a massager's contact flag and
# zone field, a mask's worn flag): they ride in the device's next telemetry message, in its
# ``events``, instead of a message each (docs/mqtt.md). Every other event is one message
# on the device's events topic, at once.
SAMPLE_STATE_EVENTS: Final = frozenset({EventCode.CONTACT_CHANGED, EventCode.ZONE_CHANGED})


def event_fields(event: Event) -> dict[str, Any]:
    """One device event as it is published (on the events topic or in ``events``)."""
    code = event.code
    return {
        "code": code.name.lower() if isinstance(code, EventCode) else int(code),
        "event_sequence": event.event_sequence,
        "device_time_ms": event.device_time_ms,
        "payload_hex": event.payload.hex(),
    }


class TelemetryBatcher:
    """Cuts one device's ordered sample stream into messages of ``batch_s`` of samples.

    Messages are cut by sample count (device time), not by host time, so their size and
    boundaries do not depend on when batches reach the host. A gap ends the current
    message; it is reported in the ``gaps`` of the next one (samples before its
    ``first_sequence`` that are lost for good). Events given to :meth:`event` go out in the
    ``events`` of the next message, in the order they came.
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
        self._events: list[dict[str, Any]] = []
        self.samples_published = 0

    def event(self, event: Event) -> None:
        """A device event for the next message (see :data:`SAMPLE_STATE_EVENTS`)."""
        self._events.append(event_fields(event))

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
        """What is held, as a message: the samples gathered so far, or (without samples)
        the events waiting; the gaps waiting go out with the next samples, or now if
        ``final``."""
        if self._count:
            raw = bytes(self._buffer)
            message = self._message(self._first_sequence, self._device_time_ms, self._count, raw)
            self._buffer.clear()
            # Where the next samples would start, for a message without samples.
            self._first_sequence += self._count
            self._device_time_ms += round(self._count * 1000 / self.sample_rate_hz)
            self._count = 0
            return [message]
        if self._events or (final and self._gaps):
            return [self._message(self._first_sequence, self._device_time_ms, 0, b"")]
        return []

    def _message(
        self, first_sequence: int, device_time_ms: int, count: int, raw: bytes
    ) -> dict[str, Any]:
        gaps, self._gaps = self._gaps, []
        events, self._events = self._events, []
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
            "events": events,
        }


def decode_telemetry_message(body: Mapping[str, Any]) -> npt.NDArray[np.void]:
    """The samples of a telemetry message as a numpy structured array (for subscribers)."""
    from protocols.telemetry import SAMPLE_DTYPES

    sample_format = SampleFormat[str(body["sample_format"]).upper()]
    raw = base64.b64decode(str(body["samples_b64"]))
    return np.frombuffer(raw, dtype=SAMPLE_DTYPES[sample_format])
