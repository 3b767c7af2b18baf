"""One device's MCUboot slots and MCUmgr server (OS and image management groups).

Requests arrive as whole SMP messages from a transport (GATT writes reassembled
by the header's length, a serial console frame, a UDP datagram); each gets one
response message back through the ``reply`` function the transport passes in.

The SMP server behaves as Zephyr's (``subsys/mgmt/mcumgr``):

* **buffers**: requests and responses share ``buf_count`` buffers of
  ``buf_size`` bytes (``CONFIG_MCUMGR_TRANSPORT_NETBUF_COUNT``/``_SIZE``, both
  advertised by MCUmgr parameters). Over BLE a request takes a buffer when its
  first packet arrives and keeps it until it has been processed; its response
  takes another one while it is processed and sent. A request that finds no
  free buffer is lost, and so is one whose response finds none (Zephyr answers
  neither). A client may therefore keep ``buf_count - 1`` requests in flight.
  Requests are processed one at a time, in the order they arrived.
* **upload**: the first request (``off`` 0) carries ``len`` and ``sha``; a
  partial upload is kept in RAM, keyed by that ``sha``, so a client that starts
  again with the same ``sha`` is answered with the offset to continue from. A
  request at any other offset than the one expected is dropped and answered
  with the expected offset (0 when no upload is in progress: it finished, or a
  reset lost it). A first request whose ``sha`` matches what the secondary slot
  already holds is answered at once as complete (``CONFIG_IMG_ENABLE_IMAGE_CHECK``).
* **slot info** (``CONFIG_MCUMGR_GRP_IMG_SLOT_INFO``): the size of each slot.

MCUboot behaviour (swap with revert, as in Zephyr's default configuration):

* an upload goes to the secondary slot;
* ``test`` marks the secondary slot for one trial boot; at the next reset the
  slots swap and the new image runs unconfirmed; if it is not confirmed before
  the following reset, MCUboot swaps back ("revert");
* ``confirm`` makes the running image permanent (or marks the secondary slot
  for a permanent swap);
* :attr:`SmpFirmware.fails_new_image_boot` makes a newly swapped image crash
  before it can confirm itself: the watchdog resets, MCUboot reverts, and the
  device comes back on the old image.

The BLE link has an airtime budget and connection events (:mod:`simulators.smp.radio`):
requests and responses take turns on air, so a client that waits for each
response before it sends the next request leaves the link idle until the next
connection event every time.
Flash and the slots survive between runs through :meth:`SmpFirmware.snapshot`
and :meth:`SmpFirmware.restore` (:mod:`simulators.smp.state`).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import cbor2

from protocols import ResetReason, ShutdownReason
from protocols.constants import ATT_HEADER_BYTES
from simulators.devices.device import FIRMWARE_REVISION, SimulatedDevice
from simulators.devices.link import Channel
from simulators.errors import ImageCheckError, SmpError
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
    IMAGE_HEADER_SIZE,
    SHA256_BYTES,
    ImageVersion,
    build_image,
    check_image,
)
from simulators.smp.radio import Direction, Radio

# Zephyr's nRF Connect SDK "fast DFU" netbuf (CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE=2475),
# and Zephyr's default CONFIG_MCUMGR_TRANSPORT_NETBUF_COUNT.
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
VERSION_V2: Final = 1
SNAPSHOT_FORMAT: Final = 1

Reply = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class RequestSeen:
    """A request as the server decoded it (what a reply fault hook decides on)."""

    group: int
    command: int
    sequence: int
    body: dict[str, Any]


# Test hook: seconds a reply is held back (None: sent at once; math.inf: never sent).
ReplyDelay = Callable[[RequestSeen], float | None]


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


@dataclass(slots=True, eq=False)
class _AirRequest:
    """One request over BLE: on air, queued at the device, processed, or answered."""

    client: BleNotifier
    message: bytes
    generation: int  # of the connection it came over
    buffers: int = 0  # SMP buffers it holds: its own, and its response's


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
        flash_bytes_per_s: float | None = None,
    ) -> None:
        if buf_count < 1:
            raise ValueError(f"buf_count must be at least 1, got {buf_count}")
        self.device = device
        self.clock = device.clock
        self.buf_size = buf_size
        self.buf_count = buf_count
        self.slot_bytes = slot_bytes
        self.radio = Radio(self.clock, ble_bytes_per_s) if ble_bytes_per_s else None
        # How fast an upload chunk is written to flash (None: at once). Slower than the
        # link, requests queue in the device's buffers while it writes.
        self.flash_bytes_per_s = flash_bytes_per_s
        factory = build_image(
            FACTORY_VERSION, device.model_number, body_bytes=FACTORY_BODY_BYTES, seed=device.index
        )
        self.primary = Slot.of(factory, label=FIRMWARE_REVISION, confirmed=True)
        self.secondary: Slot | None = None
        self.pending: SwapKind | None = None
        self.fails_new_image_boot = False
        self.reject_model_mismatch = True
        self.supports_slot_info = True  # False: firmware built without SLOT_INFO (ENOTSUP)
        self._upload: _Upload | None = None
        self._ble_rx = bytearray()
        self._ble_client: BleNotifier | None = None
        self._on_air: set[_AirRequest] = set()
        self._work: collections.deque[_AirRequest] = collections.deque()
        self._work_task: asyncio.Task[None] | None = None
        self._buffers_in_use = 0
        self._link_generation = 0
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
        self.dropped_requests = 0  # no free buffer (BLE): lost without an answer
        self.replies_lost = 0  # by the reply_delay_s hook
        self.peak_buffers_in_use = 0
        self.peak_requests_in_flight = 0  # BLE: on air or at the device, not yet answered
        # Test hooks: called with the new offset after every upload write; and the
        # fate of every reply (see ReplyDelay).
        self.on_upload_write: Callable[[int], None] | None = None
        self.reply_delay_s: ReplyDelay | None = None

    # ------------------------------------------------------------------ state

    @property
    def ble_bytes_per_s(self) -> float | None:
        return self.radio.bytes_per_s if self.radio is not None else None

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

    @property
    def buffers_in_use(self) -> int:
        return self._buffers_in_use

    @property
    def requests_in_flight(self) -> int:
        return len(self._on_air)

    def snapshot(self) -> bytes:
        """Flash and RAM that outlive a host command: the slots, what is pending, and
        the partial upload (CBOR; :meth:`restore` reads it back)."""
        upload = self._upload
        return cbor2.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "primary": _slot_record(self.primary),
                "secondary": _slot_record(self.secondary),
                "pending": self.pending.value if self.pending is not None else None,
                "upload": None
                if upload is None
                else {"length": upload.length, "sha": upload.sha, "data": bytes(upload.data)},
            },
            canonical=True,
        )

    def restore(self, snapshot: bytes) -> None:
        """Put back what :meth:`snapshot` saved; ``ValueError`` (and no change) if it is
        not such a snapshot."""
        try:
            record = cbor2.loads(snapshot)
        except (cbor2.CBORDecodeError, ValueError) as exc:
            raise ValueError(f"not a firmware snapshot: {exc}") from exc
        if not isinstance(record, dict) or record.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a firmware snapshot of this format")
        primary = _slot_from_record(record.get("primary"))
        if primary is None:
            raise ValueError("the snapshot has no primary slot")
        secondary = _slot_from_record(record.get("secondary"))
        pending_text = record.get("pending")
        try:
            pending = SwapKind(pending_text) if pending_text is not None else None
        except ValueError as exc:
            raise ValueError(f"unknown pending swap {pending_text!r}") from exc
        upload = _upload_from_record(record.get("upload"))
        self.primary, self.secondary, self.pending, self._upload = (
            primary,
            secondary,
            pending,
            upload,
        )
        self.device.firmware_revision = primary.label

    async def stop(self) -> None:
        """Cancel pending resets and airtime; raise what one of them died of."""
        self._cancel_work()
        tasks, self._tasks = set(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.radio is not None:
            await self.radio.stop()
            self._errors.extend(self.radio.errors)
        if self._errors:
            raise RuntimeError("an SMP firmware task crashed") from self._errors[0]

    # ------------------------------------------------------------------ BLE

    def receive_ble(self, client: BleNotifier, data: bytes) -> None:
        """One write-without-response on the SMP characteristic."""
        if client is not self._ble_client:
            # A new connection: the old one (and all it had on air) is gone.
            self.ble_link_lost()
            self._ble_client = client
        self._ble_rx += data
        while len(self._ble_rx) >= SMP_HEADER_SIZE:
            length = SMP_HEADER.unpack_from(self._ble_rx)[2]
            total = SMP_HEADER_SIZE + length
            if len(self._ble_rx) < total:
                return
            message = bytes(self._ble_rx[:total])
            del self._ble_rx[:total]
            self._put_on_air(_AirRequest(client, message, self._link_generation))

    def ble_link_lost(self) -> None:
        """The connection is gone: a half message, what was on air, queued requests and
        their buffers (Zephyr drops the requests of a closed connection)."""
        self._ble_client = None
        self._ble_rx.clear()
        self._on_air.clear()
        self._work.clear()
        self._buffers_in_use = 0
        self._link_generation += 1
        if self.radio is not None:
            self.radio.clear()

    def _payload_bytes(self, client: BleNotifier) -> int:
        return max(1, client.mtu_size - ATT_HEADER_BYTES)

    def _is_current(self, request: _AirRequest) -> bool:
        return (
            request.generation == self._link_generation
            and request.client is self._ble_client
            and request.client.is_connected
        )

    def _put_on_air(self, request: _AirRequest) -> None:
        self._on_air.add(request)
        self.peak_requests_in_flight = max(self.peak_requests_in_flight, len(self._on_air))
        if self.radio is None:
            self._first_packet_arrived(request)
            self._request_arrived(request)
            return
        self.radio.send(
            Direction.TO_DEVICE,
            len(request.message),
            self._payload_bytes(request.client),
            on_first_packet=functools.partial(self._first_packet_arrived, request),
            on_last_packet=functools.partial(self._request_arrived, request),
        )

    def _first_packet_arrived(self, request: _AirRequest) -> None:
        # Zephyr's reassembly takes a buffer with the first packet (K_NO_WAIT), and
        # refuses a message longer than a buffer.
        if len(request.message) <= self.buf_size and self._take_buffer():
            request.buffers = 1

    def _request_arrived(self, request: _AirRequest) -> None:
        if not request.buffers:
            self.dropped_requests += 1
            self._on_air.discard(request)
            return
        if not self._is_current(request):
            self._done(request)
            return
        self._work.append(request)
        if self._work_task is None:
            self._work_next()

    def _work_next(self) -> None:
        """Process queued requests in arrival order, one at a time (Zephyr's SMP work queue)."""
        while self._work:
            request = self._work.popleft()
            # The response's buffer is taken before the handler runs (smp_alloc_rsp).
            if not self._take_buffer():
                self.dropped_requests += 1
                self._done(request)
                continue
            request.buffers += 1
            processing_s = self._processing_s(request.message)
            if processing_s > 0:
                self._work_task = asyncio.get_running_loop().create_task(
                    self._process_after(processing_s, request), name="SMP work queue"
                )
                self._work_task.add_done_callback(self._task_done)
                return
            self._process(request)

    async def _process_after(self, delay_s: float, request: _AirRequest) -> None:
        await self.clock.sleep(delay_s)
        self._work_task = None
        self._process(request)
        self._work_next()

    def _processing_s(self, message: bytes) -> float:
        """Flash time of an upload request (nothing else takes measurable time)."""
        if self.flash_bytes_per_s is None:
            return 0.0
        group, _sequence, command = SMP_HEADER.unpack_from(message)[3:]
        if (group, command) != (Group.IMAGE, ImageCommand.UPLOAD):
            return 0.0
        return (len(message) - SMP_HEADER_SIZE) / self.flash_bytes_per_s

    def _process(self, request: _AirRequest) -> None:
        self._answer(
            request.message,
            functools.partial(self._reply_on_air, request),
            on_silent=functools.partial(self._done, request),
        )
        if self._is_current(request) and request.buffers == 2:
            request.buffers = 1  # the request's own buffer goes once it has been handled
            self._release_buffer()

    def _reply_on_air(self, request: _AirRequest, response: bytes) -> None:
        client = request.client
        if request not in self._on_air or not self._is_current(request):
            self._done(request)
            return
        payload = self._payload_bytes(client)
        chunks = [response[i : i + payload] for i in range(0, len(response), payload)]

        def sent() -> None:
            self._done(request)
            if self._is_current(request):
                for chunk in chunks:
                    client.deliver(Channel.SMP, chunk)

        if self.radio is None:
            sent()
            return
        self.radio.send(Direction.TO_HOST, len(response), payload, on_last_packet=sent)

    def _done(self, request: _AirRequest) -> None:
        """The request is answered, dropped or lost: its buffers go back to the pool."""
        self._on_air.discard(request)
        if request.generation == self._link_generation:
            for _ in range(request.buffers):
                self._release_buffer()
        request.buffers = 0

    def _take_buffer(self) -> bool:
        if self._buffers_in_use >= self.buf_count:
            return False
        self._buffers_in_use += 1
        self.peak_buffers_in_use = max(self.peak_buffers_in_use, self._buffers_in_use)
        return True

    def _release_buffer(self) -> None:
        self._buffers_in_use -= 1
        assert self._buffers_in_use >= 0, "an SMP buffer was released twice"

    # ------------------------------------------------------------------ dispatch

    def handle(self, message: bytes, reply: Reply) -> None:
        """One SMP request; the response goes to ``reply`` (nothing while powered off)."""
        self._answer(message, reply, on_silent=lambda: None)

    def _answer(self, message: bytes, reply: Reply, *, on_silent: Callable[[], None]) -> None:
        if not self.device.is_powered or len(message) < SMP_HEADER_SIZE:
            on_silent()
            return
        response, after, seen = self._respond(message)
        delay_s = self.reply_delay_s(seen) if self.reply_delay_s is not None else None
        if delay_s is None:
            reply(response)
        elif math.isfinite(delay_s):
            self._spawn(self._reply_later(delay_s, reply, response, on_silent))
        else:
            self.replies_lost += 1
            on_silent()
        if after is not None:
            after()

    async def _reply_later(
        self, delay_s: float, reply: Reply, response: bytes, on_silent: Callable[[], None]
    ) -> None:
        await self.clock.sleep(delay_s)
        if self.device.is_powered:
            reply(response)
        else:
            on_silent()

    def _respond(self, message: bytes) -> tuple[bytes, Callable[[], None] | None, RequestSeen]:
        self.requests += 1
        self.rx_bytes += len(message)
        ver_op, _flags, length, group, sequence, command = SMP_HEADER.unpack_from(message)
        op = ver_op & OP_MASK
        version = (ver_op >> VERSION_SHIFT) & VERSION_MASK
        after: Callable[[], None] | None = None
        body: dict[str, Any] = {}
        try:
            if op not in (Op.READ, Op.WRITE) or len(message) != SMP_HEADER_SIZE + length:
                raise SmpError(MgmtErr.EINVAL)
            try:
                decoded = cbor2.loads(message[SMP_HEADER_SIZE:]) if length else {}
            except (cbor2.CBORDecodeError, ValueError) as exc:
                raise SmpError(MgmtErr.EINVAL) from exc
            if not isinstance(decoded, dict):
                raise SmpError(MgmtErr.EINVAL)
            body = decoded
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
        return header + payload, after, RequestSeen(group, command, sequence, body)

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
            case (Group.IMAGE, ImageCommand.SLOT_INFO, False) if self.supports_slot_info:
                return self._slot_info(), None
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

    def _slot_info(self) -> dict[str, Any]:
        slots = [
            {"slot": 0, "size": self.slot_bytes},
            {"slot": 1, "size": self.slot_bytes, "upload_image_id": 0},
        ]
        return {"images": [{"image": 0, "slots": slots, "max_image_size": self.slot_bytes}]}

    def _upload_write(self, body: dict[str, Any]) -> dict[str, Any]:
        offset = body.get("off")
        data = body.get("data", b"")
        if not isinstance(offset, int) or offset < 0:
            raise _img_error(ImgErr.INVALID_OFFSET)
        if not isinstance(data, bytes):
            raise SmpError(MgmtErr.EINVAL)
        if body.get("image", 0) != 0:
            raise _img_error(ImgErr.INVALID_SLOT)
        self.upload_bytes += len(data)
        if offset == 0:
            return self._first_chunk(body, data)
        upload = self._upload
        if upload is None or offset != len(upload.data):
            # Zephyr drops the data and answers with the offset it expects: where the
            # upload stands, or 0 when none is in progress (finished, or lost in a reset).
            return {"off": 0 if upload is None else len(upload.data)}
        if offset + len(data) > upload.length:
            self._upload = None  # an error ends the upload (img_mgmt_reset_upload)
            raise _img_error(ImgErr.INVALID_IMAGE_DATA_OVERRUN)
        upload.data += data
        return self._written(upload)

    def _first_chunk(self, body: dict[str, Any], data: bytes) -> dict[str, Any]:
        length = body.get("len")
        sha = body.get("sha")
        if len(data) < IMAGE_HEADER_SIZE:
            raise _img_error(ImgErr.INVALID_IMAGE_HEADER)
        if not isinstance(length, int) or length <= 0:
            raise _img_error(ImgErr.INVALID_LENGTH)
        if not data.startswith(IMAGE_MAGIC_BYTES):
            raise _img_error(ImgErr.INVALID_IMAGE_HEADER_MAGIC)
        if sha is not None and (not isinstance(sha, bytes) or len(sha) > SHA256_BYTES):
            raise _img_error(ImgErr.INVALID_HASH)
        current = self._upload
        if sha and current is not None and current.sha == sha:
            # The same image again: go on where the kept upload ends (this data is dropped).
            self.upload_resumes += 1
            return {"off": len(current.data)}
        if self.pending is not None:
            raise _img_error(ImgErr.IMAGE_ALREADY_PENDING)
        if self.reverts_at_next_boot:
            raise _img_error(ImgErr.NO_FREE_SLOT)
        if length > self.slot_bytes:
            raise _img_error(ImgErr.INVALID_IMAGE_TOO_LARGE)
        if len(data) > length:
            raise _img_error(ImgErr.INVALID_IMAGE_DATA_OVERRUN)
        if body.get("upgrade"):
            *_, major, minor, revision, build = IMAGE_HEADER.unpack_from(data)
            if ImageVersion(major, minor, revision, build) <= self.primary.version:
                raise _img_error(ImgErr.CURRENT_VERSION_IS_NEWER)
        secondary = self.secondary
        if (
            sha is not None
            and len(sha) == SHA256_BYTES
            and secondary is not None
            and len(secondary.data) == length
            and hashlib.sha256(secondary.data).digest() == sha
        ):
            # The slot already holds exactly this image: nothing to send.
            return {"off": length, "match": True}
        # A new upload erases the secondary slot.
        self.secondary = None
        upload = _Upload(length, sha, bytearray(data))
        self._upload = upload
        return self._written(upload)

    def _written(self, upload: _Upload) -> dict[str, Any]:
        done = len(upload.data)
        if self.on_upload_write is not None:
            self.on_upload_write(done)
        if done < upload.length:
            return {"off": done}
        return self._finish_upload(upload)

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

    def _cancel_work(self) -> None:
        task, self._work_task = self._work_task, None
        if task is not None:
            task.cancel()

    def _power_down(self) -> None:
        self.device.power_off(ShutdownReason.HOST)
        self._cancel_work()
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


def _slot_record(slot: Slot | None) -> dict[str, Any] | None:
    if slot is None:
        return None
    return {"data": slot.data, "label": slot.label, "confirmed": slot.confirmed}


def _slot_from_record(record: object) -> Slot | None:
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ValueError("a slot record must be a map")
    data, label, confirmed = record.get("data"), record.get("label"), record.get("confirmed")
    if not isinstance(data, bytes) or not isinstance(label, str) or not isinstance(confirmed, bool):
        raise ValueError("a slot record needs data (bytes), label (text) and confirmed (bool)")
    try:
        return Slot.of(data, label=label, confirmed=confirmed)
    except ImageCheckError:
        # An upload that MCUboot would not boot is kept as written (see _finish_upload).
        return Slot(data, ImageVersion(0, 0, 0), hashlib.sha256(data).digest(), None, label)


def _upload_from_record(record: object) -> _Upload | None:
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ValueError("an upload record must be a map")
    length, sha, data = record.get("length"), record.get("sha"), record.get("data")
    if (
        not isinstance(length, int)
        or not isinstance(data, bytes)
        or not 0 < len(data) <= length
        or (sha is not None and not isinstance(sha, bytes))
    ):
        raise ValueError("an upload record needs length, data (at most length bytes) and sha")
    return _Upload(length, sha, bytearray(data))
