"""Zephyr's image slot info, which the ``smp`` package does not model.

``smp`` validates command ids against its own table and has no
``IMG_MGMT_ID_SLOT_INFO`` (image group, command 6, Zephyr
``CONFIG_MCUMGR_GRP_IMG_SLOT_INFO``), so this request is built and its answer
read here, with the same header layout and the SMP v1 / v2 error forms.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from pydantic import BaseModel, ValidationError

from devicebridge.firmware.errors import SmpCommandError, SmpProtocolError

SLOT_INFO_COMMAND: Final = 6
IMAGE_GROUP: Final = 1
# res(3) ver(2) op(3), flags, length, group, sequence, command (network byte order).
_HEADER: Final = struct.Struct("!BBHHBB")
_OP_READ: Final = 0
_VERSION_2: Final = 1
_VERSION_SHIFT: Final = 3
_ENOTSUP: Final = 8
_sequences = itertools.count(0x80)  # apart from smp's own counter, which starts at 0


class SlotSize(BaseModel):
    slot: int
    size: int
    upload_image_id: int | None = None


class ImageSlots(BaseModel):
    image: int
    slots: list[SlotSize]
    max_image_size: int | None = None

    def update_capacity_bytes(self) -> int | None:
        """The largest image this image's update slot takes (``None``: not reported)."""
        if self.max_image_size is not None:
            return self.max_image_size
        sizes = [s.size for s in self.slots if s.upload_image_id is not None or s.slot % 2]
        return min(sizes) if sizes else None


@dataclass(frozen=True, slots=True)
class _Header:
    sequence: int


@dataclass(frozen=True, slots=True)
class SlotInfoRead:
    """The request, shaped like an ``smp`` request for :class:`SmpChannel`."""

    header: _Header
    BYTES: bytes

    @classmethod
    def new(cls) -> SlotInfoRead:
        sequence = next(_sequences) % 0x100
        body = cbor2.dumps({})
        header = _HEADER.pack(
            (_VERSION_2 << _VERSION_SHIFT) | _OP_READ,
            0,
            len(body),
            IMAGE_GROUP,
            sequence,
            SLOT_INFO_COMMAND,
        )
        return cls(_Header(sequence), header + body)


def decode_slot_info(frame: bytes, *, device: str) -> list[ImageSlots] | None:
    """The slots in the answer ``frame``; ``None`` when the device does not support the
    command (older firmware); :class:`SmpCommandError` for another refusal."""
    try:
        body: Any = cbor2.loads(frame[_HEADER.size :])
        if not isinstance(body, dict):
            raise ValueError("not a map")
        error = body.get("err")
        rc = body.get("rc", 0)
        if isinstance(error, dict):
            rc = error.get("rc", 0)
        if rc == _ENOTSUP:
            return None
        if rc:
            raise SmpCommandError(
                command="image slot info", rc=int(rc), rc_name=str(rc), device=device
            )
        return [ImageSlots.model_validate(image) for image in body.get("images", [])]
    except (ValueError, ValidationError, cbor2.CBORDecodeError, TypeError) as exc:
        raise SmpProtocolError(
            f"the answer to image slot info is not valid: {exc}", device=device
        ) from exc
