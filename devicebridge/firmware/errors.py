"""Errors of firmware updates; all derive from :class:`devicebridge.errors.DeviceBridgeError`.

::

    DeviceBridgeError
    └── FirmwareError                  a firmware operation failed (device: which one)
        ├── InvalidImageError          not a valid MCUboot image (path, offset, reason)
        ├── WrongModelError            the image is built for another model
        ├── SmpCommandError            the device answered an SMP request with an error
        ├── FirmwareLinkError          the link kept failing (reconnects used up)
        └── FirmwareVerifyError        the device does not hold what was sent
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


class SmpCommandError(FirmwareError):
    """The device refused an SMP request: ``command`` got result ``rc`` (``rc_name``)."""

    def __init__(self, *, command: str, rc: int, rc_name: str, device: str) -> None:
        super().__init__(f"{command} refused by the device: {rc_name} (rc {rc})", device=device)
        self.command = command
        self.rc = rc
        self.rc_name = rc_name


class FirmwareLinkError(FirmwareError):
    """The link to the device failed and did not come back in time."""


class FirmwareVerifyError(FirmwareError):
    """The device reports an image other than the one sent (hash or version)."""
