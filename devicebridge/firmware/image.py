"""Our parser of MCUboot images: what the bridge checks before it sends a byte.

Format: https://docs.mcuboot.com/design.html#image-format (little-endian)::

    image_header   magic u32 0x96f3b83d, load_addr u32, hdr_size u16,
                   protect_tlv_size u16, img_size u32, flags u32,
                   version (major u8, minor u8, revision u16, build_num u32), pad 4
    body           img_size bytes, starting at hdr_size
    protected TLVs info (magic u16 0x6908, total u16) + TLVs, protect_tlv_size bytes
    TLVs           info (magic u16 0x6907, total u16) + TLVs (type u16, len u16, value)

The SHA256 TLV (type 0x10) must equal SHA-256 over everything before the
unprotected TLV area. devicebridge devices carry their model number in the
vendor TLV 0x00A0 (UTF-8), in the protected area so the hash covers it
(docs/firmware.md).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from devicebridge.firmware.errors import InvalidImageError, WrongModelError

IMAGE_MAGIC: Final = 0x96F3B83D
IMAGE_HEADER: Final = struct.Struct("<IIHHIIBBHI4x")
TLV_INFO: Final = struct.Struct("<HH")
TLV_HEADER: Final = struct.Struct("<HH")
TLV_INFO_MAGIC: Final = 0x6907
TLV_PROT_INFO_MAGIC: Final = 0x6908
TLV_SHA256: Final = 0x10
MODEL_TLV: Final = 0x00A0
SHA256_BYTES: Final = 32
# Sanity bound: the largest image a facial-care device's secondary slot could hold.
MAX_IMAGE_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FirmwareImage:
    """A checked MCUboot image: its bytes and what the header and TLVs say."""

    data: bytes = field(repr=False)
    path: str
    version: tuple[int, int, int, int]
    model: str
    hash: bytes

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    @property
    def version_text(self) -> str:
        """As SMP image state reports it: ``1.2.3``, or ``1.2.3.4`` with a build number."""
        major, minor, revision, build = self.version
        base = f"{major}.{minor}.{revision}"
        return f"{base}.{build}" if build else base

    def check_model(self, device_model: str, *, device: str) -> None:
        """Refuse an image built for a model other than ``device_model``."""
        if self.model != device_model:
            raise WrongModelError(
                path=self.path, image_model=self.model, device_model=device_model, device=device
            )


def load_image(path: Path) -> FirmwareImage:
    """Read and check the image at ``path``."""
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise InvalidImageError(
                f"{size} bytes is more than {MAX_IMAGE_BYTES} (not a device image)", path=str(path)
            )
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"cannot read it: {exc.strerror or exc}", path=str(path)) from exc
    return parse_image(data, path=str(path))


def parse_image(data: bytes, *, path: str = "<image>") -> FirmwareImage:
    """Check magic, sizes, both TLV areas, the SHA-256 and the model TLV."""

    def bad(reason: str, offset: int | None = None) -> InvalidImageError:
        return InvalidImageError(reason, path=path, offset=offset)

    if len(data) < IMAGE_HEADER.size:
        raise bad(f"only {len(data)} bytes; an MCUboot header alone is {IMAGE_HEADER.size}")
    magic, _load, hdr_size, prot_size, img_size, _flags, *version = IMAGE_HEADER.unpack_from(data)
    if magic != IMAGE_MAGIC:
        raise bad(f"header magic is 0x{magic:08x}, expected 0x{IMAGE_MAGIC:08x}", 0)
    if hdr_size < IMAGE_HEADER.size:
        raise bad(f"header size {hdr_size} is smaller than the header ({IMAGE_HEADER.size})", 8)
    body_end = hdr_size + img_size
    if body_end > len(data):
        raise bad(
            f"truncated: header says {hdr_size} + {img_size} bytes of header and body, "
            f"file has {len(data)}",
            len(data),
        )
    model: str | None = None
    hashed_end = body_end
    if prot_size:
        tlvs, hashed_end = _tlv_area(data, body_end, TLV_PROT_INFO_MAGIC, bad)
        if hashed_end - body_end != prot_size:
            raise bad(
                f"protected TLV area is {hashed_end - body_end} bytes, header says {prot_size}",
                body_end,
            )
        for kind, value, offset in tlvs:
            if kind == MODEL_TLV:
                try:
                    model = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise bad("model TLV 0x00a0 is not UTF-8", offset) from None
    tlvs, end = _tlv_area(data, hashed_end, TLV_INFO_MAGIC, bad)
    if end != len(data):
        raise bad(f"{len(data) - end} unexpected bytes after the TLV area", end)
    hashes = [(value, offset) for kind, value, offset in tlvs if kind == TLV_SHA256]
    if len(hashes) != 1:
        raise bad(f"{len(hashes)} SHA256 TLVs (type 0x10), expected exactly one", hashed_end)
    stated, offset = hashes[0]
    if len(stated) != SHA256_BYTES:
        raise bad(f"SHA256 TLV holds {len(stated)} bytes, expected {SHA256_BYTES}", offset)
    digest = hashlib.sha256(data[:hashed_end]).digest()
    if digest != stated:
        raise bad(
            f"hash mismatch: SHA256 TLV says {stated.hex()[:16]}..., "
            f"the image hashes to {digest.hex()[:16]}...",
            offset,
        )
    if model is None:
        raise bad("no model TLV (vendor type 0x00a0 in the protected area): not a device image")
    major, minor, revision, build = version
    return FirmwareImage(data, path, (major, minor, revision, build), model, digest)


_Bad = Callable[[str, "int | None"], InvalidImageError]


def _tlv_area(
    data: bytes, start: int, magic: int, bad: _Bad
) -> tuple[list[tuple[int, bytes, int]], int]:
    """The TLVs of the area at ``start`` (type, value, value offset) and the area's end."""
    name = "protected TLV" if magic == TLV_PROT_INFO_MAGIC else "TLV"
    if start + TLV_INFO.size > len(data):
        raise bad(f"truncated: the {name} area is missing", start)
    found, total = TLV_INFO.unpack_from(data, start)
    if found != magic:
        raise bad(f"{name} info magic is 0x{found:04x}, expected 0x{magic:04x}", start)
    end = start + total
    if total < TLV_INFO.size or end > len(data):
        raise bad(f"truncated: the {name} area says {total} bytes, {len(data) - start} left", start)
    tlvs = []
    position = start + TLV_INFO.size
    while position < end:
        if position + TLV_HEADER.size > end:
            raise bad(f"a {name} entry header crosses the end of its area", position)
        kind, length = TLV_HEADER.unpack_from(data, position)
        value_at = position + TLV_HEADER.size
        if value_at + length > end:
            raise bad(
                f"{name} 0x{kind:04x} of {length} bytes crosses the end of its area", position
            )
        tlvs.append((kind, bytes(data[value_at : value_at + length]), value_at))
        position = value_at + length
    return tlvs, end
