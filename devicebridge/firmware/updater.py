"""Firmware updates over MCUmgr/SMP: image states, pipelined upload with resume, test,
reset, check and confirm.

The device keeps a partial upload keyed by the image's SHA-256, and every
upload reply carries the offset to continue from; so after a link drop (or a
run that was interrupted) the updater reconnects and starts the upload again
with the same ``sha``: the device answers with its offset and the upload goes
on from there (:mod:`devicebridge.firmware.upload` pipelines the requests).
Before it sends a byte it checks that the image fits the device's update slot.
After the reset it probes (on the injected clock, with a short answer timeout)
until the device is back, checks which image runs, and confirms the new one
only when it is the one running. A device that comes back on its old image
(MCUboot reverted a new image that did not boot) is reported as such, never
confirmed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from smp.os_management import MCUMgrParametersReadResponse
from smpclient.exceptions import SMPClientException
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import MCUMgrParametersRead, ResetWrite
from smpclient.transport import SMPTransport, SMPTransportDisconnected

from devicebridge.clock import Clock
from devicebridge.errors import DeviceBridgeError
from devicebridge.firmware.channel import SmpChannel, check_response
from devicebridge.firmware.errors import (
    FirmwareError,
    FirmwareLinkError,
    FirmwareVerifyError,
    ImageTooLargeError,
    SmpCommandError,
    UploadForgotten,
)
from devicebridge.firmware.image import FirmwareImage
from devicebridge.firmware.requests import ImageSlots, SlotInfoRead, decode_slot_info
from devicebridge.firmware.upload import PipelinedUpload, UploadStats

_LOGGER = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S: Final = 5.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
# MCUboot swaps the slots at boot: give it time, a large image swaps for tens of seconds.
DEFAULT_REBOOT_TIMEOUT_S: Final = 90.0
DEFAULT_MAX_RECONNECTS: Final = 20
RECONNECT_PAUSE_S: Final = 0.5
# While the device reboots, a request to it gets no answer (serial, UDP): a device that
# is up answers MCUmgr parameters within milliseconds, so probe with a short timeout.
BOOT_PROBE_TIMEOUT_S: Final = 0.5
# Zephyr answers the reset command and goes down 250 ms later
# (CONFIG_MCUMGR_GRP_OS_RESET_MS): a probe sooner would still find the old boot.
RESET_SETTLE_S: Final = 0.5
# The first upload request may wait for a flash erase of the whole slot.
FIRST_UPLOAD_TIMEOUT_S: Final = 40.0
# The device forgot the upload mid-way more often than a reset or a lost last answer explain.
MAX_UPLOAD_RESTARTS: Final = 3
PRIMARY_SLOT: Final = 0
SECONDARY_SLOT: Final = 1
# What a link going away mid-request raises (TimeoutError: no answer in time).
_LINK_ERRORS: Final = (SMPTransportDisconnected, TimeoutError, OSError, DeviceBridgeError)


@dataclass(frozen=True, slots=True)
class SlotState:
    """One slot as the device's image management reports it."""

    image: int
    slot: int
    version: str
    hash: bytes | None
    active: bool
    pending: bool
    confirmed: bool
    permanent: bool
    bootable: bool

    @property
    def hash_hex(self) -> str:
        return self.hash.hex() if self.hash is not None else "-"


class UpdateOutcome(enum.Enum):
    UPDATED = "updated"  # the new image runs and is confirmed
    ALREADY_RUNNING = "already-running"  # nothing to do
    REVERTED = "reverted"  # the device came back on its old image


class Phase(enum.Enum):
    CONNECTING = "connecting"
    UPLOADING = "uploading"
    VERIFYING = "verifying"
    MARKING_TEST = "marking the image for test"
    RESETTING = "resetting the device"
    WAITING = "waiting for the device to come back"
    CONFIRMING = "confirming the new image"


@dataclass(frozen=True, slots=True)
class UploadProgress:
    offset_bytes: int
    total_bytes: int
    resumed: bool  # the device kept a partial upload and said to go on from here


@dataclass(frozen=True, slots=True)
class UpdateResult:
    outcome: UpdateOutcome
    old_version: str
    new_version: str
    running_version: str
    image_bytes: int
    wire_bytes_sent: int
    reconnects: int
    resumed_from_bytes: tuple[int, ...] = field(default=())
    uploaded: bool = True


class FirmwareUpdater:
    """SMP operations on one device through any smpclient transport.

    ``transport`` is connected with ``address`` (ignored by our BLE transport);
    ``clock`` times every request, paces reconnects and bounds the wait for a
    reboot. ``max_in_flight`` caps the upload's pipeline below what the device
    advertises (1: one request at a time).
    """

    def __init__(
        self,
        transport: SMPTransport,
        clock: Clock,
        *,
        device: str,
        address: str = "",
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        reboot_timeout_s: float = DEFAULT_REBOOT_TIMEOUT_S,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
        max_in_flight: int | None = None,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.device = device
        self.channel = SmpChannel(transport, clock, device=device)
        self._address = address
        self._request_timeout_s = request_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._reboot_timeout_s = reboot_timeout_s
        self._max_reconnects = max_reconnects
        self._max_in_flight = max_in_flight
        self._connected = False
        self.reconnects = 0
        # What the device's MCUmgr parameters said (None: it does not report them).
        self.buffer_size: int | None = None
        self.buffer_count: int | None = None
        self.last_upload: UploadStats | None = None

    @property
    def bytes_sent(self) -> int:
        """Bytes handed to the transport so far (the wire cost of what was done)."""
        return self.channel.bytes_sent

    @property
    def requests_in_flight_limit(self) -> int:
        """Upload requests kept in flight: one less than the device's buffers (its answer
        needs one too), at most ``max_in_flight``."""
        limit = max(1, (self.buffer_count or 1) - 1)
        return min(limit, self._max_in_flight) if self._max_in_flight else limit

    # ------------------------------------------------------------------ connection

    async def connect(self, *, answer_timeout_s: float | None = None) -> None:
        """Connect and read MCUmgr parameters (``answer_timeout_s``: how long to wait for them)."""
        if self._connected:
            return
        try:
            await self.channel.open(self._address, self._connect_timeout_s)
        except (*_LINK_ERRORS, SMPClientException) as exc:
            await self._close_quietly()
            raise FirmwareLinkError(f"cannot connect: {exc}", device=self.device) from exc
        try:
            parameters = await self.channel.request(
                MCUMgrParametersRead(), answer_timeout_s or self._request_timeout_s
            )
        except _LINK_ERRORS as exc:
            await self._close_quietly()
            reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
            raise FirmwareLinkError(
                f"its SMP server does not answer ({reason})", device=self.device
            ) from exc
        if isinstance(parameters, MCUMgrParametersReadResponse):
            self.buffer_size, self.buffer_count = parameters.buf_size, parameters.buf_count
            self.transport.initialize(parameters.buf_size)
        else:
            _LOGGER.info(
                "%s: no MCUmgr parameters (%s); one upload request at a time",
                self.device,
                parameters,
            )
            self.buffer_size = self.buffer_count = None
        self._connected = True

    async def close(self) -> None:
        if not self._connected:
            return
        self._connected = False
        await self._close_quietly()

    async def _close_quietly(self) -> None:
        try:
            await self.channel.close()
        except (*_LINK_ERRORS, SMPClientException) as exc:
            _LOGGER.debug("%s: disconnect: %s", self.device, exc)

    async def _reconnect(self, reason: BaseException) -> None:
        """After a link failure: close, pause, connect again (bounded)."""
        await self.close()
        while True:
            self.reconnects += 1
            if self.reconnects > self._max_reconnects:
                raise FirmwareLinkError(
                    f"link lost {self.reconnects} times ({reason}); giving up",
                    device=self.device,
                ) from reason
            _LOGGER.info("%s: link lost (%s), reconnecting", self.device, reason)
            await self.clock.sleep(RECONNECT_PAUSE_S)
            try:
                await self.connect()
                return
            except FirmwareLinkError as exc:
                reason = exc

    # ------------------------------------------------------------------ requests

    async def _request(self, request: Any, what: str) -> Any:
        response = await self.channel.request(request, self._request_timeout_s)
        return check_response(response, what, device=self.device)

    async def read_states(self) -> list[SlotState]:
        """The image slots (version, hash, active, pending, confirmed)."""
        await self.connect()
        response = await self._request(ImageStatesRead(), "image state read")
        return [
            SlotState(
                image=state.image or 0,
                slot=state.slot,
                version=state.version,
                hash=bytes(state.hash) if state.hash is not None else None,
                active=bool(state.active),
                pending=bool(state.pending),
                confirmed=bool(state.confirmed),
                permanent=bool(state.permanent),
                bootable=bool(state.bootable),
            )
            for state in response.images
        ]

    async def read_slot_sizes(self) -> list[ImageSlots] | None:
        """Every image's slots and their sizes (``None``: the device does not report them)."""
        await self.connect()
        request = SlotInfoRead.new()
        future = await self.channel.send(request)
        try:
            frame = await self.channel.receive(future, self._request_timeout_s)
        finally:
            self.channel.forget(request)
        return decode_slot_info(frame, device=self.device)

    @staticmethod
    async def _nothing() -> None:
        return None

    async def update_slot_bytes(self) -> int | None:
        """The largest image the device's update slot takes (``None``: not reported)."""
        images = await self.read_slot_sizes()
        image = next((i for i in images or () if i.image == 0), None)
        return image.update_capacity_bytes() if image is not None else None

    async def _retrying(self, operation: Callable[[], Any]) -> Any:
        """Run ``operation`` and reconnect as often as the link fails under it."""
        while True:
            try:
                await self.connect()
                return await operation()
            except FirmwareError:
                raise
            except _LINK_ERRORS as exc:
                await self._reconnect(exc)

    # ------------------------------------------------------------------ update

    async def update(
        self,
        image: FirmwareImage,
        *,
        on_progress: Callable[[UploadProgress], None] | None = None,
        on_phase: Callable[[Phase], None] | None = None,
    ) -> UpdateResult:
        """Upload ``image`` (resuming), test it, reset, check what runs, confirm it."""

        def phase(p: Phase) -> None:
            _LOGGER.info("%s: %s", self.device, p.value)
            if on_phase is not None:
                on_phase(p)

        phase(Phase.CONNECTING)
        states = await self._retrying(self.read_states)
        active = _active(states, self.device)
        old_version = active.version
        if active.hash == image.hash:
            if not active.confirmed:
                await self.confirm(image)
            return UpdateResult(
                UpdateOutcome.ALREADY_RUNNING,
                old_version,
                image.version_text,
                active.version,
                image.size_bytes,
                self.bytes_sent,
                self.reconnects,
                uploaded=False,
            )
        resumed_from: list[int] = []
        uploaded = await self._upload(
            image, resumed_from, on_progress, on_start=lambda: phase(Phase.UPLOADING)
        )
        phase(Phase.VERIFYING)
        states = await self._retrying(self.read_states)
        secondary = _slot(states, SECONDARY_SLOT)
        if secondary is None or secondary.hash != image.hash:
            raise FirmwareVerifyError(
                f"after the upload the secondary slot holds "
                f"{secondary.hash_hex[:16] if secondary else 'nothing'}, "
                f"expected {image.hash.hex()[:16]}",
                device=self.device,
            )
        phase(Phase.MARKING_TEST)
        if not secondary.pending:
            await self.mark_for_test(image)
        phase(Phase.RESETTING)
        await self._reset()
        phase(Phase.WAITING)
        states = await self._wait_for_boot(image)
        running = _active(states, self.device)
        if running.hash != image.hash:
            return UpdateResult(
                UpdateOutcome.REVERTED,
                old_version,
                image.version_text,
                running.version,
                image.size_bytes,
                self.bytes_sent,
                self.reconnects,
                tuple(resumed_from),
                uploaded,
            )
        if running.version != image.version_text:
            raise FirmwareVerifyError(
                f"the new image runs but reports version {running.version}, "
                f"expected {image.version_text}",
                device=self.device,
            )
        phase(Phase.CONFIRMING)
        await self.confirm(image)
        return UpdateResult(
            UpdateOutcome.UPDATED,
            old_version,
            image.version_text,
            running.version,
            image.size_bytes,
            self.bytes_sent,
            self.reconnects,
            tuple(resumed_from),
            uploaded,
        )

    # ------------------------------------------------------------------ single steps

    async def upload(
        self, image: FirmwareImage, on_progress: Callable[[UploadProgress], None] | None = None
    ) -> tuple[int, ...]:
        """Only the upload (resuming); returns the offsets it resumed from."""
        resumed_from: list[int] = []
        await self._upload(image, resumed_from, on_progress)
        return tuple(resumed_from)

    async def mark_for_test(self, image: FirmwareImage) -> None:
        """Mark the uploaded ``image`` for one trial boot at the next reset."""
        await self._retrying(
            lambda: self._request(ImageStatesWrite(hash=image.hash), "mark image for test")
        )

    async def reset_and_wait(self, image: FirmwareImage) -> list[SlotState]:
        """Reset the device and return its image states once it is back."""
        await self._reset()
        return await self._wait_for_boot(image)

    async def confirm(self, image: FirmwareImage) -> None:
        """Make ``image`` (which must be running) permanent."""
        await self._retrying(lambda: self._confirm(image))

    async def _upload(
        self,
        image: FirmwareImage,
        resumed_from: list[int],
        on_progress: Callable[[UploadProgress], None] | None,
        on_start: Callable[[], None] | None = None,
    ) -> bool:
        """Upload until the secondary slot holds the image; ``False`` if it already did."""
        attempt = restarts = 0
        slot_checked = False

        def on_offset(offset: int, resumed: bool) -> None:
            if resumed:
                resumed_from.append(offset)
            if on_progress is not None:
                on_progress(UploadProgress(offset, image.size_bytes, resumed))

        while True:
            try:
                await self.connect()
                # A reply lost after the last chunk leaves the image complete on the
                # device: starting again would erase it and send it all once more.
                # The slot sizes are asked along with them when the device has the
                # buffers for two requests at once.
                slots = self._nothing if slot_checked else self.update_slot_bytes
                if self.requests_in_flight_limit >= 2:
                    states, slot_bytes = await asyncio.gather(self.read_states(), slots())
                else:
                    states = await self.read_states()
                    slot_bytes = await slots()
                secondary = _slot(states, SECONDARY_SLOT)
                if secondary is not None and secondary.hash == image.hash:
                    if on_progress is not None:
                        on_progress(UploadProgress(image.size_bytes, image.size_bytes, True))
                    return attempt > 0 or restarts > 0
                if not slot_checked:
                    # Refused here, before a byte of the image goes out.
                    if slot_bytes is not None and image.size_bytes > slot_bytes:
                        raise ImageTooLargeError(
                            path=image.path,
                            image_bytes=image.size_bytes,
                            slot_bytes=slot_bytes,
                            device=self.device,
                        )
                    slot_checked = True
                    if on_start is not None:
                        on_start()
                await self._pipelined_upload(image, on_offset)
                return True
            except UploadForgotten:
                restarts += 1
                if restarts > MAX_UPLOAD_RESTARTS:
                    raise FirmwareLinkError(
                        f"the device lost the upload {restarts} times (does it keep resetting?)",
                        device=self.device,
                    ) from None
                _LOGGER.info("%s: the device has no upload in progress; checking", self.device)
            except SmpCommandError as exc:
                if exc.rc_name == "INVALID_IMAGE_TOO_LARGE":
                    raise ImageTooLargeError(
                        path=image.path,
                        image_bytes=image.size_bytes,
                        slot_bytes=None,
                        device=self.device,
                    ) from exc
                raise
            except FirmwareError:
                raise
            except _LINK_ERRORS as exc:
                attempt += 1
                await self._reconnect(exc)

    async def _pipelined_upload(
        self, image: FirmwareImage, on_offset: Callable[[int, bool], None]
    ) -> None:
        upload = PipelinedUpload(
            self.channel,
            image.data,
            max_message_bytes=self.transport.max_unencoded_size,
            max_in_flight=self.requests_in_flight_limit,
            first_timeout_s=FIRST_UPLOAD_TIMEOUT_S,
            request_timeout_s=self._request_timeout_s,
            on_offset=on_offset,
        )
        self.last_upload = upload.stats
        await upload.run()

    async def _confirm(self, image: FirmwareImage) -> None:
        response = await self._request(
            ImageStatesWrite(hash=image.hash, confirm=True), "confirm image"
        )
        for state in response.images:
            if state.hash == image.hash and not state.confirmed:
                raise FirmwareVerifyError(
                    "the device did not confirm the image", device=self.device
                )

    async def _reset(self) -> None:
        try:
            await self._request(ResetWrite(), "reset")
        except FirmwareError:
            raise
        except _LINK_ERRORS as exc:
            # The device may go down before its reply reaches us: that is a reset too.
            _LOGGER.debug("%s: reset reply lost: %s", self.device, exc)
        await self.close()

    async def _wait_for_boot(self, image: FirmwareImage) -> list[SlotState]:
        """Image states once the device has rebooted (nothing pending any more).

        The first probe goes once the device has had time to go down; each probe
        connects and asks for MCUmgr parameters with a short answer timeout: a
        device still down (or rebooting) does not answer, one that is up answers at
        once. A probe that failed fast (no port, nothing advertising yet) is repeated
        after a short pause; one that timed out has waited already.
        """
        deadline_s = self.clock.now_s() + self._reboot_timeout_s
        last_error: BaseException | None = None
        await self.clock.sleep(RESET_SETTLE_S)
        while self.clock.now_s() < deadline_s:
            started_s = self.clock.now_s()
            try:
                await self.connect(answer_timeout_s=BOOT_PROBE_TIMEOUT_S)
                states = await self.read_states()
            except SmpCommandError:
                raise
            except (*_LINK_ERRORS, SMPClientException) as exc:
                last_error = exc
                await self.close()
                if self.clock.now_s() - started_s < BOOT_PROBE_TIMEOUT_S:
                    await self.clock.sleep(RECONNECT_PAUSE_S)
                continue
            secondary = _slot(states, SECONDARY_SLOT)
            if secondary is not None and secondary.hash == image.hash and secondary.pending:
                # Still the old boot: the reset has not happened yet.
                await self.close()
                await self.clock.sleep(RECONNECT_PAUSE_S)
                continue
            return states
        raise FirmwareLinkError(
            f"the device did not come back within {self._reboot_timeout_s:g} s after the reset"
            + (f" (last error: {last_error})" if last_error else ""),
            device=self.device,
        )


def _slot(states: Sequence[SlotState], slot: int, image: int = 0) -> SlotState | None:
    return next((s for s in states if s.slot == slot and s.image == image), None)


def _active(states: Sequence[SlotState], device: str) -> SlotState:
    active = next((s for s in states if s.active), None) or _slot(states, PRIMARY_SLOT)
    if active is None:
        raise FirmwareVerifyError("the device reports no image in its primary slot", device=device)
    return active
