"""Which link an update goes over: our BLE link, a serial SMP console, or UDP.

A BLE device is reached through :class:`SmpBleLink` (found by the serial number
it advertises). A serial device's SMP console is a port of its own (Zephyr's
"SMP over console" framing is not our OFCP framing), given with ``--smp-port``;
smpclient's serial transport drives it. UDP (``--smp-udp HOST[:PORT]``, port
1337 by default) uses smpclient's UDP transport.
"""

from __future__ import annotations

from typing import Final

from smpclient.transport.serial import SMPSerialTransport
from smpclient.transport.udp import SMPUDPTransport

from devicebridge.app import App
from devicebridge.clock import SystemClock
from devicebridge.errors import DeviceNotFoundError
from devicebridge.firmware.transport import BleSmpTransport, SmpBleLink
from devicebridge.firmware.updater import FirmwareUpdater
from devicebridge.storage.registry import PairedDevice

SMP_UDP_PORT: Final = 1337


class _UdpTransport(SMPUDPTransport):
    """smpclient's UDP transport on a port other than 1337 (``SMPClient`` passes none)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._port = port

    async def connect(self, address: str, timeout_s: float, port: int = SMP_UDP_PORT) -> None:
        del port
        await super().connect(address, timeout_s, self._port)


def parse_udp_endpoint(text: str) -> tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):
        return text, SMP_UDP_PORT
    if not port.isdigit() or not 0 < int(port) < 1 << 16:
        raise ValueError(f"{text!r}: the port must be a number 1..65535")
    return host.strip("[]"), int(port)


def updater_for(
    app: App,
    paired: PairedDevice,
    *,
    smp_port: str | None = None,
    smp_udp: str | None = None,
) -> FirmwareUpdater:
    """An updater for ``paired`` over the link the options (or its pairing) name."""
    if smp_udp is not None:
        host, port = parse_udp_endpoint(smp_udp)
        # Like serial, a UDP device runs on its own time: waits use the wall clock.
        return FirmwareUpdater(_UdpTransport(port), SystemClock(), device=paired.name, address=host)
    if smp_port is not None:
        return FirmwareUpdater(
            SMPSerialTransport(), SystemClock(), device=paired.name, address=smp_port
        )
    if paired.transport == "serial":
        raise DeviceNotFoundError(
            paired.name,
            where="paired over serial: give its SMP console with --smp-port "
            "(a port of its own, not the OFCP port) or --smp-udp",
        )
    link = SmpBleLink(
        app.clock,
        serial_number=paired.serial_number,
        address=paired.last_address,
        backends=app.ble_backends,
        find_timeout_s=app.settings.scan_timeout_s,
    )
    return FirmwareUpdater(BleSmpTransport(link, app.clock), app.clock, device=paired.name)
