"""Standalone simulated devices for other apps, with faults and the world switched at run time.

``devicebridge-sim qa serve`` runs devices on ptys and/or TCP ports (one per device) and a
control port; ``devicebridge-sim qa fault`` (or any client writing one JSON object per
line) adds, lists and clears faults while the devices run, and a client can move the
world around a device and read what the device does on its own::

    {"op": "add", "device": "*", "fault": {"kind": "drop", "rate": 0.2, "burst": 3}}
    {"op": "clear", "device": "FM00A1B2C3", "kind": "drop"}
    {"op": "list"}
    {"op": "hand", "device": "FM00A1B2C3", "zone": "cheek_left", "pressure_kpa": 20}
    {"op": "hand", "device": "FM00A1B2C3", "clear": true}
    {"op": "skin", "device": "LM00D4E5F6", "temperature_c": 44}
    {"op": "skin", "device": "LM00D4E5F6", "clear": true}
    {"op": "state", "device": "*"}

Every answer is one JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
A fault's ``at_s`` and ``duration_s`` count from when it is added. ``hand`` and ``skin``
apply from the next sample on and answer with ``next_sequence``, that sample's sequence
number; ``state`` reads the device (actuators, program, recent events with their device
time). docs/qa.md describes every field.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

import click

from protocols import Zone
from protocols.constants import ZONE_CODES, zone_named
from protocols.telemetry import IRRADIANCE_MW_CM2_PER_UNIT, pressure_kpa
from simulators.clock import VirtualClock
from simulators.devices.device import SimulatedDevice
from simulators.devices.hand import HandScript, HandSegment
from simulators.devices.link import Channel
from simulators.devices.mask import SimulatedLedMask
from simulators.devices.massager import SimulatedMassager
from simulators.errors import FaultError
from simulators.faults.injector import FaultInjector
from simulators.faults.spec import FaultKind, make_fault
from simulators.links.serial_port import PtySerialPort
from simulators.links.tcp_port import LOCALHOST, TcpDevicePort
from simulators.world import SimulatedWorld

REATTACH_POLL_S: Final = 0.1
MAX_REQUEST_BYTES: Final = 64 * 1024
# A hand may press beyond the sensor's full scale (655.35 kPa: it saturates), not beyond this.
MAX_HAND_PRESSURE_KPA: Final = 1000.0
# What a skin-side thermistor of a consumer device reads at all.
SKIN_TEMPERATURE_RANGE_C: Final = (-40.0, 125.0)
STATE_EVENTS: Final = 64  # recent events in a state answer
OPS: Final = ("add", "clear", "list", "hand", "skin", "state")


class FaultablePtySerialPort(PtySerialPort):
    """A pty port that takes pre-framed (possibly damaged) frames and survives reboots."""

    def send_frame(self, channel: Channel, frame: bytes) -> None:
        if channel is Channel.BATTERY:
            return
        self._write(frame)

    def device_closed(self) -> None:
        # A pty has no link to lose: when the device is back, the line carries it again.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self._reattach(), name="pty reattach")

    async def _reattach(self) -> None:
        while self._master_fd is not None:
            if self.device.is_powered and not self.device.is_connected:
                self.device.attach_link(self)
                return
            await self.device.clock.sleep(REATTACH_POLL_S)


class FaultController:
    """Applies control requests to the served devices: faults, the hand, the skin, state."""

    def __init__(self, injectors: Sequence[FaultInjector], clock: VirtualClock) -> None:
        self.injectors = {i.device.serial_number: i for i in injectors}
        self.clock = clock

    def _select(self, selector: str) -> list[FaultInjector]:
        if selector == "*":
            return list(self.injectors.values())
        injector = self.injectors.get(selector)
        if injector is None:
            known = ", ".join(self.injectors)
            raise FaultError(f"no device {selector!r} (serve has: {known}, or '*')")
        return [injector]

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "list":
                return {"ok": True, "devices": self.describe()}
            if op == "add":
                fault_spec = dict(request.get("fault") or {})
                if "kind" not in fault_spec:
                    raise FaultError("add: the fault needs a kind")
                now_s = self.clock.now_s()
                fault_spec["at_s"] = now_s + float(fault_spec.get("at_s", 0.0))
                added = []
                for injector in self._select(str(request.get("device", "*"))):
                    fault = make_fault(where="add", **fault_spec)
                    injector.add(fault)
                    added.append(
                        {"device": injector.device.serial_number, "fault": fault.describe()}
                    )
                return {"ok": True, "added": added}
            if op == "clear":
                kind = request.get("kind")
                fault_kind = FaultKind(kind) if kind else None
                removed = sum(
                    injector.clear(fault_kind)
                    for injector in self._select(str(request.get("device", "*")))
                )
                return {"ok": True, "removed": removed}
            if op == "hand":
                return self._hand(request)
            if op == "skin":
                return self._skin(request)
            if op == "state":
                devices = [i.device for i in self._select(str(request.get("device", "*")))]
                return {"ok": True, "devices": [device_state(d) for d in devices]}
            raise FaultError(f"unknown op {op!r} ({', '.join(OPS)})")
        except (FaultError, ValueError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}

    def _devices_of(self, request: Mapping[str, Any], kind: type[D], what: str) -> list[D]:
        selector = str(request.get("device", "*"))
        devices = [i.device for i in self._select(selector)]
        chosen = [d for d in devices if isinstance(d, kind)]
        if selector != "*" and not chosen:
            raise FaultError(f"{request.get('op')}: {selector} is not {what}")
        if not chosen:
            raise FaultError(f"{request.get('op')}: no {what} is served")
        return chosen

    def _hand(self, request: Mapping[str, Any]) -> dict[str, Any]:
        massagers = self._devices_of(request, SimulatedMassager, "a massager")
        if _flag(request, "clear"):
            hand = HandScript.idle()
        else:
            zone = _zone(request.get("zone"))
            pressure_kpa = _number(request, "pressure_kpa", 0.0, MAX_HAND_PRESSURE_KPA)
            contact = _flag(request, "contact", default=True)
            hand = HandScript((HandSegment(0.0, HAND_HOLD_S, zone, pressure_kpa, contact=contact),))
        for massager in massagers:
            massager.hold_hand(hand)
        return {"ok": True, "applied": [_applied(m) for m in massagers]}

    def _skin(self, request: Mapping[str, Any]) -> dict[str, Any]:
        masks = self._devices_of(request, SimulatedLedMask, "an LED mask")
        temperature_c = (
            None
            if _flag(request, "clear")
            else _number(request, "temperature_c", *SKIN_TEMPERATURE_RANGE_C)
        )
        for mask in masks:
            mask.hold_skin_temperature(temperature_c)
        return {"ok": True, "applied": [_applied(m) for m in masks]}

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "device": serial,
                "faults": [f.describe() for f in injector.faults],
                "counts": dict(injector.counts),
            }
            for serial, injector in self.injectors.items()
        ]


D = TypeVar("D", bound=SimulatedDevice)
# A hand set over the control port holds on until changed (a billion seconds).
HAND_HOLD_S: Final = 1e9


def _flag(request: Mapping[str, Any], key: str, *, default: bool = False) -> bool:
    value = request.get(key, default)
    if not isinstance(value, bool):
        raise FaultError(f"{request.get('op')}: {key} must be true or false, got {value!r}")
    return value


def _number(request: Mapping[str, Any], key: str, low: float, high: float) -> float:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{request.get('op')}: {key} must be a number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise FaultError(f"{request.get('op')}: {key} must be in {low:g}..{high:g}, got {value}")
    return float(value)


def _zone(value: Any) -> Zone:
    if not isinstance(value, str) or value.lower() not in ZONE_CODES:
        names = ", ".join(ZONE_CODES)
        raise FaultError(f"hand: zone must be one of {names}, got {value!r}")
    return zone_named(value.lower())


def _applied(device: SimulatedDevice) -> dict[str, Any]:
    return {
        "device": device.serial_number,
        "uptime_s": device.uptime_s,
        "next_sequence": device.next_sequence,
    }


def device_state(device: SimulatedDevice) -> dict[str, Any]:
    """What a device does now, as JSON: actuators, program, recent events (device time)."""
    if device.is_powered:
        device.catch_up()
    reason = device.program_end_reason
    run = getattr(device, "program_run", None)
    state: dict[str, Any] = {
        "device": device.serial_number,
        "kind": device.kind_label,
        "powered": device.is_powered,
        "connected": device.is_connected,
        "uptime_s": device.uptime_s,
        "sample_rate_hz": device.sample_rate_hz,
        "next_sequence": device.next_sequence,
        "program_running": device.program_running,
        "program_step": run.index if run is not None else None,
        "program_end_reason": _name(reason),
        "events": [
            {
                "code": _name(event.code),
                "event_sequence": event.event_sequence,
                "device_time_ms": event.device_time_ms,
                "payload": event.payload.hex(),
            }
            for event in list(device.events)[-STATE_EVENTS:]
        ],
    }
    last = device.ring.range(device.ring.next_sequence - 1, 1)[1]
    if isinstance(device, SimulatedMassager):
        state |= {
            "motor_on": device.motor_on,
            "intensity": device.intensity,
            "mode": _name(device.mode),
            "zone": _name(device.zone),
            "contact": device.contact,
            "pressure_kpa": float(pressure_kpa(last)[0]) if len(last) else None,
        }
    elif isinstance(device, SimulatedLedMask):
        irradiance = {
            channel: float(last[field][0]) * IRRADIANCE_MW_CM2_PER_UNIT if len(last) else 0.0
            for channel, field in (
                ("red", "red_centi_mw_cm2"),
                ("near_infrared", "near_infrared_centi_mw_cm2"),
                ("blue", "blue_centi_mw_cm2"),
            )
        }
        state |= {
            "led_on": any(value > 0 for value in irradiance.values()),
            "irradiance_mw_cm2": irradiance,
            "skin_temperature_c": device.skin_temperature_c,
            "skin_temperature_held_c": device.skin_temperature_hold_c,
            "worn": device.worn,
            "treatment_running": device.treatment is not None,
        }
    return state


def _name(value: enum.Enum | int | None) -> str | int | None:
    if isinstance(value, enum.Enum):
        return value.name.lower()
    return value


class ControlServer:
    """One JSON request per line in, one JSON answer per line out."""

    def __init__(self, controller: FaultController, host: str = LOCALHOST, port: int = 0) -> None:
        self.controller = controller
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the control server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_client, self.host, self.port, limit=MAX_REQUEST_BYTES
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    answer = self.controller.handle(request)
                except ValueError as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                writer.write((json.dumps(answer) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()


async def control_request(host: str, port: int, request: Mapping[str, Any]) -> dict[str, Any]:
    """Send one request to a control port and return the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write((json.dumps(request) + "\n").encode())
        await writer.drain()
        answer: dict[str, Any] = json.loads(await reader.readline())
        return answer
    finally:
        writer.close()


def parse_fault_option(text: str) -> tuple[str, dict[str, Any]]:
    """``kind[:key=value,...][@device]`` -> (device selector, fault fields)."""
    device = "*"
    if "@" in text:
        text, device = text.rsplit("@", 1)
    kind, _, rest = text.partition(":")
    fields: dict[str, Any] = {"kind": kind.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not key=value (in {text!r})")
        fields[key.strip()] = _value(value.strip())
    return device, fields


def _value(text: str) -> Any:
    if "|" in text:
        return [_value(part) for part in text.split("|")]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


# --------------------------------------------------------------------------- commands


@click.group("qa")
def qa_group() -> None:
    """Serve simulated devices to other apps, with faults switchable at run time."""


@qa_group.command("serve")
@click.option("--massagers", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--masks", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--serial", "use_serial", is_flag=True, help="Serve each device on a pty.")
@click.option(
    "--tcp",
    "tcp_port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Serve each device on TCP from this port on (0: any free ports).",
)
@click.option("--host", default=LOCALHOST, show_default=True)
@click.option(
    "--control",
    "control_port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    show_default=True,
    help="Control port for run-time faults (0: any free port).",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    help="A fault from the start: kind[:key=value,...][@serial], e.g. drop:rate=0.1,burst=3.",
)
@click.option("--fast", is_flag=True, help="Run virtual time as fast as the CPU allows.")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0)
def serve_command(
    massagers: int,
    masks: int,
    seed: int,
    use_serial: bool,
    tcp_port: int | None,
    host: str,
    control_port: int,
    faults: tuple[str, ...],
    fast: bool,
    speed: float,
) -> None:
    """Run devices until Ctrl-C; print one line per device and link, and the control address."""
    if not use_serial and tcp_port is None:
        raise click.UsageError("choose --serial, --tcp PORT or both")
    parsed = [parse_fault_option(text) for text in faults]
    asyncio.run(
        serve(
            massagers,
            masks,
            seed,
            use_serial=use_serial,
            tcp_port=tcp_port,
            host=host,
            control_port=control_port,
            faults=parsed,
            fast=fast,
            speed=speed,
        )
    )


async def serve(
    massagers: int,
    masks: int,
    seed: int,
    *,
    use_serial: bool,
    tcp_port: int | None,
    host: str = LOCALHOST,
    control_port: int = 0,
    faults: Sequence[tuple[str, dict[str, Any]]] = (),
    fast: bool = False,
    speed: float = 1.0,
    stop: asyncio.Event | None = None,
) -> None:
    clock = VirtualClock(realtime=not fast, speed=speed)
    world = SimulatedWorld(seed=seed, clock=clock)
    for _ in range(massagers):
        world.add_massager()
    for _ in range(masks):
        world.add_mask()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # Windows' event loops have no add_signal_handler (NotImplementedError): Ctrl-C then
    # ends the run through KeyboardInterrupt instead.
    with contextlib.suppress(NotImplementedError, RuntimeError):
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    injectors = [FaultInjector(d, seed=seed, world=world).install() for d in world.devices]
    controller = FaultController(injectors, clock)
    for device, fields in faults:
        answer = controller.handle({"op": "add", "device": device, "fault": fields})
        if not answer["ok"]:
            raise click.BadParameter(answer["error"], param_hint="--fault")
    control = ControlServer(controller, host, control_port)
    ports: list[FaultablePtySerialPort | TcpDevicePort] = []
    try:
        async with world:
            for injector in injectors:
                injector.start()
            for index, served in enumerate(world.devices):
                ports += await _serve_device(served, index, use_serial, tcp_port, host)
            await control.start()
            control_host, control_port_used = control.address
            click.echo(f"control {control_host}:{control_port_used}")
            sys.stdout.flush()  # the other app waits for these lines
            clock.start()
            await stop.wait()
            await clock.stop()
            for injector in injectors:
                injector.stop()
            for port in ports:
                await port.stop()
            await control.stop()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signum)


async def _serve_device(
    device: SimulatedDevice, index: int, use_serial: bool, tcp_port: int | None, host: str
) -> list[FaultablePtySerialPort | TcpDevicePort]:
    label = device.kind_label
    ports: list[FaultablePtySerialPort | TcpDevicePort] = []
    if use_serial:
        pty = FaultablePtySerialPort(device)
        await pty.start()
        ports.append(pty)
        click.echo(f"{label} {device.serial_number} serial {pty.path}")
    if tcp_port is not None:
        tcp = TcpDevicePort(device, host=host, port=tcp_port + index if tcp_port else 0)
        await tcp.start()
        ports.append(tcp)
        tcp_host, port = tcp.address
        click.echo(f"{label} {device.serial_number} tcp {tcp_host}:{port}")
    return ports


@qa_group.command("send")
@click.option("--control", "address", required=True, help="HOST:PORT printed by 'qa serve'.")
@click.argument("request")
def send_command(address: str, request: str) -> None:
    """Send one JSON REQUEST to a running 'qa serve' (hand, skin, state, ...); print the answer.

    Example: devicebridge-sim qa send --control 127.0.0.1:4000 '{"op": "state"}'
    """
    host, port = _control_address(address)
    try:
        body = json.loads(request)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="REQUEST") from None
    if not isinstance(body, dict):
        raise click.BadParameter("a request is a JSON object", param_hint="REQUEST")
    answer = asyncio.run(control_request(host, port, body))
    click.echo(json.dumps(answer, indent=2))
    if not answer.get("ok"):
        sys.exit(1)


def _control_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{address!r} is not HOST:PORT", param_hint="--control")
    return host or LOCALHOST, int(port)


@qa_group.command("fault")
@click.option("--control", "address", required=True, help="HOST:PORT printed by 'qa serve'.")
@click.argument("op", type=click.Choice(["add", "clear", "list"]))
@click.argument("spec", required=False)
@click.option("--device", default="*", show_default=True, help="Serial number, or '*' for all.")
def fault_command(address: str, op: str, spec: str | None, device: str) -> None:
    """Switch faults of a running 'qa serve': add SPEC, clear [KIND], or list."""
    host, port = _control_address(address)
    request: dict[str, Any] = {"op": op, "device": device}
    if op == "add":
        if spec is None:
            raise click.UsageError("add needs a fault: kind[:key=value,...]")
        selector, fields = parse_fault_option(spec)
        request["fault"] = fields
        if selector != "*":
            request["device"] = selector
    elif op == "clear" and spec:
        request["kind"] = spec
    answer = asyncio.run(control_request(host, port, request))
    click.echo(json.dumps(answer, indent=2))
    if not answer.get("ok"):
        sys.exit(1)
