"""Errors of firmware updates; all derive from :class:`devicebridge.errors.DeviceBridgeError`.

::

    DeviceBridgeError
    └── FirmwareError                  a firmware operation failed (device: which one)
        ├── InvalidImageError          not a valid MCUboot image (path, offset, reason)
        ├── WrongModelError            the image is built for another model
        ├── ImageTooLargeError         the image does not fit the device's update slot
        ├── SmpCommandError            the device answered an SMP request with an error
        ├── SmpProtocolError           the device answered with something that is not SMP
        ├── FirmwareLinkError          the link kept failing (reconnects used up)
        ├── FirmwareVerifyError        the device does not hold what was sent
        └── UploadForgotten            the device has no upload in progress (the updater
                                       reads the slots and finishes or starts over)
"""

from __future__ import annotations

from devicebridge.errors import DeviceBridgeError


class FirmwareError(DeviceBridgeError):
    """A firmware operation failed; ``device`` names the device (or image) concerned."""

    def __init__(self, message: str, *, device: str) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device


class InvalidImageError(FirmwareError):
    """``path`` is not a valid MCUboot image: ``reason``, found at byte ``offset``."""

    def __init__(self, reason: str, *, path: str, offset: int | None = None) -> None:
        where = f" (at byte {offset})" if offset is not None else ""
        super().__init__(f"not a valid MCUboot image: {reason}{where}", device=path)
        self.path = path
        self.reason = reason
        self.offset = offset


class WrongModelError(FirmwareError):
    """The image says it is for ``image_model``; the device is a ``device_model``."""

    def __init__(self, *, path: str, image_model: str, device_model: str, device: str) -> None:
        super().__init__(
            f"{path} is built for model {image_model!r}, but this device is a {device_model!r}",
            device=device,
        )
        self.path = path
        self.image_model = image_model
        self.device_model = device_model


class ImageTooLargeError(FirmwareError):
    """``image_bytes`` do not fit the update slot of ``slot_bytes`` (``None``: the device
    refused the size without reporting its slot's)."""

    def __init__(self, *, path: str, image_bytes: int, slot_bytes: int | None, device: str) -> None:
        if slot_bytes is None:
            room = "the device refused it as too large for its update slot"
        else:
            room = f"the device's update slot holds {_size_text(slot_bytes)}"
        super().__init__(
            f"{path} is {_size_text(image_bytes)}, but {room}; nothing was uploaded",
            device=device,
        )
        self.path = path
        self.image_bytes = image_bytes
        self.slot_bytes = slot_bytes


def _size_text(n_bytes: int) -> str:
    kib = n_bytes / 1024
    return f"{n_bytes:,} bytes ({kib:,.0f} KiB)" if kib >= 1 else f"{n_bytes} bytes"


class SmpCommandError(FirmwareError):
    """The device refused an SMP request: ``command`` got result ``rc`` (``rc_name``)."""

    def __init__(self, *, command: str, rc: int, rc_name: str, device: str) -> None:
        super().__init__(f"{command} refused by the device: {rc_name} (rc {rc})", device=device)
        self.command = command
        self.rc = rc
        self.rc_name = rc_name


class SmpProtocolError(FirmwareError):
    """A response that is not what SMP says the request gets (an SMP server at all?)."""


class FirmwareLinkError(FirmwareError):
    """The link to the device failed and did not come back in time."""


class FirmwareVerifyError(FirmwareError):
    """The device reports an image other than the one sent (hash or version)."""


class UploadForgotten(FirmwareError):
    """The device reports no upload in progress: it completed, or a reset lost it.

    The updater catches it, reads the slots, and finishes or starts over."""

    def __init__(self, *, device: str) -> None:
        super().__init__("the device has no upload in progress any more", device=device)
