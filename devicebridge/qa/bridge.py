"""A running bridge connected to simulated devices: what QA tests and scenarios drive.

:class:`QaBridge` wires the bridge's real parts the way ``devicebridge run`` does (bleak
transport over the simulator backend, ``DeviceSession``, ``RoutineRunner``, one
``SessionStore`` per device, since every simulated device stands for one person) on the
world's virtual clock, and keeps an event timeline of everything that happened, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from devicebridge.core.engine import Decision
from devicebridge.core.library import starter_routines, starter_text
from devicebridge.core.policy import SafetyPolicy, default_policy
from devicebridge.core.routine import Routine, parse_routine
from devicebridge.device.session import DeviceSession, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport, DiscoveredDevice, scan
from devicebridge.errors import DeviceBridgeError, DeviceNotFoundError, QaError
from devicebridge.run.runner import RoutineRunner, RunMode
from devicebridge.run.summary import RunSummary
from devicebridge.storage.sessions import SessionStore
from protocols import Event, EventCode
from simulators import SimulatedDevice, SimulatedWorld, VirtualClock

SCAN_S: Final = 0.5
# The calendar time of virtual time 0: stored records get reproducible timestamps.
VIRTUAL_EPOCH: Final = datetime(2025, 1, 1, tzinfo=UTC)


def load_routine(spec: str, policy: SafetyPolicy, *, base_dir: Path | None = None) -> Routine:
    """A starter routine by name (``firming``) or a routine file (relative to ``base_dir``)."""
    text = starter_text(spec)
    if text is not None:
        return parse_routine(text, policy, label=spec)
    path = Path(spec)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        names = sorted(starter_routines())
        raise QaError(
            f"routine {spec!r}: no starter routine of that name ({', '.join(names)}) "
            f"and no file {path} ({exc.strerror or exc})"
        ) from exc
    return parse_routine(text, policy, label=str(path))


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One thing that happened, at a virtual time."""

    t_s: float
    source: str  # fault, device, bridge
    device: str
    what: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "t_s": self.t_s,
            "source": self.source,
            "device": self.device,
            "what": self.what,
            "detail": self.detail,
        }


class Timeline:
    """The ordered record of a run (faults, device events, the bridge's decisions)."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.entries: list[TimelineEntry] = []

    def add(self, source: str, device: str, what: str, detail: str = "") -> None:
        self.entries.append(
            TimelineEntry(round(self.clock.now_s(), 6), source, device, what, detail)
        )

    def to_jsonl(self) -> str:
        return "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in self.entries)


def telemetry_digest(sequences: npt.NDArray[np.uint64], samples: npt.NDArray[np.void]) -> str:
    """SHA-256 of a stored session's sequences and raw samples (``SessionStore.telemetry``)."""
    digest = hashlib.sha256()
    digest.update(sequences.tobytes())
    digest.update(samples.tobytes())
    return digest.hexdigest()


class QaBridge:
    """The bridge, connected over the simulated BLE backend to devices of ``world``.

    ``labels`` names devices in the timeline (default: their serial numbers). Use as
    ``async with``; the world must be started and the clock driven (``clock.start()``).
    """

    def __init__(
        self,
        world: SimulatedWorld,
        *,
        workdir: Path,
        seed: int | None = None,
        policy: SafetyPolicy | None = None,
        labels: Mapping[SimulatedDevice, str] | None = None,
    ) -> None:
        self.world = world
        self.clock = world.clock
        self.workdir = workdir
        self.seed = world.seed if seed is None else seed
        self.policy = policy or default_policy()
        self.timeline = Timeline(self.clock)
        self._labels = dict(labels or {})
        self.backends = BleBackends(world.scanner_backend, world.client_backend)
        self.sessions: dict[SimulatedDevice, DeviceSession] = {}
        self.stores: dict[SimulatedDevice, SessionStore] = {}
        self.runners: dict[SimulatedDevice, RoutineRunner] = {}
        self._event_tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> QaBridge:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def label(self, device: SimulatedDevice) -> str:
        return self._labels.get(device, device.serial_number)

    def now(self) -> datetime:
        """Calendar time from the virtual clock, so stored records are reproducible."""
        return VIRTUAL_EPOCH + timedelta(seconds=self.clock.now_s())

    # ------------------------------------------------------------------ connecting

    async def connect(
        self, devices: Iterable[SimulatedDevice] | None = None, *, scan_s: float = SCAN_S
    ) -> list[DeviceSession]:
        """Find the devices with one scan and start a session with each (in parallel)."""
        wanted = list(self.world.devices if devices is None else devices)
        found = {d.address: d for d in await scan(self.clock, scan_s, self.backends.scanner)}
        sessions: list[DeviceSession] = []
        for device in wanted:
            discovered = found.get(device.address)
            if discovered is None:
                raise DeviceNotFoundError(self.label(device), timeout_s=scan_s, where="qa scan")
            sessions.append(self._session(device, discovered))
        await asyncio.gather(*(s.start() for s in sessions))
        for device in wanted:
            self.timeline.add("bridge", self.label(device), "connected", device.serial_number)
        return sessions

    def _session(self, device: SimulatedDevice, discovered: DiscoveredDevice) -> DeviceSession:
        label = self.label(device)
        cls = session_class_for(discovered.kind)
        session = cls(
            BleTransport(self.clock, device=discovered, backends=self.backends),
            self.clock,
            # Per device, not drawn in connection order: a device's run must not depend
            # on which other devices share the bridge (a fleet split over processes).
            rng=random.Random(f"{self.seed}/{device.serial_number}"),
            name=label,
        )
        self.sessions[device] = session
        events = session.events()
        self._event_tasks.append(
            asyncio.get_running_loop().create_task(
                self._watch_events(label, events), name=f"qa events {label}"
            )
        )
        return session

    async def _watch_events(self, label: str, events: Any) -> None:
        async for event in events:
            self.timeline.add("device", label, "event", _event_text(event))

    def session(self, device: SimulatedDevice) -> DeviceSession:
        try:
            return self.sessions[device]
        except KeyError:
            raise QaError(f"{self.label(device)} is not connected to the bridge") from None

    def store(self, device: SimulatedDevice) -> SessionStore:
        """The session store of one device (one person): a SQLite file in ``workdir``."""
        store = self.stores.get(device)
        if store is None:
            store = SessionStore(self.workdir / f"{_file_safe(self.label(device))}.sqlite3")
            self.stores[device] = store
        return store

    # ------------------------------------------------------------------ routines

    def routine(self, spec: str | Routine, *, base_dir: Path | None = None) -> Routine:
        if isinstance(spec, Routine):
            return spec
        return load_routine(spec, self.policy, base_dir=base_dir)

    async def run_routine(
        self,
        device: SimulatedDevice,
        routine: str | Routine,
        *,
        max_duration_s: float | None = None,
    ) -> RunSummary:
        """Run a routine on a connected device the way ``devicebridge run`` does; store it."""
        session = self.session(device)
        label = self.label(device)
        runner = RoutineRunner(
            session,
            self.routine(routine),
            self.policy,
            store=self.store(device),
            clock=self.clock,
            now=self.now,
            device_serial=device.serial_number,
            mode=RunMode.HOST,
            on_decision=lambda d: self._decision(label, d),
        )
        self.runners[device] = runner
        self.timeline.add("bridge", label, "routine", runner.routine.name)
        result = await runner.run(max_duration_s=max_duration_s)
        self.timeline.add("bridge", label, "session", f"{result.status}: {result.end_reason}")
        return result

    def _decision(self, label: str, decision: Decision) -> None:
        self.timeline.add(
            "bridge",
            label,
            f"decision {decision.kind.value}",
            f"{decision.reason} step {decision.step} at {decision.at_s:.2f} s",
        )

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        for session in self.sessions.values():
            with contextlib.suppress(DeviceBridgeError):
                await session.close()
        for task in self._event_tasks:
            task.cancel()
        await asyncio.gather(*self._event_tasks, return_exceptions=True)
        self._event_tasks.clear()
        for store in self.stores.values():
            store.close()
        self.stores.clear()


def _event_text(event: Event) -> str:
    code = event.code
    name = code.name if isinstance(code, EventCode) else f"0x{int(code):02x}"
    return f"{name} {event.payload.hex()}".strip()


def _file_safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
