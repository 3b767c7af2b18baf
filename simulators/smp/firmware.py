"""One device's MCUboot slots and MCUmgr server (OS and image management groups).

Requests arrive as whole SMP messages from a transport (GATT writes reassembled
by the header's length, a serial console frame, a UDP datagram); each gets one
response message back through the ``reply`` function the transport passes in.

MCUboot behaviour (swap with revert, as in Zephyr's default configuration):

* an upload goes to the secondary slot; a partial upload is kept, keyed by the
  image's SHA-256 and length, so a client that starts again with the same
  ``sha`` continues from the offset the reply gives (until a reset: RAM state);
* ``test`` marks the secondary slot for one trial boot; at the next reset the
  slots swap and the new image runs unconfirmed; if it is not confirmed before
  the following reset, MCUboot swaps back ("revert");
* ``confirm`` makes the running image permanent (or marks the secondary slot
  for a permanent swap);
* :attr:`SmpFirmware.fails_new_image_boot` makes a newly swapped image crash
  before it can confirm itself: the watchdog resets, MCUboot reverts, and the
  device comes back on the old image.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import cbor2

from protocols import ResetReason, ShutdownReason
from simulators.device import FIRMWARE_REVISION, SimulatedDevice
from simulators.link import Channel
from simulators.smp.constants import (
    IMAGE_MAGIC_BYTES,
    OP_MASK,
    SMP_HEADER,
    SMP_HEADER_SIZE,
    VERSION_MASK,
    VERSION_SHIFT,
    Group,
    ImageCommand,
    ImgErr,
    MgmtErr,
    Op,
    OsCommand,
)
from simulators.smp.image import (
    IMAGE_HEADER,
    ImageCheckError,
    ImageVersion,
    build_image,
    check_image,
)

# Zephyr's nRF Connect SDK "fast DFU" netbuf (CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE=2475).
DEFAULT_BUF_SIZE: Final = 2475
DEFAULT_BUF_COUNT: Final = 4
DEFAULT_SLOT_BYTES: Final = 512 * 1024
FACTORY_VERSION: Final = "1.0.0"
FACTORY_BODY_BYTES: Final = 4096
# The reset reply must leave before the radio goes down (Zephyr waits ~250 ms).
RESET_DELAY_S: Final = 0.25
BOOT_TIME_S: Final = 0.5
# MCUboot copies the slots through a scratch area; a small image swaps in a few seconds.
SWAP_TIME_S: Final = 2.0
# Application throughput of a BLE link with data length extension: about 0.8 Mbps
# (ble-and-ecosystem.md). None: responses leave at once.
DEFAULT_BLE_BYTES_PER_S: Final = 100_000
ATT_OVERHEAD_BYTES: Final = 3
VERSION_V2: Final = 1

Reply = Callable[[bytes], None]


class SwapKind(enum.Enum):
    TEST = "test"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Slot:
    """An image in flash: its bytes, what the image check found, and the DIS label."""

    data: bytes
    version: ImageVersion
    hash: bytes
    model: str | None
    label: str  # the Device Information firmware revision while it runs
    confirmed: bool = False

    @classmethod
    def of(cls, data: bytes, *, label: str | None = None, confirmed: bool = False) -> Slot:
        image = check_image(data)
        return cls(
            data, image.version, image.hash, image.model, label or str(image.version), confirmed
        )


@dataclass(slots=True)
class _Upload:
    length: int
    sha: bytes | None
    data: bytearray = field(default_factory=bytearray)


class BleNotifier(Protocol):
    """The part of the simulated bleak client the SMP characteristic notifies through."""

    @property
    def mtu_size(self) -> int: ...

    @property
    def is_connected(self) -> bool: ...

    def deliver(self, channel: Channel, message: bytes) -> None: ...


class SmpError(Exception):
    """A request the server answers with an error (``rc``, and the group for SMP v2)."""

    def __init__(self, rc: int, *, group: int | None = None) -> None:
        super().__init__(rc)
        self.rc = rc
        self.group = group


def _img_error(rc: ImgErr) -> SmpError:
    return SmpError(rc, group=Group.IMAGE)


class SmpFirmware:
    """The SMP server and flash slots of one simulated device."""

    def __init__(
        self,
        device: SimulatedDevice,
        *,
        buf_size: int = DEFAULT_BUF_SIZE,
        buf_count: int = DEFAULT_BUF_COUNT,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        ble_bytes_per_s: float | None = DEFAULT_BLE_BYTES_PER_S,
    ) -> None:
        self.device = device
        self.clock = device.clock
        self.buf_size = buf_size
        self.buf_count = buf_count
        self.slot_bytes = slot_bytes
        self.ble_bytes_per_s = ble_bytes_per_s
        factory = build_image(
            FACTORY_VERSION, device.model_number, body_bytes=FACTORY_BODY_BYTES, seed=device.index
        )
        self.primary = Slot.of(factory, label=FIRMWARE_REVISION, confirmed=True)
        self.secondary: Slot | None = None
        self.pending: SwapKind | None = None
        self.fails_new_image_boot = False
        self.reject_model_mismatch = True
        self._upload: _Upload | None = None
        self._ble_rx = bytearray()
        self._ble_client: BleNotifier | None = None
        self._ble_busy_until_s = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        # Counters for tests and benchmarks.
        self.requests = 0
        self.rx_bytes = 0
        self.upload_bytes = 0  # image bytes that arrived in upload requests
        self.upload_resumes = 0
        self.resets = 0
        self.boots = 0
        self.reverts = 0
        # Test hook: called with the new offset after every upload write.
        self.on_upload_write: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ state

    @property
    def running_version(self) -> str:
        return str(self.primary.version)

    @property
    def upload_offset(self) -> int | None:
        """Bytes of the partial upload kept in RAM (``None``: none in progress)."""
        return None if self._upload is None else len(self._upload.data)

    @property
    def reverts_at_next_boot(self) -> bool:
        """The running image is on trial: the next reset swaps back unless confirmed."""
        return not self.primary.confirmed

    async def stop(self) -> None:
        """Cancel pending resets; raise what one of them died of."""
        tasks, self._tasks = set(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._errors:
            raise RuntimeError("an SMP firmware task crashed") from self._errors[0]

    # ------------------------------------------------------------------ transports

    def receive_ble(self, client: BleNotifier, data: bytes) -> None:
        """One write-without-response on the SMP characteristic."""
        if client is not self._ble_client:
            # A new connection: whatever half message the old one left is garbage.
            self._ble_client = client
            self._ble_rx.clear()
        self._ble_rx += data
        while len(self._ble_rx) >= SMP_HEADER_SIZE:
            length = SMP_HEADER.unpack_from(self._ble_rx)[2]
            total = SMP_HEADER_SIZE + length
            if len(self._ble_rx) < total:
                return
            message = bytes(self._ble_rx[:total])
            del self._ble_rx[:total]
            self.handle(message, functools.partial(self._notify, client, request_bytes=total))

    def _notify(self, client: BleNotifier, response: bytes, request_bytes: int) -> None:
        payload = max(1, client.mtu_size - ATT_OVERHEAD_BYTES)
        chunks = [response[i : i + payload] for i in range(0, len(response), payload)]
        if self.ble_bytes_per_s is None:
            for chunk in chunks:
                client.deliver(Channel.SMP, chunk)
            return
        # The radio carries the request and the response one after the other; the
        # response leaves when both have had their airtime.
        airtime_bytes = request_bytes + len(response)
        airtime_bytes += ATT_OVERHEAD_BYTES * (len(chunks) + -(-request_bytes // payload))
        start_s = max(self.clock.now_s(), self._ble_busy_until_s)
        self._ble_busy_until_s = start_s + airtime_bytes / self.ble_bytes_per_s
        self._spawn(self._deliver_at(client, chunks, self._ble_busy_until_s))

    async def _deliver_at(self, client: BleNotifier, chunks: list[bytes], at_s: float) -> None:
        await self.clock.sleep_until(at_s)
        if client.is_connected:
            for chunk in chunks:
                client.deliver(Channel.SMP, chunk)

    def ble_link_lost(self) -> None:
        self._ble_client = None
        self._ble_rx.clear()

    # ------------------------------------------------------------------ dispatch

    def handle(self, message: bytes, reply: Reply) -> None:
        """One SMP request; the response goes to ``reply`` (nothing while powered off)."""
        if not self.device.is_powered or len(message) < SMP_HEADER_SIZE:
            return
        self.requests += 1
        self.rx_bytes += len(message)
        ver_op, _flags, length, group, sequence, command = SMP_HEADER.unpack_from(message)
        op = ver_op & OP_MASK
        version = (ver_op >> VERSION_SHIFT) & VERSION_MASK
        after: Callable[[], None] | None = None
        try:
            if op not in (Op.READ, Op.WRITE) or len(message) != SMP_HEADER_SIZE + length:
                raise SmpError(MgmtErr.EINVAL)
            try:
                body = cbor2.loads(message[SMP_HEADER_SIZE:]) if length else {}
            except (cbor2.CBORDecodeError, ValueError) as exc:
                raise SmpError(MgmtErr.EINVAL) from exc
            if not isinstance(body, dict):
                raise SmpError(MgmtErr.EINVAL)
            response, after = self._dispatch(Op(op), group, command, body)
        except SmpError as error:
            if error.group is not None and version >= VERSION_V2:
                response = {"err": {"group": error.group, "rc": error.rc}}
            else:
                response = {"rc": error.rc if error.group is None else MgmtErr.EUNKNOWN}
        payload = cbor2.dumps(response, canonical=True)
        header = SMP_HEADER.pack(
            (version << VERSION_SHIFT) | (op + 1), 0, len(payload), group, sequence, command
        )
        reply(header + payload)
        if after is not None:
            after()

    def _dispatch(
        self, op: Op, group: int, command: int, body: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable[[], None] | None]:
        write = op is Op.WRITE
        match (group, command, write):
            case (Group.OS, OsCommand.ECHO, True):
                text = body.get("d")
                if not isinstance(text, str):
                    raise SmpError(MgmtErr.EINVAL)
                return {"r": text}, None
            case (Group.OS, OsCommand.RESET, True):
                return {}, self._schedule_reset
            case (Group.OS, OsCommand.MCUMGR_PARAMETERS, False):
                return {"buf_size": self.buf_size, "buf_count": self.buf_count}, None
            case (Group.IMAGE, ImageCommand.STATE, False):
                return self._state_response(), None
            case (Group.IMAGE, ImageCommand.STATE, True):
                self._state_write(body)
                return self._state_response(), None
            case (Group.IMAGE, ImageCommand.UPLOAD, True):
                return self._upload_write(body), None
            case (Group.IMAGE, ImageCommand.ERASE, True):
                self._erase(body)
                return {}, None
        raise SmpError(MgmtErr.ENOTSUP)

    # ------------------------------------------------------------------ image management

    def _state_response(self) -> dict[str, Any]:
        images: list[dict[str, Any]] = []
        primary: dict[str, Any] = {
            "image": 0,
            "slot": 0,
            "version": str(self.primary.version),
            "hash": self.primary.hash,
            "bootable": True,
            "active": True,
        }
        if self.primary.confirmed:
            primary["confirmed"] = True
        images.append(primary)
        if self.secondary is not None:
            secondary: dict[str, Any] = {
                "image": 0,
                "slot": 1,
                "version": str(self.secondary.version),
                "hash": self.secondary.hash,
                "bootable": True,
            }
            if self.pending is not None:
                secondary["pending"] = True
            if self.pending is SwapKind.PERMANENT:
                secondary["permanent"] = True
            if self.reverts_at_next_boot:
                # Zephyr shows the image a revert will restore as confirmed.
                secondary["confirmed"] = True
            images.append(secondary)
        return {"images": images, "splitStatus": 0}

    def _state_write(self, body: dict[str, Any]) -> None:
        digest = body.get("hash")
        confirm = bool(body.get("confirm", False))
        if digest is not None and not isinstance(digest, bytes):
            raise SmpError(MgmtErr.EINVAL)
        if confirm and (digest is None or digest == self.primary.hash):
            self.primary = replace(self.primary, confirmed=True)
            return
        if digest is None:
            raise SmpError(MgmtErr.EINVAL)
        if digest == self.primary.hash:
            raise _img_error(ImgErr.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED)
        if self.secondary is None or digest != self.secondary.hash:
            raise _img_error(ImgErr.HASH_NOT_FOUND)
        if self.reverts_at_next_boot:
            # The secondary slot holds the image a revert needs; it cannot be swapped in.
            raise _img_error(ImgErr.NO_FREE_SLOT)
        self.pending = SwapKind.PERMANENT if confirm else SwapKind.TEST

    def _upload_write(self, body: dict[str, Any]) -> dict[str, Any]:
        offset = body.get("off")
        data = body.get("data")
        if not isinstance(offset, int) or not isinstance(data, bytes):
            raise SmpError(MgmtErr.EINVAL)
        if body.get("image", 0) != 0:
            raise _img_error(ImgErr.INVALID_SLOT)
        self.upload_bytes += len(data)
        if offset == 0:
            resumed = self._begin_upload(body, data)
            if resumed is not None:
                return resumed
        else:
            upload = self._upload
            if upload is None:
                raise _img_error(ImgErr.INVALID_OFFSET)
            if offset != len(upload.data):
                # A chunk the device already has, or one past a gap: say where to go on.
                return {"off": len(upload.data)}
            if offset + len(data) > upload.length:
                raise _img_error(ImgErr.INVALID_IMAGE_DATA_OVERRUN)
            upload.data += data
        upload = self._upload
        assert upload is not None
        done = len(upload.data)
        if self.on_upload_write is not None:
            self.on_upload_write(done)
        if done < upload.length:
            return {"off": done}
        return self._finish_upload(upload)

    def _begin_upload(self, body: dict[str, Any], data: bytes) -> dict[str, Any] | None:
        length = body.get("len")
        sha = body.get("sha")
        if not isinstance(length, int) or length <= 0:
            raise _img_error(ImgErr.INVALID_LENGTH)
        if sha is not None and not isinstance(sha, bytes):
            raise _img_error(ImgErr.INVALID_HASH)
        if self.pending is not None:
            raise _img_error(ImgErr.IMAGE_ALREADY_PENDING)
        if self.reverts_at_next_boot:
            raise _img_error(ImgErr.NO_FREE_SLOT)
        current = self._upload
        if (
            current is not None
            and sha is not None
            and current.sha == sha
            and current.length == length
            and current.data
        ):
            self.upload_resumes += 1
            return {"off": len(current.data)}
        if length > self.slot_bytes:
            raise _img_error(ImgErr.INVALID_IMAGE_TOO_LARGE)
        if len(data) >= len(IMAGE_MAGIC_BYTES) and not data.startswith(IMAGE_MAGIC_BYTES):
            raise _img_error(ImgErr.INVALID_IMAGE_HEADER_MAGIC)
        if len(data) > length:
            raise _img_error(ImgErr.INVALID_IMAGE_DATA_OVERRUN)
        if body.get("upgrade") and len(data) >= IMAGE_HEADER.size:
            *_, major, minor, revision, build = IMAGE_HEADER.unpack_from(data)
            if ImageVersion(major, minor, revision, build) <= self.primary.version:
                raise _img_error(ImgErr.CURRENT_VERSION_IS_NEWER)
        # A new upload erases the secondary slot.
        self.secondary = None
        self._upload = _Upload(length, sha, bytearray(data))
        return None

    def _finish_upload(self, upload: _Upload) -> dict[str, Any]:
        self._upload = None
        data = bytes(upload.data)
        response: dict[str, Any] = {"off": len(data)}
        if upload.sha is not None:
            response["match"] = hashlib.sha256(data).digest() == upload.sha
        try:
            self.secondary = Slot.of(data)
        except ImageCheckError:
            # Stored as written; MCUboot would refuse to boot it, and test says so.
            self.secondary = Slot(
                data, ImageVersion(0, 0, 0), hashlib.sha256(data).digest(), None, "invalid"
            )
        return response

    def _erase(self, body: dict[str, Any]) -> None:
        slot = body.get("slot", 1)
        if slot != 1:
            raise _img_error(ImgErr.INVALID_SLOT)
        if self.pending is not None:
            raise _img_error(ImgErr.IMAGE_ALREADY_PENDING)
        if self.reverts_at_next_boot:
            raise _img_error(ImgErr.NO_FREE_SLOT)
        self.secondary = None
        self._upload = None

    # ------------------------------------------------------------------ reset and boot

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._errors.append(task.exception())  # type: ignore[arg-type]

    def _schedule_reset(self) -> None:
        self._spawn(self.reset(delay_s=RESET_DELAY_S))

    async def reset(self, *, delay_s: float = 0.0) -> None:
        """Reset the device (as the reset command or a watchdog does) and boot it again."""
        if delay_s > 0:
            await self.clock.sleep(delay_s)
        self.resets += 1
        self._power_down()
        await self.device.stop()
        await self.clock.sleep(self._boot())
        self.device.start(ResetReason.SOFTWARE)

    def _power_down(self) -> None:
        self.device.power_off(ShutdownReason.HOST)
        self.ble_link_lost()
        # RAM is gone: the partial upload with it.
        self._upload = None

    def _boot(self) -> float:
        """MCUboot's decision at power-up; returns how long booting takes."""
        self.boots += 1
        boot_s = BOOT_TIME_S
        if self.pending is not None and self.secondary is not None:
            kind, self.pending = self.pending, None
            old = self.primary
            self.primary = replace(self.secondary, confirmed=kind is SwapKind.PERMANENT)
            self.secondary = replace(old, confirmed=False)
            boot_s += SWAP_TIME_S
            if self.fails_new_image_boot and kind is SwapKind.TEST:
                # The new image dies before confirming; the watchdog resets, MCUboot reverts.
                boot_s += BOOT_TIME_S + self._revert()
        elif self.reverts_at_next_boot:
            boot_s += self._revert()
        self.pending = None
        self.device.firmware_revision = self.primary.label
        return boot_s

    def _revert(self) -> float:
        assert self.secondary is not None
        self.reverts += 1
        trial = self.primary
        self.primary = replace(self.secondary, confirmed=True)
        self.secondary = replace(trial, confirmed=False)
        return SWAP_TIME_S
