"""The console's side of the tests: its store and ingester against a private Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, func, select

from devicebridge.clinic import schema as t
from devicebridge.clinic.ingest import Ingester, IngestSettings, IngestStore
from devicebridge.integrations.mqtt import MqttSettings
from devicebridge.qa.pytest_plugin import guided_massager
from devicebridge.service.worker import DeviceWorker
from tests.service.conftest import WAIT_S, Rig, paired

SHORT_ROUTINE = """\
[routine]
name = "Short firming"
author = "devicebridge tests"
version = "1.0"
device_kind = "massager"
category = "firming"
rationale = "Two short steps inside every policy limit, so that a run completes quickly."

[schedule]
max_sessions = 2
per_days = 7

[[steps]]
zone = "cheek_left"
contact_time_s = 8
mode = "vibration"
intensity = 4
pressure_kpa = { min = 4.0, max = 12.0 }
guidance = "Slow strokes."

[[steps]]
zone = "cheek_right"
contact_time_s = 8
mode = "vibration"
intensity = 4
pressure_kpa = { min = 4.0, max = 12.0 }
guidance = "Slow strokes."
"""


def count(engine: Engine, table: t.Table, *where: object) -> int:
    with engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


async def until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` (a database read) until it holds; the timeout is a hang net."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - other tasks and processes move it
            await asyncio.sleep(0.02)


@dataclass
class Console:
    engine: Engine
    store: IngestStore
    ingester: Ingester
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def ingesting(
    engine: Engine, port: int, *, console_id: str = "test"
) -> AsyncIterator[Console]:
    store = IngestStore(engine)
    ingester = Ingester(store, IngestSettings(MqttSettings("127.0.0.1", port), console_id))
    task = asyncio.create_task(ingester.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await ingester.connected.wait()
        yield Console(engine, store, ingester, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bridge"
    folder.mkdir(exist_ok=True)
    return folder


async def start_with_guided_massager(rig: Rig) -> DeviceWorker:
    """Start a bridge rig (made with ``massagers=0``) serving one massager held by a hand
    that follows the bridge's guidance (zone and pressure band), as a client does: its
    sessions complete instead of ending on the simulator's random pressure."""
    massager = guided_massager(rig.world)
    await rig.start()
    worker = rig.service.add_device(paired(massager))
    await rig.wait(lambda: worker.batcher is not None)
    await rig.wait_broker_connected()
    return worker
