"""SMP over UDP: one datagram is one SMP message, the reply goes back to its sender."""

from __future__ import annotations

import asyncio
from typing import cast

from simulators.links.tcp_port import LOCALHOST
from simulators.smp.constants import SMP_UDP_PORT
from simulators.smp.firmware import SmpFirmware


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, firmware: SmpFirmware) -> None:
        self.firmware = firmware
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (the selector class does not subclass the ABC).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        transport = self.transport
        if transport is None:
            return
        self.firmware.handle(data, lambda response: transport.sendto(response, addr))


class SmpUdpServer:
    """The SMP server of one device on a UDP port (0: any free port; see :attr:`port`)."""

    def __init__(self, firmware: SmpFirmware, host: str = LOCALHOST, port: int = SMP_UDP_PORT):
        self.firmware = firmware
        self.host = host
        self._requested_port = port
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        if self._transport is None:
            raise RuntimeError("the SMP UDP server is not started")
        return int(self._transport.get_extra_info("sockname")[1])

    async def start(self) -> None:
        if self._transport is not None:
            return
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Protocol(self.firmware), local_addr=(self.host, self._requested_port)
        )
        self._transport = transport
        # Datagrams take wall time through the socket: the fast clock must let them.
        self.firmware.clock.attach_io_link()

    async def stop(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
            self.firmware.clock.detach_io_link()
