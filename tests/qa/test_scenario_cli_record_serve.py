"""Scenario files (errors, CLI), record/replay from the store, and standalone serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from devicebridge.qa import record_scenario, run_scenario
from devicebridge.storage.sessions import SessionStore
from protocols import (
    Ack,
    Command,
    FrameDecoder,
    GetInfo,
    StartStream,
    TelemetryBatch,
    decode_message,
    encode_frame,
)
from simulators import VirtualClock
from simulators.cli import main as sim_main
from simulators.control import ControlServer, FaultController, control_request, parse_fault_option
from simulators.errors import ScenarioError
from simulators.faults.injector import FaultInjector
from simulators.links.tcp_port import TcpDevicePort
from simulators.scenario.spec import parse_scenario
from simulators.world import SimulatedWorld
from tests.qa.conftest import scenario_text


def test_every_problem_of_a_scenario_is_reported_with_its_place() -> None:
    text = """
[scenario]
seed = -1
speed = 3

[[devices]]
name = "m"
kind = "toaster"

[[hand]]
device = "x"
zone = "elbow"
duration_s = 2

[[faults]]
kind = "drop"
rat = 0.1
"""
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, label="bad.toml")
    problems = "\n".join(caught.value.problems)
    assert "[scenario]: unknown key 'speed'" in problems
    assert "[scenario]: seed must be at least 0" in problems
    assert "[[devices]] #1: kind must be one of massager, mask, got 'toaster'" in problems
    assert "[[hand]] #1: device 'x' is not a device of this scenario" in problems
    assert "[[hand]] #1: unknown zone 'elbow'" in problems
    assert "[[faults]] #1: fault 'drop' has no parameter 'rat'" in problems
    assert str(caught.value).startswith("bad.toml: ")


def test_cli_runs_a_scenario_and_prints_a_verdict(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(scenario_text('[[expect]]\nstatus = "completed"\n', name="good"))
    bad = tmp_path / "bad.toml"
    bad.write_text(scenario_text('[[expect]]\nstatus = "refused"\n', name="bad", seed=4))
    runner = CliRunner()
    result = runner.invoke(
        sim_main, ["scenario", "run", str(good), str(bad), "--artifacts", str(tmp_path / "art")]
    )
    assert result.exit_code == 1, result.output
    assert "PASS good (seed 11)" in result.output
    assert "FAIL bad (seed 4)" in result.output
    assert (
        "session status 'completed' (" not in result.output or "expected 'refused'" in result.output
    )
    assert (tmp_path / "art" / "bad" / "timeline.jsonl").exists()
    again = runner.invoke(sim_main, ["scenario", "run", str(good), "--seed", "99"])
    assert again.exit_code == 0
    assert "PASS good (seed 99)" in again.output


async def test_record_a_session_and_replay_it_as_a_scenario(tmp_path: Path) -> None:
    original = parse_scenario(
        scenario_text(
            """
[[hand]]
action = "press"
at_s = 6
duration_s = 3
zone = "cheek_left"
pressure_kpa = 30.0

[[expect]]
decisions = [{ kind = "pause", reason = "pressure_cap" }]
""",
            duration_s=60,
        )
    )
    recorded = await run_scenario(original, workdir=tmp_path / "original")
    assert recorded.passed, recorded.verdict()
    with SessionStore(tmp_path / "original" / "m.sqlite3") as store:
        (session,) = store.sessions()
        text = record_scenario(store, session.id, seed=8)
    replay = parse_scenario(text, label="replay.toml")
    assert replay.hand
    assert replay.hand[0].action == "profile"
    assert replay.expect[0]["status"] == session.status
    result = await run_scenario(replay, workdir=tmp_path / "replay")
    assert result.passed, result.verdict()
    kinds = [(d.kind.value, d.reason) for d in result.devices["recorded"].decisions]
    assert ("pause", "pressure_cap") in kinds


def test_fault_options_parse() -> None:
    assert parse_fault_option("drop:rate=0.2,burst=3@FM01") == (
        "FM01",
        {"kind": "drop", "rate": 0.2, "burst": 3},
    )
    assert parse_fault_option("ignore_commands:opcodes=SET_MODE|SET_ZONE")[1]["opcodes"] == [
        "SET_MODE",
        "SET_ZONE",
    ]


async def read_messages(reader: asyncio.StreamReader, decoder: FrameDecoder, count: int) -> list:
    messages: list = []
    while len(messages) < count:
        data = await asyncio.wait_for(reader.read(4096), timeout=5.0)  # hang safety net only
        assert data, "connection closed"
        decoded, _ = decoder.feed(data)
        messages += [decode_message(m) for m in decoded]
    return messages


async def test_tcp_device_with_faults_switched_at_run_time() -> None:
    clock = VirtualClock()
    world = SimulatedWorld(seed=5, clock=clock)
    device = world.add_massager()
    injector = FaultInjector(device, seed=5, world=world).install()
    controller = FaultController([injector], clock)
    async with world:
        injector.start()
        port = TcpDevicePort(device)
        control = ControlServer(controller)
        await port.start()
        await control.start()
        try:
            host, number = port.address
            reader, writer = await asyncio.open_connection(host, number)
            decoder = FrameDecoder()
            writer.write(encode_frame(Command.of(1, GetInfo()).encode()))
            writer.write(encode_frame(Command.of(2, StartStream()).encode()))
            await writer.drain()
            acks = await read_messages(reader, decoder, 2)
            assert [a.command_id for a in acks if isinstance(a, Ack)] == [1, 2]
            # Turn on corruption at run time: the client's CRC check now fails frames.
            answer = await control_request(
                *control.address,
                {
                    "op": "add",
                    "device": device.serial_number,
                    "fault": {"kind": "corrupt", "rate": 1.0},
                },
            )
            assert answer["ok"], answer
            await clock.advance(0.5)
            data = await asyncio.wait_for(reader.read(4096), timeout=5.0)
            messages, errors = decoder.feed(data)
            assert errors
            assert not messages
            listing = await control_request(*control.address, {"op": "list"})
            assert listing["devices"][0]["counts"]["corrupt"] >= 1
            cleared = await control_request(*control.address, {"op": "clear"})
            assert cleared == {"ok": True, "removed": 1}
            await clock.advance(0.5)
            batches = [
                m for m in await read_messages(reader, decoder, 1) if isinstance(m, TelemetryBatch)
            ]
            assert batches
            bad = await control_request(*control.address, {"op": "add", "fault": {"kind": "nope"}})
            assert not bad["ok"]
            assert "unknown fault kind" in bad["error"]
            writer.close()
        finally:
            await control.stop()
            await port.stop()


def test_serve_prints_ports_and_a_control_address_and_stops_on_sigterm() -> None:
    import subprocess
    import sys

    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "devicebridge-sim"),
            "qa",
            "serve",
            "--serial",
            "--tcp",
            "0",
            "--fast",
            "--fault",
            "drop:rate=0.1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(3)]
        kinds = [line.split()[2] if len(line.split()) > 2 else line.split()[0] for line in lines]
        assert kinds == ["serial", "tcp", "control"], lines
        assert lines[0].split()[3].startswith("/dev/pts/")
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stdout is not None:
            process.stdout.close()
