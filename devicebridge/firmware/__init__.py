"""Firmware updates over MCUmgr/SMP (smp + smpclient), for MCUboot devices.

See docs/firmware.md. :func:`load_image` checks an image before anything is
sent; :class:`FirmwareUpdater` runs an update over any smpclient transport, with
the upload pipelined up to the device's buffers (:class:`PipelinedUpload`);
:class:`BleSmpTransport` is that transport over our own BLE link.
"""

from devicebridge.firmware.errors import (
    FirmwareError,
    FirmwareLinkError,
    FirmwareVerifyError,
    ImageTooLargeError,
    InvalidImageError,
    SmpCommandError,
    SmpProtocolError,
    WrongModelError,
)
from devicebridge.firmware.image import MODEL_TLV, FirmwareImage, load_image, parse_image
from devicebridge.firmware.transport import BleSmpTransport, SmpBleLink
from devicebridge.firmware.updater import (
    FirmwareUpdater,
    Phase,
    SlotState,
    UpdateOutcome,
    UpdateResult,
    UploadProgress,
)
from devicebridge.firmware.upload import PipelinedUpload, UploadStats

__all__ = [
    "MODEL_TLV",
    "BleSmpTransport",
    "FirmwareError",
    "FirmwareImage",
    "FirmwareLinkError",
    "FirmwareUpdater",
    "FirmwareVerifyError",
    "ImageTooLargeError",
    "InvalidImageError",
    "Phase",
    "PipelinedUpload",
    "SlotState",
    "SmpBleLink",
    "SmpCommandError",
    "SmpProtocolError",
    "UpdateOutcome",
    "UpdateResult",
    "UploadProgress",
    "UploadStats",
    "WrongModelError",
    "load_image",
    "parse_image",
]
