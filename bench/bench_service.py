"""The whole service end to end: simulated massagers -> bleak API -> sessions -> service
(recorder, SQLite session store, batching, outbox) -> a private Mosquitto -> a subscriber
in another process.

Massagers stream at 100 Hz on a realtime virtual clock for ``DURATION_S`` wall seconds,
once with telemetry only and once with a routine on every device (so every sample is
also recorded and checked by the engine). The baseline is the same devices and sessions
with the telemetry only counted by an observer (no service), measured in the same run;
the difference in CPU per sample is the service's own cost. Baseline and service runs
are interleaved ``REPEATS`` times and each row shows its median run: these machines are
shared, and one noisy window must not decide a verdict. Targets (issue 4, for devices
streaming through the whole service to the broker): 100 devices at 100 samples/s each on
one core with no loss (checked on both paths), and the bridge's cost per sample at least
10 times below what one BLE radio can deliver (about 1.4 Mbit/s of 9-byte samples, so at
least 14 Mbit/s-equivalent of samples per CPU second). The routine row is measured
against the same bar and reported beside the verdict.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench.report import print_table
from devicebridge.core.policy import default_policy
from devicebridge.core.reassembly import TelemetryItem
from devicebridge.core.routine import parse_routine
from devicebridge.device.session import DeviceSession, session_class_for
from devicebridge.device.transport.ble import BleBackends, BleTransport
from devicebridge.integrations.mqtt import MqttSettings
from devicebridge.service.supervisor import BridgeService
from devicebridge.storage.registry import PairedDevice
from protocols import DeviceKind, TelemetryBatch
from simulators import SimulatedWorld, VirtualClock

DEVICE_COUNTS: Final = (1, 10, 100)
DURATION_S: Final = 5.0
REPEATS: Final = 3
ROUTINE_SETTLE_S: Final = 1.0
SAMPLE_RATE_HZ: Final = 100
BYTES_PER_SAMPLE: Final = 9
BLE_RADIO_BITS_PER_S: Final = 1.4e6
TARGET_RADIO_RATIO: Final = 10.0
TARGET_DEVICES: Final = 100
BRIDGE: Final = "bench"
ROUTINE: Final = Path(__file__).resolve().parents[1] / "devicebridge/data/routines/firming.toml"

SUBSCRIBER = r"""
import asyncio, json, sys
import aiomqtt

async def main(port):
    totals, messages, ordered = {}, 0, True
    last = {}
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe("devicebridge/v1/bench/devices/+/telemetry", qos=1)
        print("ready", flush=True)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def answer():
            while await reader.readline():
                print(json.dumps({"samples": sum(totals.values()), "messages": messages,
                                  "ordered": ordered}), flush=True)
        answering = asyncio.create_task(answer())
        async for m in client.messages:
            body = json.loads(m.payload)
            serial = body["serial"]
            if serial in last and body["first_sequence"] != last[serial]:
                ordered = False
            last[serial] = body["first_sequence"] + body["count"]
            totals[serial] = totals.get(serial, 0) + body["count"]
            messages += 1

asyncio.run(main(int(sys.argv[1])))
"""


class Broker:
    def __init__(self, workdir: Path) -> None:
        from tests.broker import free_port

        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\n"
        )
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, binary: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.02)  # readiness polling
        raise RuntimeError("mosquitto did not start")

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await self.process.wait()


def _world(count: int) -> tuple[VirtualClock, SimulatedWorld, list[PairedDevice]]:
    clock = VirtualClock(realtime=True)
    world = SimulatedWorld(seed=11, clock=clock)
    devices = []
    for _ in range(count):
        d = world.add_massager()
        devices.append(PairedDevice(d.name, d.serial_number, "massager", "sim", "ble", d.address))
    return clock, world, devices


def _session(world: SimulatedWorld, device: PairedDevice, rng: random.Random) -> DeviceSession:
    backends = BleBackends(world.scanner_backend, world.client_backend)
    transport = BleTransport(
        world.clock,
        serial_number=device.serial_number,
        address=device.last_address,
        backends=backends,
    )
    cls = session_class_for(DeviceKind.MASSAGER)
    return cls(transport, world.clock, rng=random.Random(rng.random()), name=device.name)


async def _baseline(count: int) -> dict[str, float]:
    """Devices and sessions only: telemetry consumed and counted, nothing else."""
    clock, world, devices = _world(count)
    rng = random.Random(1)
    received = 0
    async with world:
        clock.start()
        sessions = [_session(world, d, rng) for d in devices]

        def count_samples(item: TelemetryItem) -> None:
            # The cheapest consumer (an observer, as the service uses): the baseline must
            # not charge the service for a hand-off it does not make.
            nonlocal received
            if isinstance(item, TelemetryBatch):
                received += len(item)

        for s in sessions:
            s.observe_telemetry(count_samples)
        await asyncio.gather(*(s.start() for s in sessions))
        cpu0, wall0, received0 = time.process_time(), time.perf_counter(), received
        await asyncio.sleep(DURATION_S)  # measuring a realtime stream
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        samples = received - received0
        for s in sessions:
            await s.close()
        await clock.stop()
    return {"cpu_s": cpu, "wall_s": wall, "samples": samples}


async def _service(
    count: int, broker: Broker, data_dir: Path, *, with_routine: bool
) -> dict[str, Any]:
    clock, world, devices = _world(count)
    rng = random.Random(1)
    subscriber = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SUBSCRIBER,
        str(broker.port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert subscriber.stdout is not None
    assert subscriber.stdin is not None
    assert await subscriber.stdout.readline() == b"ready\n"
    routine = parse_routine(ROUTINE.read_text(), default_policy())
    async with world:
        service = BridgeService(
            bridge_id=BRIDGE,
            data_dir=data_dir,
            policy=default_policy(),
            clock=clock,
            devices=devices,
            session_factory=lambda p: _session(world, p, rng),
            mqtt=MqttSettings("127.0.0.1", broker.port),
            rng=rng,
        )
        clock.start()
        task = asyncio.create_task(service.run())
        await service.wait_started()
        while not all(w.batcher is not None for w in service.workers.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # waiting for every device to connect
        for device in devices if with_routine else ():
            service.start_routine(device.serial_number, routine)
        if with_routine:
            # Measure the routines running, not their start (configuring 100 devices, the
            # first guidance): a one-off that a 5 s window would charge to every sample.
            while not all(w.runner is not None for w in service.workers.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # waiting for every routine to start
            await asyncio.sleep(ROUTINE_SETTLE_S)  # its first commands and guidance
        cpu0, wall0 = time.process_time(), time.perf_counter()
        received0 = sum(w.samples_received for w in service.workers.values())
        await asyncio.sleep(DURATION_S)  # measuring a realtime stream
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        measured = sum(w.samples_received for w in service.workers.values()) - received0
        lost_on_links = sum(w.session.stats.lost_samples for w in service.workers.values())
        service.request_stop()
        await task
        expected = sum(
            (w.batcher.samples_published if w.batcher else 0) for w in service.workers.values()
        )
        recorded = sum(w.samples_received for w in service.workers.values())
        await clock.stop()
    report: dict[str, Any] = {}
    for _ in range(200):
        subscriber.stdin.write(b"?\n")
        await subscriber.stdin.drain()
        report = json.loads(await subscriber.stdout.readline())
        if report["samples"] >= expected:
            break
        await asyncio.sleep(0.05)  # the last messages are on their way
    subscriber.kill()
    await subscriber.wait()
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "samples": measured,
        "expected": expected,
        "recorded": recorded,
        "received": report["samples"],
        "ordered": report["ordered"],
        "lost_on_links": lost_on_links,
    }


def _per_sample_s(run: dict[str, Any]) -> float:
    return float(run["cpu_s"]) / max(int(run["samples"]), 1)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose CPU per sample is the median (its own figures, not a blend)."""
    return sorted(runs, key=_per_sample_s)[len(runs) // 2]


def _row(
    count: int, label: str, runs: list[dict[str, Any]], base_per_sample_s: float
) -> dict[str, Any]:
    served = _median_run(runs)
    rate = served["samples"] / served["wall_s"]
    whole_per_sample_s = _per_sample_s(served)
    # With one device the fixed costs of a run dominate and the difference can fall within
    # the noise (even below zero): it is shown as measured, and its ratio is not computed.
    own_per_sample_s = whole_per_sample_s - base_per_sample_s
    capacity_bits = BYTES_PER_SAMPLE * 8 / own_per_sample_s if own_per_sample_s > 0 else math.inf
    loss = 1 - served["received"] / served["expected"] if served["expected"] else 1.0
    return {
        "row": (
            count,
            label,
            rate,
            served["cpu_s"] / served["wall_s"] / count,
            f"{own_per_sample_s * 1e6:.1f} ({whole_per_sample_s * 1e6:.1f})",
            (
                f"{capacity_bits / 1e6:.1f} ({capacity_bits / BLE_RADIO_BITS_PER_S:.1f}x)"
                if math.isfinite(capacity_bits)
                else "- (within noise)"
            ),
            f"{loss:.2%} ({served['received']}/{served['expected']})",
        ),
        "on_time": all(r["samples"] / r["wall_s"] >= 0.95 * count * SAMPLE_RATE_HZ for r in runs),
        "one_core": all(r["cpu_s"] / r["wall_s"] < 1.0 for r in runs),
        # Every repetition, not only the median one, must deliver everything in order.
        "lossless": all(
            r["received"] == r["expected"] and r["ordered"] and r["lost_on_links"] == 0
            for r in runs
        ),
        "radio_ratio": capacity_bits / BLE_RADIO_BITS_PER_S,
    }


async def _run() -> bool:
    binary = shutil.which("mosquitto") or shutil.which("/usr/sbin/mosquitto")
    if binary is None:
        print("service bench needs mosquitto: apt-get install mosquitto (or brew install)")
        return False
    rows = []
    verdict: dict[str, bool] = {}
    routine_ratio = math.nan
    with tempfile.TemporaryDirectory() as tmp:
        for count in DEVICE_COUNTS:
            bases: list[dict[str, Any]] = []
            streams: list[dict[str, Any]] = []
            routines: list[dict[str, Any]] = []
            broker = Broker(Path(tmp))
            await broker.start(binary)
            try:
                # Interleaved, so that a noisy stretch of the machine hits every path alike.
                for repeat in range(REPEATS):
                    bases.append(await _baseline(count))
                    folder = Path(tmp) / f"{count}-{repeat}"
                    streams.append(await _service(count, broker, folder / "s", with_routine=False))
                    routines.append(await _service(count, broker, folder / "r", with_routine=True))
            finally:
                await broker.stop()
            base = _median_run(bases)
            rows.append(
                (
                    count,
                    "devices+sessions (baseline)",
                    base["samples"] / base["wall_s"],
                    base["cpu_s"] / base["wall_s"] / count,
                    f"- ({_per_sample_s(base) * 1e6:.1f})",
                    "-",
                    "-",
                )
            )
            plain = _row(count, "service: stream to MQTT", streams, _per_sample_s(base))
            full = _row(count, "service: + routine recorded", routines, _per_sample_s(base))
            rows += [plain["row"], full["row"]]
            if count == TARGET_DEVICES:
                verdict = {
                    "100 devices x 100 Hz on time (both paths)": plain["on_time"]
                    and full["on_time"],
                    "one core (process CPU < 1.0 s/s, both paths)": plain["one_core"]
                    and full["one_core"],
                    "no loss, in order (both paths)": plain["lossless"] and full["lossless"],
                    f">= {TARGET_RADIO_RATIO:.0f}x one BLE radio (streaming through the service)": (
                        plain["radio_ratio"] >= TARGET_RADIO_RATIO
                    ),
                }
                routine_ratio = full["radio_ratio"]
    print_table(
        f"service end to end: massagers at {SAMPLE_RATE_HZ} Hz, {DURATION_S:g} s realtime, "
        "through Mosquitto to a subscriber process; own = CPU per sample above the baseline's; "
        f"median of {REPEATS} interleaved runs",
        [
            "devices",
            "path",
            "samples/s",
            "CPU s/s per device",
            "own us/sample (whole)",
            "own Mbit/s-equiv (x radio)",
            "loss",
        ],
        rows,
    )
    for name, ok in verdict.items():
        print(f"  {name}: {'met' if ok else 'MISSED'}")
    # Issue 4's target is the streaming service; with a routine on every device the engine
    # and the session record add their cost per sample, shown against the same bar.
    print(
        f"  (beyond the target) with a routine on every device: {routine_ratio:.1f}x one BLE"
        f" radio ({'at or above' if routine_ratio >= TARGET_RADIO_RATIO else 'below'}"
        f" {TARGET_RADIO_RATIO:.0f}x)"
    )
    passed = all(verdict.values())
    print(f"service target {'met' if passed else 'MISSED'}")
    return passed


def run() -> bool:
    return asyncio.run(_run())


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
