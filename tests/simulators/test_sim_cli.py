"""devicebridge-sim: ``list`` through click, ``serve`` as a real process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import serial
from click.testing import CliRunner

from protocols import Ack, Command, FrameDecoder, GetInfo, ResultCode, decode_message, encode_frame
from simulators import SimulatedWorld
from simulators.cli import main

FAILSAFE_S = 20.0  # a fresh interpreter imports numpy and bleak; only guards a hang


def test_list_prints_what_the_seed_produces() -> None:
    result = CliRunner().invoke(main, ["list", "--massagers", "2", "--masks", "1", "--seed", "9"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    world = SimulatedWorld(seed=9)
    expected = [world.add_massager(), world.add_massager(), world.add_mask()]
    assert [line[0] for line in lines] == ["massager", "massager", "mask"]
    assert [line[1:] for line in lines] == [[d.serial_number, d.name, d.address] for d in expected]
    again = CliRunner().invoke(main, ["list", "--massagers", "2", "--masks", "1", "--seed", "9"])
    assert again.output == result.output


def test_serve_requires_serial() -> None:
    result = CliRunner().invoke(main, ["serve", "--massagers", "1"])
    assert result.exit_code != 0
    assert "--serial" in result.output


def test_serve_on_ptys_until_sigterm() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from simulators.cli import main; main()",
            "serve",
            "--massagers",
            "1",
            "--masks",
            "1",
            "--serial",
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().split() for _ in range(2)]
        assert [line[0] for line in lines] == ["massager", "mask"]
        port = serial.Serial(lines[0][2], timeout=0)
        port.write(encode_frame(Command.of(5, GetInfo()).encode()))
        decoder = FrameDecoder()
        acks: list[Ack] = []
        deadline = time.monotonic() + FAILSAFE_S
        while not acks and time.monotonic() < deadline:
            messages, _ = decoder.feed(port.read(4096))
            acks += [m for m in map(decode_message, messages) if isinstance(m, Ack)]
            time.sleep(0.01)
        port.close()
        assert acks
        assert acks[0].command_id == 5
        assert acks[0].result == ResultCode.OK
        process.send_signal(signal.SIGTERM)
        assert process.wait(FAILSAFE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
