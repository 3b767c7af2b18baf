"""The console under the broker ACL of docs/clinic.md (with the bridges' lines of
docs/mqtt.md), enforced by a real Mosquitto: it reads every bridge and pushes programs,
and nothing else."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiomqtt
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select

from devicebridge.cli import main
from devicebridge.clinic import schema as t
from devicebridge.clinic.auth import Accounts
from devicebridge.clinic.authoring import queue_pushes
from devicebridge.clinic.ingest import Ingester, IngestSettings, IngestStore
from devicebridge.core.policy import default_policy
from devicebridge.core.signed_program import key_id, load_public_key
from devicebridge.integrations.mqtt import MqttSettings, Topics
from tests.broker import Mosquitto
from tests.clinic.rig import SHORT_ROUTINE, count, data_dir, start_with_guided_massager, until
from tests.service.conftest import BRIDGE, WAIT_S, running, service_rig
from tests.service.test_acl import PASSWORDS, WATCHER, documented_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "clinic.md"
CONSOLE = "clinic-console"
PASSWORD = "secret-of-the-console"


def console_acl() -> str:
    """The console's block of docs/clinic.md, as a clinic would copy it."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", DOCS.read_text("utf-8"), flags=re.DOTALL)
    (block,) = [b for b in blocks if f"user {CONSOLE}" in b and "topic read" in b]
    return block


async def test_the_console_works_under_its_documented_acl_and_can_do_nothing_else(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, bridges_acl = documented_recipe()
    broker = Mosquitto(
        tmp_path,
        acl=bridges_acl + "\n" + console_acl(),
        passwords={**PASSWORDS, CONSOLE: PASSWORD},
        settings=settings,
    )
    broker.start()
    try:
        monkeypatch.setenv("DEVICEBRIDGE_KEY_DIR", str(tmp_path / "keys"))
        made = CliRunner().invoke(main, ["therapist", "keygen", "--id", "dr-lee"])
        public_key = made.output.split("public key:")[1].split()[0]
        lee = Accounts(engine).create("lee", "a long enough password", therapist_id="dr-lee")
        store = IngestStore(engine)
        mqtt = MqttSettings("127.0.0.1", broker.port, username=CONSOLE, password=PASSWORD)
        ingester = Ingester(store, IngestSettings(mqtt, "acl"))
        bridge_dir = data_dir(tmp_path)
        async with (
            running(ingester.run()),
            service_rig(
                bridge_dir,
                broker_port=broker.port,
                massagers=0,
                mqtt_username=BRIDGE,
                mqtt_password=PASSWORDS[BRIDGE],
            ) as rig,
        ):
            rig.service.programs.trust(key_id(load_public_key(public_key)), "dr-lee", public_key)
            await start_with_guided_massager(rig)
            # It reads the bridge's topics...
            await until(lambda: count(engine, t.devices) == 1)
            with engine.connect() as db:
                client = db.execute(select(t.clients.c.id)).scalar_one()
            # ...and its push reaches the bridge, whose answer comes back.
            queue_pushes(
                engine,
                user=lee,
                clients=[(client, BRIDGE)],
                program_text=SHORT_ROUTINE,
                policy=default_policy(),
            )
            ingester.push_queued()
            await until(lambda: count(engine, t.pushes, t.pushes.c.status == "accepted") == 1)
            # The console's account cannot speak for a bridge: the broker drops it.
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username=CONSOLE, password=PASSWORD
            ) as forger:
                await forger.publish(Topics(BRIDGE).availability, b"offline", qos=1)
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username=WATCHER, password=PASSWORDS[WATCHER]
            ) as watcher:
                await watcher.subscribe(Topics(BRIDGE).availability, qos=1)
                async with asyncio.timeout(WAIT_S):
                    async for message in watcher.messages:
                        assert message.payload == b"online"
                        break
            await rig.stop()
    finally:
        broker.stop()
