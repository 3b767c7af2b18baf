"""The host dies mid-routine: the devices alone keep the policy's limits.

Real processes all through: ``devicebridge-sim qa serve`` serves a massager and an LED
mask on ptys (in real time) with a control port; ``devicebridge run ... --mode device
--serial-port PTY`` installs a starter routine on each as a program and starts it; both
host processes are then killed with SIGKILL (no STOP_ALL, no goodbye). The test then
presses too hard on the massager and heats the mask through the control port, and reads
what each device did on its own: the sample at which the motor or the light went off (from
the device time of its HARD_LIMIT / OVER_TEMPERATURE event) and why the program ended.

The pieces are fixtures and helpers so that the next step can be built on them: the
``host_dead`` fixture leaves the devices running and the runs' data directory
(``HostDead.data_dir``) as the killed hosts left it, for a bridge that starts next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devicebridge.core.policy import default_policy
from devicebridge.storage.sessions import SESSIONS_FILENAME, SessionRecord, SessionStore
from simulators.control import control_request

BIN = Path(sys.executable).parent
WAIT_S = 60.0  # a safety net against hangs (real time); results never depend on it
POLL_S = 0.05  # how often another process's device state is read
MASSAGE_ROUTINE = "firming"  # first step: cheek_left, band 4-12 kPa
LED_ROUTINE = "led_red_near_infrared"  # one step: the temperature stop ends the program
IN_BAND_KPA = 8.0


@dataclass
class Simulator:
    """A running ``devicebridge-sim qa serve``: its devices' ptys and its control port."""

    process: asyncio.subprocess.Process
    ptys: dict[str, str] = field(default_factory=dict)  # serial number -> pty path
    kinds: dict[str, str] = field(default_factory=dict)  # serial number -> massager / mask
    control: tuple[str, int] = ("127.0.0.1", 0)

    def serial_of(self, kind: str) -> str:
        (serial,) = [s for s, k in self.kinds.items() if k == kind]
        return serial

    async def request(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = await control_request(*self.control, body)
        assert answer["ok"], answer
        return answer

    async def state(self, serial: str) -> dict[str, Any]:
        (state,) = (await self.request({"op": "state", "device": serial}))["devices"]
        return state

    async def wait_state(
        self, serial: str, predicate: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while not predicate(state := await self.state(serial)):  # noqa: ASYNC110 - another process
                await asyncio.sleep(POLL_S)
        return state


async def start_simulator(*, massagers: int = 1, masks: int = 1, seed: int = 11) -> Simulator:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "devicebridge-sim"),
        "qa",
        "serve",
        "--serial",
        "--massagers",
        str(massagers),
        "--masks",
        str(masks),
        "--seed",
        str(seed),
        stdout=asyncio.subprocess.PIPE,
    )
    simulator = Simulator(process)
    assert process.stdout is not None
    async with asyncio.timeout(WAIT_S):
        while True:
            words = (await process.stdout.readline()).decode().split()
            assert words, "qa serve ended before it printed its control address"
            if words[0] == "control":
                host, _, port = words[1].rpartition(":")
                simulator.control = (host, int(port))
                return simulator
            kind, serial, _, path = words  # "massager FM00... serial /dev/pts/N"
            simulator.ptys[serial] = path
            simulator.kinds[serial] = kind


async def start_run(
    data_dir: Path, config: Path, routine: str, serial: str, pty: str, log: Path
) -> asyncio.subprocess.Process:
    """``devicebridge run ROUTINE --mode device`` on a pty, output to ``log``."""
    with log.open("wb") as output:
        return await asyncio.create_subprocess_exec(
            str(BIN / "devicebridge"),
            "--no-simulate",
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "run",
            routine,
            "--device",
            serial,
            "--mode",
            "device",
            "--serial-port",
            pty,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )


async def finish(process: asyncio.subprocess.Process, signum: int = signal.SIGTERM) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
    async with asyncio.timeout(WAIT_S):
        await process.wait()


def sample_of(event: dict[str, Any], state: dict[str, Any]) -> int:
    """The sample an event happened at (events carry the device time of that sample)."""
    return round(event["device_time_ms"] * state["sample_rate_hz"] / 1000)


def events_since(state: dict[str, Any], code: str, first_sequence: int) -> list[dict[str, Any]]:
    return [
        e for e in state["events"] if e["code"] == code and sample_of(e, state) >= first_sequence
    ]


@dataclass
class HostDead:
    simulator: Simulator
    data_dir: Path
    massager: str
    mask: str
    killed: list[asyncio.subprocess.Process]


@pytest.fixture
async def host_dead(tmp_path: Path) -> AsyncIterator[HostDead]:
    """Both routines run as device programs and both hosts were killed (SIGKILL)."""
    simulator = await start_simulator()
    runs: list[asyncio.subprocess.Process] = []
    try:
        massager, mask = simulator.serial_of("massager"), simulator.serial_of("mask")
        # Someone holds the massager on the first step's zone, inside its band.
        await simulator.request(
            {"op": "hand", "device": massager, "zone": "cheek_left", "pressure_kpa": IN_BAND_KPA}
        )
        config = tmp_path / "config.toml"
        config.write_text("")
        data_dir = tmp_path / "data"
        for routine, serial in ((MASSAGE_ROUTINE, massager), (LED_ROUTINE, mask)):
            log = tmp_path / f"run-{routine}.log"
            runs.append(
                await start_run(data_dir, config, routine, serial, simulator.ptys[serial], log)
            )
        for serial in (massager, mask):
            await simulator.wait_state(serial, lambda s: bool(s["program_running"]))
        await simulator.wait_state(massager, lambda s: bool(s["motor_on"]))
        await simulator.wait_state(mask, lambda s: bool(s["led_on"]))
        for run in runs:
            await finish(run, signal.SIGKILL)
            assert run.returncode == -signal.SIGKILL
        yield HostDead(simulator, data_dir, massager, mask, runs)
    finally:
        for run in runs:
            await finish(run, signal.SIGKILL)
        await finish(simulator.process)
        assert simulator.process.returncode == 0


async def test_the_devices_keep_the_limits_when_the_host_is_dead_and_the_next_bridge_records_it(
    host_dead: HostDead,
) -> None:
    simulator, massager, mask = host_dead.simulator, host_dead.massager, host_dead.mask
    policy = default_policy()
    # The hosts are gone; the programs run on (read here from a shell, as a QA engineer).
    host, port = simulator.control
    shell = await asyncio.create_subprocess_exec(
        str(BIN / "devicebridge-sim"),
        "qa",
        "send",
        "--control",
        f"{host}:{port}",
        '{"op": "state"}',
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT_S):
        out, _ = await shell.communicate()
    assert shell.returncode == 0
    devices = json.loads(out)["devices"]
    assert [d["program_running"] for d in devices] == [True, True]

    # Massager: too hard on the cheek. The motor stops at the first sample over the cap,
    # resumes back in the band, and the third time the program ends.
    cap_kpa = policy.zones["cheek"].cap_kpa.value
    for press in range(3):
        applied = await simulator.request(
            {"op": "hand", "device": massager, "zone": "cheek_left", "pressure_kpa": cap_kpa * 1.5}
        )
        first = applied["applied"][0]["next_sequence"]
        state = await simulator.wait_state(massager, lambda s: not s["motor_on"])
        (hard_limit,) = events_since(state, "hard_limit", first)
        assert hard_limit["payload"][:2] == "01"  # pressure cap
        assert sample_of(hard_limit, state) == first  # the first sample over the cap
        if press < 2:
            assert state["program_running"]
            await simulator.request(
                {
                    "op": "hand",
                    "device": massager,
                    "zone": "cheek_left",
                    "pressure_kpa": IN_BAND_KPA,
                }
            )
            await simulator.wait_state(massager, lambda s: bool(s["motor_on"]))
    state = await simulator.wait_state(massager, lambda s: not s["program_running"])
    assert state["program_end_reason"] == "hard_limit"
    assert not state["motor_on"]
    (finished,) = events_since(state, "program_finished", first)
    assert sample_of(finished, state) == first

    # Mask: the skin reads above the temperature stop. The light goes off at the first
    # sample there, and the program (one step) ends at the temperature stop.
    stop_c = policy.temperature_stop_c.value
    applied = await simulator.request({"op": "skin", "device": mask, "temperature_c": stop_c + 1})
    first = applied["applied"][0]["next_sequence"]
    state = await simulator.wait_state(mask, lambda s: not s["program_running"])
    assert state["program_end_reason"] == "over_temperature"
    assert not state["led_on"]
    (over,) = events_since(state, "over_temperature", first)
    assert sample_of(over, state) == first
    (finished,) = events_since(state, "program_finished", first)
    assert sample_of(finished, state) == first

    # The next bridge: the same data directory, the devices paired on their ports. It
    # finds both sessions interrupted, takes what each device held of them (the samples
    # its program ran on alone), and stores them with their summaries worked out again.
    data_dir, config = host_dead.data_dir, host_dead.data_dir.parent / "config.toml"
    before = _stored(data_dir)
    for name, serial in (("massager", massager), ("mask", mask)):
        await _cli(
            config, data_dir, "pair", "--serial-port", simulator.ptys[serial], "--name", name
        )
    log = data_dir.parent / "serve-next.log"
    with log.open("wb") as output:
        bridge = await asyncio.create_subprocess_exec(
            str(BIN / "devicebridge"),
            "--no-simulate",
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "serve",
            "--bridge-id",
            "bridge-next",
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with asyncio.timeout(WAIT_S):
            while not all("alone" in (r.end_reason or "") for r in _records(data_dir)):  # noqa: ASYNC110 - another process
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AssertionError(log.read_text()[-6000:]) from None
    finally:
        await finish(bridge, signal.SIGINT)
    records = {r.device_serial: r for r in _records(data_dir)}
    after = _stored(data_dir)
    for serial in (massager, mask):
        record = records[serial]
        assert record.status == "interrupted"
        assert after[record.id] > before[record.id]  # the samples the device ran on alone
    pressed = records[massager].summary
    assert pressed["cap_events"] == 3
    assert pressed["stopped_reason"] == "pressure_cap_repeated"
    assert records[mask].summary["max_temperature_c"] >= policy.temperature_stop_c.value


def _records(data_dir: Path) -> list[SessionRecord]:
    with SessionStore(data_dir / SESSIONS_FILENAME) as store:
        return [r for r in store.sessions() if r.status != "refused"]


def _stored(data_dir: Path) -> dict[int, int]:
    """How many samples each session has stored."""
    with SessionStore(data_dir / SESSIONS_FILENAME) as store:
        return {r.id: len(store.telemetry(r.id)[0]) for r in store.sessions()}


async def _cli(config: Path, data_dir: Path, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "devicebridge"),
        "--no-simulate",
        "--config",
        str(config),
        "--data-dir",
        str(data_dir),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(WAIT_S):
        out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
