"""A bridge service over simulated devices on a fast virtual clock, and MQTT helpers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicebridge.app import routine_hand_script
from devicebridge.core.policy import default_policy
from devicebridge.core.routine import Routine
from devicebridge.core.signed_program import key_id, public_key_bytes, sign_program
from devicebridge.device.session import DeviceSession, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport
from devicebridge.integrations.mqtt import MqttSettings
from devicebridge.run.runner import RunMode
from devicebridge.service.supervisor import BridgeService
from devicebridge.storage.lock import try_acquire
from devicebridge.storage.programs import PROGRAMS_FILENAME, ProgramStore
from devicebridge.storage.registry import PairedDevice
from protocols import DeviceKind
from simulators import SimulatedMassager, SimulatedWorld, VirtualClock
from simulators.devices.device import SimulatedDevice

SEED = 4242
WAIT_S = 30.0  # a safety net against hangs; results never depend on it
BRIDGE = "bridge-7"
ROUTINES = Path(__file__).resolve().parents[2] / "devicebridge" / "data" / "routines"


def paired(device: SimulatedDevice) -> PairedDevice:
    kind = device.profile.device_kind
    return PairedDevice(
        name=device.name,
        serial_number=device.serial_number,
        kind="massager" if kind == DeviceKind.MASSAGER else "led_mask",
        model="sim",
        transport="ble",
        last_address=device.address,
    )


def session_factory(world: SimulatedWorld) -> Callable[[PairedDevice], DeviceSession]:
    backends = BleBackends(world.scanner_backend, world.client_backend)
    rng = random.Random(SEED)

    def make(device: PairedDevice) -> DeviceSession:
        cls = session_class_for(DeviceKind.MASSAGER if device.kind == "massager" else 2)
        transport = BleTransport(
            world.clock,
            serial_number=device.serial_number,
            address=device.last_address,
            backends=backends,
            find_timeout_s=2.0,
        )
        return cls(transport, world.clock, rng=random.Random(rng.random()), name=device.name)

    return make


@dataclass
class Rig:
    clock: VirtualClock
    world: SimulatedWorld
    service: BridgeService
    data_dir: Path
    task: asyncio.Task[None] | None = None
    devices: list[SimulatedDevice] = field(default_factory=list)

    async def start(self) -> None:
        self.task = asyncio.create_task(self.service.run())
        async with asyncio.timeout(WAIT_S):
            await self.service.wait_started()

    async def stop(self) -> None:
        self.service.request_stop()
        if self.task is not None:
            async with asyncio.timeout(WAIT_S):
                await self.task

    async def wait_broker_connected(self) -> None:
        await self.wait(lambda: self.service.link is not None and self.service.link.connected)

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Let the fast clock run until ``predicate`` holds (wall timeout only as a net)."""
        async with asyncio.timeout(WAIT_S):
            while not predicate():  # noqa: ASYNC110 - virtual time moves by itself
                await asyncio.sleep(0.005)  # yields to the loop; virtual time drives the rest


@contextlib.asynccontextmanager
async def service_rig(
    data_dir: Path,
    *,
    massagers: int = 1,
    masks: int = 0,
    broker_port: int | None = None,
    home_assistant: bool = False,
    now: Callable[[], datetime] | None = None,
    with_devices: bool = True,
    mqtt_username: str | None = None,
    run_mode: RunMode = RunMode.AUTO,
    guide_hands: bool = False,
    mqtt_password: str | None = None,
) -> AsyncIterator[Rig]:
    clock = VirtualClock()
    world = SimulatedWorld(seed=SEED, clock=clock)
    sims: list[SimulatedDevice] = [world.add_massager() for _ in range(massagers)]
    sims += [world.add_mask() for _ in range(masks)]
    mqtt = (
        MqttSettings(
            "127.0.0.1",
            broker_port,
            username=mqtt_username,
            password=mqtt_password,
            reconnect_initial_s=0.5,
            reconnect_max_s=2.0,
        )
        if broker_port
        else None
    )
    by_serial = {d.serial_number: d for d in sims}

    def guide_hand(serial: str, routine: Routine) -> None:
        # As `serve --simulate` does: the simulated hand follows each routine started.
        device = by_serial[serial]
        if isinstance(device, SimulatedMassager):
            device.hand = routine_hand_script(
                routine, default_policy(), start_s=device.uptime_s + 1.0
            )

    # As `devicebridge serve` does: one bridge per data directory, for the rig's lifetime.
    async with world:
        lock = try_acquire(data_dir)
        service = BridgeService(
            bridge_id=BRIDGE,
            data_dir=data_dir,
            policy=default_policy(),
            clock=clock,
            devices=[paired(d) for d in sims] if with_devices else [],
            session_factory=session_factory(world),
            mqtt=mqtt,
            home_assistant=home_assistant,
            rng=random.Random(SEED),
            run_mode=run_mode,
            on_routine_started=guide_hand if guide_hands else None,
            **({"now": now} if now else {}),
        )
        clock.start()
        rig = Rig(clock, world, service, data_dir, devices=sims)
        try:
            yield rig
        finally:
            if rig.task is not None and not rig.task.done():
                await rig.stop()
            await clock.stop()
            lock.release()


# --------------------------------------------------------------------------- MQTT side


class Subscriber:
    """A QoS 1 subscriber that reconnects by itself and drops repeated message ids."""

    def __init__(self, port: int, *topics: str) -> None:
        self.port = port
        self.topics = topics
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[tuple[str, bytes, bool]] = []
        self.duplicates = 0
        self._seen: set[str] = set()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port) as client:
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        payload = bytes(message.payload)  # type: ignore[arg-type]
                        self.raw.append((str(message.topic), payload, message.retain))
                        try:
                            body = json.loads(payload)
                        except ValueError:
                            continue
                        if not isinstance(body, dict):
                            continue
                        mid = body.get("message_id")
                        if mid is not None and mid in self._seen:
                            self.duplicates += 1
                            continue
                        if mid is not None:
                            self._seen.add(mid)
                        self.messages.append((str(message.topic), body))
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.05)  # reconnect polling while the broker is down

    def on(self, suffix: str) -> list[dict[str, Any]]:
        return [body for topic, body in self.messages if topic.endswith(suffix)]


@contextlib.asynccontextmanager
async def running(coroutine: Any) -> AsyncIterator[asyncio.Task[Any]]:
    task = asyncio.create_task(coroutine)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- signing


@dataclass
class Therapist:
    therapist_id: str = "dr-lee"
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(public_key_bytes(self.key.public_key())).decode()

    @property
    def key_id(self) -> str:
        return key_id(self.key.public_key())

    def trust_on(self, data_dir: Path) -> None:
        store = ProgramStore(data_dir / PROGRAMS_FILENAME)
        store.trust(self.key_id, self.therapist_id, self.public_b64)
        store.close()

    def sign(
        self,
        program: bytes,
        *,
        client: str = BRIDGE,
        issued_at: datetime | None = None,
        valid_for: timedelta = timedelta(days=7),
    ) -> bytes:
        return sign_program(
            self.key,
            program,
            therapist_id=self.therapist_id,
            client_id=client,
            program_version="3",
            issued_at=issued_at or datetime.now(UTC),
            valid_for=valid_for,
        ).to_json()


def routine_text(name: str = "firming") -> bytes:
    return (ROUTINES / f"{name}.toml").read_bytes()
