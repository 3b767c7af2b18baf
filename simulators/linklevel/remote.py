"""Link-level mode across processes: the simulator serves HCI on TCP, the host connects.

``python -m simulators.linklevel --massagers 2 --masks 1`` runs a
:class:`~simulators.linklevel.world.LinkLevelWorld` in its own process and
exposes one more virtual controller on its link over HCI on TCP; it prints
``hci tcp-client:127.0.0.1:PORT`` and then one line per device. The host side
powers a bumble central on that controller (:class:`RemoteLinkLevel`) and
passes its backends to bleak exactly like an in-process world's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import socket
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Final

from bumble.controller import Controller
from bumble.transport.common import Transport
from bumble.transport.tcp_server import open_tcp_server_transport_with_socket

from simulators.linklevel.central import (
    LinkLevelBleakClient,
    LinkLevelBleakScanner,
    LinkLevelCentral,
    bind_client,
    bind_scanner,
)
from simulators.linklevel.peripheral import DLE_ACL_DATA_PACKET_BYTES
from simulators.linklevel.world import (
    DEFAULT_SPEED,
    LinkLevelWorld,
    controller_address,
    link_level_clock,
)
from simulators.links.tcp_port import LOCALHOST

HCI_LINE_PREFIX: Final = "hci "
# A second central address: the world's own in-process central keeps the default.
REMOTE_CENTRAL_ADDRESS: Final = "C0:DE:B1:D6:E0:02"


class RemoteLinkLevel:
    """The host's adapter in front of a simulator process that serves HCI on TCP.

    ``hci`` is a bumble transport name such as ``tcp-client:127.0.0.1:9100``
    (the line the simulator prints). Use as ``async with`` and pass
    ``scanner_backend`` / ``client_backend`` to bleak.
    """

    def __init__(self, hci: str) -> None:
        self.hci = hci
        self.central = LinkLevelCentral(address=REMOTE_CENTRAL_ADDRESS)

    async def __aenter__(self) -> RemoteLinkLevel:
        await self.central.open_transport(self.hci)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.central.close()

    @functools.cached_property
    def scanner_backend(self) -> type[LinkLevelBleakScanner]:
        return bind_scanner(self.central)

    @functools.cached_property
    def client_backend(self) -> type[LinkLevelBleakClient]:
        return bind_client(self.central)


async def serve(
    world: LinkLevelWorld, *, host: str = LOCALHOST, port: int = 0
) -> tuple[Controller, Transport, int]:
    """Expose a controller on ``world``'s link over HCI on TCP; returns it and the port.

    Call with the world open. One host connects at a time (bumble's TCP server).
    """
    if world.link is None:
        raise RuntimeError("open the world before serving it")
    listener = socket.create_server((host, port))
    bound_port = int(listener.getsockname()[1])
    transport = await open_tcp_server_transport_with_socket(listener)
    controller = Controller(
        "hci-tcp", host_source=transport.source, host_sink=transport.sink, link=world.link
    )
    controller.le_acl_data_packet_length = DLE_ACL_DATA_PACKET_BYTES
    return controller, transport, bound_port


async def _main(args: argparse.Namespace) -> None:
    world = LinkLevelWorld(seed=args.seed, clock=link_level_clock(args.speed))
    for _ in range(args.massagers):
        world.add_massager()
    for _ in range(args.masks):
        world.add_mask()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with world:
        world.clock.start()
        _controller, transport, port = await serve(world, host=args.host, port=args.port)
        print(f"{HCI_LINE_PREFIX}tcp-client:{args.host}:{port}", flush=True)
        for device in world.devices:
            print(
                f"{device.kind.name.lower()} {device.serial_number} {device.name} "
                f"{controller_address(device)}",
                flush=True,
            )
        try:
            await stop.wait()
        finally:
            await world.clock.stop()
            await transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.linklevel",
        description="Simulated devices behind virtual Bluetooth controllers, HCI on TCP.",
    )
    parser.add_argument("--massagers", type=int, default=1)
    parser.add_argument("--masks", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", type=float, default=DEFAULT_SPEED, help="virtual s per wall s")
    parser.add_argument("--host", default=LOCALHOST)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    if args.massagers < 0 or args.masks < 0 or args.massagers + args.masks == 0:
        parser.error("give at least one device (--massagers, --masks)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
