"""Running summaries of a session's telemetry, for live displays and end-of-run tables."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from devicebridge.core.reassembly import TelemetryGap, TelemetryItem
from devicebridge.device.session import DeviceSession, Subscription
from protocols import SampleFormat, TelemetryBatch, Zone
from protocols.telemetry import (
    LED_MASK_FLAG_TREATMENT_RUNNING,
    MASSAGER_FLAG_CONTACT,
    irradiance_mw_cm2,
    pressure_kpa,
    skin_temperature_c,
)


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    name: str
    kind: str
    state: str
    samples: int
    gaps: int
    lost_samples: int
    backfilled_samples: int
    reconnects: int
    malformed: int
    battery_percent: int | None = None
    skin_temperature_c: float | None = None
    # Massager
    pressure_kpa: float | None = None
    contact: bool | None = None
    zone: str | None = None
    mean_pressure_kpa: float | None = None  # over the samples in contact with the skin
    # LED mask
    red_mw_cm2: float | None = None
    near_infrared_mw_cm2: float | None = None
    blue_mw_cm2: float | None = None
    treatment_running: bool | None = None
    max_skin_temperature_c: float | None = None


def zone_label(zone: int) -> str:
    try:
        return Zone(zone).name.lower()
    except ValueError:
        return str(zone)  # a zone code newer than this host


class TelemetryMonitor:
    """Consumes one session's telemetry (in its own task) and keeps running figures."""

    def __init__(self, session: DeviceSession, name: str, kind: str) -> None:
        self.session = session
        self.name = name
        self.kind = kind
        self.samples = 0
        self.sequences_ok = True  # every delivered sequence followed the previous one
        self._next_sequence: int | None = None
        self._pressure_sum_kpa = 0.0
        self._contact_samples = 0
        self._max_skin_c: float | None = None
        self._last: TelemetryBatch | None = None
        self._subscription: Subscription[TelemetryItem] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Subscribe now (before the session starts, to see every sample) and consume."""
        self._subscription = self.session.telemetry()
        self._task = asyncio.get_running_loop().create_task(self._consume(self._subscription))

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.aclose()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _consume(self, subscription: Subscription[TelemetryItem]) -> None:
        async for item in subscription:
            self.feed(item)

    def feed(self, item: TelemetryItem) -> None:
        if self._next_sequence is not None and item.first_sequence != self._next_sequence:
            self.sequences_ok = False
        self._next_sequence = item.end_sequence
        if isinstance(item, TelemetryGap):
            return
        samples = item.samples
        self.samples += len(item)
        temperatures = skin_temperature_c(samples)
        if len(temperatures):
            peak = float(temperatures.max())
            self._max_skin_c = peak if self._max_skin_c is None else max(self._max_skin_c, peak)
        if item.sample_format is SampleFormat.MASSAGER_V1:
            in_contact = (samples["flags"] & MASSAGER_FLAG_CONTACT) != 0
            self._pressure_sum_kpa += float(pressure_kpa(samples)[in_contact].sum())
            self._contact_samples += int(np.count_nonzero(in_contact))
        if not item.backfill:
            self._last = item

    def snapshot(self) -> DeviceSnapshot:
        stats = self.session.stats
        last = self._last
        values: dict[str, Any] = {}
        if last is not None and len(last):
            sample = last.samples[-1:]
            values["battery_percent"] = int(sample["battery_percent"][0])
            values["skin_temperature_c"] = float(skin_temperature_c(sample)[0])
            if last.sample_format is SampleFormat.MASSAGER_V1:
                values["pressure_kpa"] = float(pressure_kpa(sample)[0])
                values["contact"] = bool(sample["flags"][0] & MASSAGER_FLAG_CONTACT)
                zone = int(sample["zone"][0])
                values["zone"] = zone_label(zone)
            else:
                values["red_mw_cm2"] = float(irradiance_mw_cm2(sample, "red")[0])
                values["near_infrared_mw_cm2"] = float(
                    irradiance_mw_cm2(sample, "near_infrared")[0]
                )
                values["blue_mw_cm2"] = float(irradiance_mw_cm2(sample, "blue")[0])
                values["treatment_running"] = bool(
                    sample["flags"][0] & LED_MASK_FLAG_TREATMENT_RUNNING
                )
        else:
            values["battery_percent"] = self.session.battery_percent
        mean = self._pressure_sum_kpa / self._contact_samples if self._contact_samples else None
        base = DeviceSnapshot(
            name=self.name,
            kind=self.kind,
            state=self.session.state.value,
            samples=self.samples,
            gaps=stats.gaps,
            lost_samples=stats.lost_samples,
            backfilled_samples=stats.backfilled_samples,
            reconnects=stats.reconnects,
            malformed=stats.malformed,
            mean_pressure_kpa=mean,
            max_skin_temperature_c=self._max_skin_c,
        )
        return replace(base, **values)
