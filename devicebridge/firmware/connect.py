"""Which link an update goes over: our BLE link, a serial SMP console, or UDP.

A BLE device is reached through :class:`SmpBleLink` (found by the serial number
it advertises). A serial device's SMP console is a port of its own (Zephyr's
"SMP over console" framing is not our OFCP framing), given with ``--smp-port``;
smpclient's serial transport drives it. UDP (``--smp-udp HOST[:PORT]``, port
1337 by default) uses smpclient's UDP transport.

Uploads are pipelined up to the device's buffers over BLE and UDP. Over a serial
console they go one request at a time: the console's line buffers
(``CONFIG_UART_MCUMGR_RX_BUF_COUNT``, 2 by default) fill while the device writes
flash, and MCUmgr parameters do not report them.
"""

from __future__ import annotations

from typing import Final

from smpclient.transport import SMPTransportDisconnected
from smpclient.transport.serial import SMPSerialTransport
from smpclient.transport.udp import SMPUDPTransport

from devicebridge.app import App
from devicebridge.clock import SystemClock
from devicebridge.core.catalogue import OFCP_DRIVER
from devicebridge.errors import DeviceNotFoundError
from devicebridge.firmware.channel import SMP_HEADER_BYTES, smp_message_bytes
from devicebridge.firmware.errors import FirmwareError
from devicebridge.firmware.transport import BleSmpTransport, SmpBleLink
from devicebridge.firmware.updater import FirmwareUpdater
from devicebridge.storage.registry import PairedDevice

SMP_UDP_PORT: Final = 1337
SERIAL_REQUESTS_IN_FLIGHT: Final = 1


class _UdpTransport(SMPUDPTransport):
    """smpclient's UDP transport on a port of our choice, reading any SMP message.

    smpclient's ``receive`` parses the header with smp's ``Header``, which refuses
    command ids missing from smp's table (Zephyr's image slot info): this one reads
    the length with struct, and is otherwise the same.
    """

    def __init__(self, port: int) -> None:
        super().__init__()
        self._port = port

    async def connect(self, address: str, timeout_s: float, port: int = SMP_UDP_PORT) -> None:
        del port
        await super().connect(address, timeout_s, self._port)

    async def receive(self) -> bytes:
        message = bytearray(await self._client.receive())
        while len(message) < SMP_HEADER_BYTES or len(message) < smp_message_bytes(message):
            message += await self._client.receive()
        if len(message) > smp_message_bytes(message):
            raise SMPTransportDisconnected(
                f"a datagram longer than its SMP message ({len(message)} bytes)"
            )
        return bytes(message)


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
    family = app.catalogue.family(paired.family)
    if family is not None and family.driver != OFCP_DRIVER:
        # Only OFCP devices speak MCUmgr beside the profile; nothing public says how
        # another family's firmware is updated.
        raise FirmwareError(
            f"a {family.name} device: its firmware is not updated through devicebridge "
            "(use the maker's app)",
            device=paired.name,
        )
    if smp_udp is not None:
        host, port = parse_udp_endpoint(smp_udp)
        # Like serial, a UDP device runs on its own time: waits use the wall clock.
        return FirmwareUpdater(_UdpTransport(port), SystemClock(), device=paired.name, address=host)
    if smp_port is not None:
        return FirmwareUpdater(
            SMPSerialTransport(),
            SystemClock(),
            device=paired.name,
            address=smp_port,
            max_in_flight=SERIAL_REQUESTS_IN_FLIGHT,
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
