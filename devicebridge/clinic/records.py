"""From MQTT messages to rows: the pure part of ingestion (no I/O).

:func:`parse_topic` places a message (which bridge, what, which device);
:func:`message_sequence` reads the ``n`` of its ``<bridge_id>:<n>`` id; and
:func:`digest_telemetry` turns one telemetry message into one row per zone (sample
count, contact, pressure mean/min/max, skin temperature, LED irradiance), which is
what the console keeps of a session's telemetry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np

from devicebridge.clinic.errors import RecordError
from devicebridge.core.policy import LED_CHANNELS
from devicebridge.service.telemetry import decode_telemetry_message
from protocols.constants import ZONE_NAMES
from protocols.telemetry import (
    IRRADIANCE_MW_CM2_PER_UNIT,
    LED_MASK_FLAG_WORN,
    MASSAGER_FLAG_CONTACT,
    PRESSURE_KPA_PER_UNIT,
    TEMPERATURE_C_PER_UNIT,
)

MASK_ZONE: Final = "face"
NO_ZONE: Final = "none"
MAX_TEXT: Final = 2000  # longest free text kept from a message (messages, details)
MAX_BIGINT: Final = 2**63 - 1
MAX_ID_CHARS: Final = 64  # serial numbers (and, at 128, bridge ids) longer are not ours
MIN_BIGINT: Final = -(2**63)

# What each topic under a bridge carries; the last part(s) of the topic name it.
BRIDGE_TOPICS: Final = {
    ("availability",): "availability",
    ("status",): "status",
    ("sessions", "summary"): "summary",
    ("programs", "push"): "push",
    ("programs", "ack"): "ack",
    ("programs", "installed"): "installed",
}
DEVICE_TOPICS: Final = {"state": "device_state", "telemetry": "telemetry", "events": "events"}


@dataclass(frozen=True, slots=True)
class Place:
    bridge_id: str
    kind: str  # availability, status, device_state, telemetry, events, summary, push, ...
    serial: str | None = None


def parse_topic(topic: str, root: str) -> Place | None:
    """Where a topic sits in the contract, or None for a topic the console ignores."""
    prefix = root.rstrip("/") + "/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix) :].split("/")
    if len(parts) < 2 or not parts[0]:
        return None
    bridge_id, rest = parts[0], tuple(parts[1:])
    if rest in BRIDGE_TOPICS:
        return Place(bridge_id, BRIDGE_TOPICS[rest])
    if len(bridge_id) > 2 * MAX_ID_CHARS:
        return None
    if (
        len(rest) == 3
        and rest[0] == "devices"
        and 0 < len(rest[1]) <= MAX_ID_CHARS
        and rest[2] in DEVICE_TOPICS
    ):
        return Place(bridge_id, DEVICE_TOPICS[rest[2]], rest[1])
    return None


def load_json(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RecordError("not a JSON object")
    return body


def message_sequence(body: Mapping[str, Any], bridge_id: str) -> int:
    """The ``n`` of ``message_id`` = ``<bridge_id>:<n>``; it must name the topic's bridge."""
    message_id = body.get("message_id")
    if not isinstance(message_id, str):
        raise RecordError("no message_id")
    owner, _, number = message_id.rpartition(":")
    if owner != bridge_id:
        raise RecordError(f"message_id {message_id!r} is not from bridge {bridge_id!r}")
    try:
        sequence = int(number)
    except ValueError as exc:
        raise RecordError(f"message_id {message_id!r} has no number") from exc
    if not 0 <= sequence <= MAX_BIGINT:
        raise RecordError(f"message_id {message_id!r} is out of range")
    return sequence


def text(value: Any, limit: int = MAX_TEXT) -> str | None:
    """At most ``limit`` characters, without NULs (PostgreSQL's text cannot hold them)."""
    if value is None:
        return None
    return str(value)[:limit].replace("\x00", "")


def integer(value: Any) -> int | None:
    """A whole number a BIGINT column holds, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not np.isfinite(value):
        return None
    result = int(value)
    return result if MIN_BIGINT <= result <= MAX_BIGINT else None


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if np.isfinite(result) else None


def moment(value: Any) -> datetime | None:
    """An ISO 8601 time with a zone, in UTC (naive or malformed times are dropped)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Stored as UTC: SQLite keeps no zone, so every stored time must be in the same one.
    return parsed.astimezone(UTC) if parsed.tzinfo is not None else None


def digest_telemetry(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per zone of one telemetry message (``session_series`` without the session)."""
    try:
        samples = decode_telemetry_message(body)
        first_sequence = int(body["first_sequence"])
        device_time_ms = int(body["device_time_ms"])
        rate_hz = float(body["sample_rate_hz"])
    except (KeyError, ValueError, TypeError) as exc:
        raise RecordError(f"unreadable telemetry: {exc}") from exc
    if not np.isfinite(rate_hz) or rate_hz <= 0:
        raise RecordError(f"sample_rate_hz {rate_hz!r} is not a positive number")
    if not (0 <= first_sequence <= MAX_BIGINT and 0 <= device_time_ms <= MAX_BIGINT):
        raise RecordError("first_sequence or device_time_ms out of range")
    return digest_samples(samples, first_sequence, device_time_ms, rate_hz)


def digest_samples(
    samples: np.ndarray[Any, Any], first_sequence: int, device_time_ms: int, rate_hz: float
) -> list[dict[str, Any]]:
    """One row per zone of a run of samples (massager or LED mask, by their fields)."""
    if samples.size == 0:
        return []
    base = {
        "first_sequence": first_sequence,
        "device_time_ms": device_time_ms,
        "sample_rate_hz": rate_hz,
    }
    names = samples.dtype.names or ()
    if "pressure_dapa" in names:
        return _massager_rows(samples, base)
    return [_mask_row(samples, base)]


def _massager_rows(samples: np.ndarray[Any, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    contact = (samples["flags"] & MASSAGER_FLAG_CONTACT) != 0
    zones = samples["zone"]
    for code in np.unique(zones).tolist():
        in_zone = zones == code
        touching = in_zone & contact
        pressure = samples["pressure_dapa"][touching].astype(np.float64) * PRESSURE_KPA_PER_UNIT
        temperature = samples["skin_temperature_centi_c"][in_zone] * TEMPERATURE_C_PER_UNIT
        rows.append(
            {
                **base,
                "zone": ZONE_NAMES.get(int(code), NO_ZONE),
                "samples": int(in_zone.sum()),
                "contact_samples": int(touching.sum()),
                "pressure_mean_kpa": round(float(pressure.mean()), 3) if pressure.size else None,
                "pressure_min_kpa": round(float(pressure.min()), 3) if pressure.size else None,
                "pressure_max_kpa": round(float(pressure.max()), 3) if pressure.size else None,
                "skin_temperature_max_c": round(float(temperature.max()), 2),
                "red_mw_cm2": None,
                "near_infrared_mw_cm2": None,
                "blue_mw_cm2": None,
            }
        )
    return rows


def _mask_row(samples: np.ndarray[Any, Any], base: dict[str, Any]) -> dict[str, Any]:
    worn = (samples["flags"] & LED_MASK_FLAG_WORN) != 0
    irradiance = {
        f"{ch}_mw_cm2": round(
            float(samples[f"{ch}_centi_mw_cm2"].mean() * IRRADIANCE_MW_CM2_PER_UNIT), 3
        )
        for ch in LED_CHANNELS
    }
    return {
        **base,
        "zone": MASK_ZONE,
        "samples": int(samples.size),
        "contact_samples": int(worn.sum()),
        "pressure_mean_kpa": None,
        "pressure_min_kpa": None,
        "pressure_max_kpa": None,
        "skin_temperature_max_c": round(
            float(samples["skin_temperature_centi_c"].max() * TEMPERATURE_C_PER_UNIT), 2
        ),
        **irradiance,
    }
