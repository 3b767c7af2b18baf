"""A simulated device behind a TCP socket, framed like the serial line (COBS + CRC-32).

For apps that cannot open a pty (a phone app on an emulator, a test rig on another
machine): connect to ``host:port`` and speak OFCP serial framing (docs/protocol.md, 8).
One client at a time; a second one is refused. When the client goes, the device forgets
its stream (as after a link loss) and keeps sampling into its ring; a device that powers
off or reboots closes the connection, and the client connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from protocols import FrameDecoder, encode_frame
from protocols.serial_framing import MAX_MESSAGE_BYTES
from simulators.devices.device import SimulatedDevice
from simulators.devices.link import Channel
from simulators.links.pty import READ_CHUNK_BYTES
from simulators.links.serial_port import DEFAULT_MAX_BUFFERED_BYTES

# Where the simulator's servers listen unless told otherwise: this machine only.
LOCALHOST: Final = "127.0.0.1"


class TcpDevicePort:
    """One device on one TCP port: ``await start()``, give the client ``address``, ``stop()``."""

    def __init__(
        self,
        device: SimulatedDevice,
        *,
        host: str = LOCALHOST,
        port: int = 0,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ) -> None:
        self.device = device
        self.host = host
        self.port = port
        self._max_buffered_bytes = max_buffered_bytes
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._decoder = FrameDecoder()
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frame_errors = 0
        self.connections = 0

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the port is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._on_client, self.host, self.port)
            self.device.clock.attach_io_link()

    async def stop(self) -> None:
        server, self._server = self._server, None
        self._drop_client()
        if server is not None:
            self.device.clock.detach_io_link()
            server.close()
            await server.wait_closed()
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ------------------------------------------------------------------ connections

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None or not self.device.is_powered or self.device.is_connected:
            writer.close()  # one host at a time, and none while the device is off or busy
            return
        self._writer = writer
        self._decoder = FrameDecoder()
        self.connections += 1
        self.device.attach_link(self)
        self._reader_task = asyncio.current_task()
        try:
            while True:
                data = await reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                messages, errors = self._decoder.feed(data)
                self.frame_errors += len(errors)
                for message in messages:
                    self.device.receive(Channel.CONTROL, message)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self._writer is writer:
                self._release()
            writer.close()

    def _release(self) -> None:
        self._writer = None
        if self.device.link is self:
            self.device.detach_link()

    def _drop_client(self) -> None:
        writer = self._writer
        if writer is not None:
            self._release()
            with contextlib.suppress(RuntimeError):
                writer.close()

    # ------------------------------------------------------------------ DeviceLink

    @property
    def max_payload_bytes(self) -> int:
        return MAX_MESSAGE_BYTES

    def send(self, channel: Channel, message: bytes) -> None:
        self.send_frame(channel, encode_frame(message))

    def send_frame(self, channel: Channel, frame: bytes) -> None:
        """Write one already framed message (fault injection works on frames)."""
        if channel is Channel.BATTERY:
            return  # no Battery Service on a serial line: every sample carries the level
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        transport = writer.transport
        if transport.get_write_buffer_size() + len(frame) > self._max_buffered_bytes:
            self.frames_dropped += 1
            return
        writer.write(frame)
        self.frames_sent += 1

    def device_closed(self) -> None:
        """The device powered off (or rebooted): the connection drops."""
        self._drop_client()
