"""Firmware updates over MCUmgr/SMP with smpclient: image states, upload with resume, test,
reset, check and confirm.

The device keeps a partial upload keyed by the image's SHA-256, and every
upload reply carries the offset to continue from; so after a link drop (or a
run that was interrupted) the updater reconnects and smpclient's ``upload``
starts again with the same ``sha``: the device answers with its offset and the
upload goes on from there. After the reset it waits (on the injected clock) for
the device to come back, checks which image runs, and confirms the new one only
when it is the one running. A device that comes back on its old image (MCUboot
reverted a new image that did not boot) is reported as such, never confirmed.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from smp import error as smperr
from smp import image_management as smpimg
from smpclient import SMPClient
from smpclient.exceptions import SMPClientException, SMPUploadError
from smpclient.generics import error, error_v1
from smpclient.requests.image_management import (
    ImageStatesRead,
    ImageStatesWrite,
    ImageUploadWrite,
)
from smpclient.requests.os_management import ResetWrite
from smpclient.transport import SMPTransportDisconnected

from devicebridge.clock import Clock
from devicebridge.errors import DeviceBridgeError
from devicebridge.firmware.errors import (
    FirmwareError,
    FirmwareLinkError,
    FirmwareVerifyError,
    SmpCommandError,
)
from devicebridge.firmware.image import FirmwareImage
from devicebridge.firmware.transport import CountingTransport

_LOGGER = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT_S: Final = 5.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
# MCUboot swaps the slots at boot: give it time, a large image swaps for tens of seconds.
DEFAULT_REBOOT_TIMEOUT_S: Final = 90.0
DEFAULT_MAX_RECONNECTS: Final = 20
RECONNECT_PAUSE_S: Final = 0.5
# The first upload request may wait for a flash erase of the whole slot.
FIRST_UPLOAD_TIMEOUT_S: Final = 40.0
PRIMARY_SLOT: Final = 0
SECONDARY_SLOT: Final = 1
IMAGE_GROUP: Final = 1  # SMP group id of image management
# smpclient raises these when a link goes away mid-request (TimeoutError: no reply).
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


def _error_text(response: Any) -> tuple[int, str]:
    """The result code of an SMP error response, and its name."""
    names: type[enum.IntEnum]
    if error_v1(response):
        rc, names = int(response.rc), smperr.MGMT_ERR
    else:
        err = response.err
        rc = int(err.rc)
        names = smpimg.IMG_MGMT_ERR if err.group == IMAGE_GROUP else smperr.MGMT_ERR
    try:
        return rc, names(rc).name
    except ValueError:
        return rc, str(rc)


class FirmwareUpdater:
    """SMP operations on one device through any smpclient transport.

    ``transport`` is connected with ``address`` (ignored by our BLE transport);
    ``clock`` paces reconnects and bounds the wait for a reboot.
    """

    def __init__(
        self,
        transport: Any,
        clock: Clock,
        *,
        device: str,
        address: str = "",
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        reboot_timeout_s: float = DEFAULT_REBOOT_TIMEOUT_S,
        max_reconnects: int = DEFAULT_MAX_RECONNECTS,
    ) -> None:
        self.transport = CountingTransport(transport)
        self.clock = clock
        self.device = device
        self._client = SMPClient(self.transport, address, timeout_s=request_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._reboot_timeout_s = reboot_timeout_s
        self._max_reconnects = max_reconnects
        self._connected = False
        self.reconnects = 0

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        if self._connected:
            return
        try:
            await self._client.connect(self._connect_timeout_s)
        except _LINK_ERRORS as exc:
            raise FirmwareLinkError(f"cannot connect: {exc}", device=self.device) from exc
        except SMPClientException as exc:
            raise FirmwareLinkError(f"not an SMP server? {exc}", device=self.device) from exc
        self._connected = True

    async def close(self) -> None:
        if not self._connected:
            return
        self._connected = False
        try:
            await self._client.disconnect()
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
        response = await self._client.request(request)
        if error(response):
            rc, name = _error_text(response)
            raise SmpCommandError(command=what, rc=rc, rc_name=name, device=self.device)
        return response

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
                self.transport.bytes_sent,
                self.reconnects,
                uploaded=False,
            )
        phase(Phase.UPLOADING)
        resumed_from: list[int] = []
        uploaded = await self._upload(image, resumed_from, on_progress)
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
                self.transport.bytes_sent,
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
            self.transport.bytes_sent,
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
    ) -> bool:
        """Upload until the secondary slot holds the image; ``False`` if it already did."""
        attempt = 0
        while True:
            try:
                await self.connect()
                # A reply lost after the last chunk leaves the image complete on the
                # device: starting again would erase it and send it all once more.
                states = await self.read_states()
                secondary = _slot(states, SECONDARY_SLOT)
                if secondary is not None and secondary.hash == image.hash:
                    if on_progress is not None:
                        on_progress(UploadProgress(image.size_bytes, image.size_bytes, True))
                    return attempt > 0
                # A fresh upload's first reply is the size of the first chunk; any
                # other offset is where the device's kept partial upload ends.
                fresh_offset = self._first_chunk_bytes(image)
                first = True
                async for offset in self._client.upload(
                    image.data,
                    slot=0,
                    first_timeout_s=FIRST_UPLOAD_TIMEOUT_S,
                    use_sha=True,
                ):
                    resumed = first and offset != fresh_offset
                    if resumed:
                        resumed_from.append(offset)
                    if on_progress is not None:
                        on_progress(UploadProgress(offset, image.size_bytes, resumed))
                    first = False
                return True
            except SMPUploadError as exc:
                cause = exc.args[0] if exc.args else None
                if cause is not None and not isinstance(cause, str) and error(cause):
                    rc, name = _error_text(cause)
                    raise SmpCommandError(
                        command="image upload", rc=rc, rc_name=name, device=self.device
                    ) from exc
                raise FirmwareVerifyError(f"upload failed: {exc}", device=self.device) from exc
            except FirmwareError:
                raise
            except _LINK_ERRORS as exc:
                attempt += 1
                await self._reconnect(exc)

    def _first_chunk_bytes(self, image: FirmwareImage) -> int:
        first = ImageUploadWrite(
            off=0,
            data=b"",
            image=0,
            len=image.size_bytes,
            sha=image.hash,
            upgrade=False,
        )
        _, data_bytes = self._client.get_max_cbor_and_data_size(first)
        return min(data_bytes, image.size_bytes)

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
        """Image states once the device has rebooted (nothing pending any more)."""
        deadline_s = self.clock.now_s() + self._reboot_timeout_s
        last_error: BaseException | None = None
        while self.clock.now_s() < deadline_s:
            await self.clock.sleep(RECONNECT_PAUSE_S)
            try:
                await self.connect()
                states = await self.read_states()
            except SmpCommandError:
                raise
            except (*_LINK_ERRORS, SMPClientException) as exc:
                last_error = exc
                await self.close()
                continue
            secondary = _slot(states, SECONDARY_SLOT)
            if secondary is not None and secondary.hash == image.hash and secondary.pending:
                # Still the old boot: the reset has not happened yet.
                await self.close()
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
