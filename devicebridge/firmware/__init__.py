"""Firmware updates over MCUmgr/SMP (smp + smpclient), for MCUboot devices.

See docs/firmware.md. :func:`load_image` checks an image before anything is
sent; :class:`FirmwareUpdater` runs an update over any smpclient transport;
:class:`BleSmpTransport` is that transport over our own BLE link.
"""

from devicebridge.firmware.errors import (
    FirmwareError,
    FirmwareLinkError,
    FirmwareVerifyError,
    InvalidImageError,
    SmpCommandError,
    WrongModelError,
)
from devicebridge.firmware.image import MODEL_TLV, FirmwareImage, load_image, parse_image
from devicebridge.firmware.transport import BleSmpTransport, CountingTransport, SmpBleLink
from devicebridge.firmware.updater import (
    FirmwareUpdater,
    Phase,
    SlotState,
    UpdateOutcome,
    UpdateResult,
    UploadProgress,
)

__all__ = [
    "MODEL_TLV",
    "BleSmpTransport",
    "CountingTransport",
    "FirmwareError",
    "FirmwareImage",
    "FirmwareLinkError",
    "FirmwareUpdater",
    "FirmwareVerifyError",
    "InvalidImageError",
    "Phase",
    "SlotState",
    "SmpBleLink",
    "SmpCommandError",
    "UpdateOutcome",
    "UpdateResult",
    "UploadProgress",
    "WrongModelError",
    "load_image",
    "parse_image",
]
