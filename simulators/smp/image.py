"""MCUboot images: a builder for test images, and the device's own check of one.

Layout (https://docs.mcuboot.com/design.html#image-format), all little-endian::

    header (32 bytes, padded to hdr_size)   magic 0x96f3b83d, sizes, flags, version
    body (img_size bytes)                   the "firmware": seeded pseudo-random bytes
    protected TLV area                      info 0x6908 + TLVs, covered by the hash
    TLV area                                info 0x6907 + SHA256 TLV (type 0x10)

The SHA-256 covers header, padding, body and the protected TLV area, as MCUboot
computes it. The model a firmware is built for travels in a vendor TLV
(:data:`MODEL_TLV`, type 0x00A0, UTF-8) in the protected area, so it is covered
by the hash too. The version sits in the header (major.minor.revision+build).

This module is the device's side; the host parses images with its own parser
(``devicebridge.firmware.image``), so a bug in one is caught by the other.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np

from simulators.errors import ImageCheckError

IMAGE_MAGIC: Final = 0x96F3B83D
IMAGE_HEADER: Final = struct.Struct("<IIHHII BBHI 4x")
IMAGE_HEADER_SIZE: Final = IMAGE_HEADER.size  # 32
TLV_INFO: Final = struct.Struct("<HH")
TLV_HEADER: Final = struct.Struct("<HH")  # it_type, it_len (MCUboot >= 1.9: u16 type)
TLV_INFO_MAGIC: Final = 0x6907
TLV_PROT_INFO_MAGIC: Final = 0x6908
TLV_SHA256: Final = 0x10
# Vendor TLV types have a low byte in 0xA0..0xFE (MCUboot reserves them for vendors).
MODEL_TLV: Final = 0x00A0
SHA256_BYTES: Final = 32
DEFAULT_BODY_BYTES: Final = 16 * 1024
MAX_MODEL_BYTES: Final = 64


class ImageDefect(enum.Enum):
    """Ways :func:`build_image` can spoil an image on purpose (for refusal tests)."""

    WRONG_MAGIC = "wrong-magic"
    WRONG_HASH = "wrong-hash"
    TRUNCATED = "truncated"


@dataclass(frozen=True, slots=True, order=True)
class ImageVersion:
    major: int
    minor: int
    revision: int
    build: int = 0

    @classmethod
    def parse(cls, text: str) -> ImageVersion:
        """``"1.2.3"`` or ``"1.2.3+4"`` (build number after ``+``)."""
        main, _, build = text.partition("+")
        parts = main.split(".")
        well_formed = len(parts) == 3 and all(p.isdigit() for p in parts)
        if not well_formed or (build and not build.isdigit()):
            raise ValueError(f"version {text!r} is not MAJOR.MINOR.REVISION[+BUILD]")
        major, minor, revision = (int(p) for p in parts)
        version = cls(major, minor, revision, int(build or 0))
        if major > 0xFF or minor > 0xFF or revision > 0xFFFF or version.build > 0xFFFF_FFFF:
            raise ValueError(f"version {text!r} does not fit MCUboot's u8.u8.u16+u32")
        return version

    def __str__(self) -> str:
        # Zephyr's img_mgmt prints the build number only when it is not zero.
        base = f"{self.major}.{self.minor}.{self.revision}"
        return f"{base}.{self.build}" if self.build else base


@dataclass(frozen=True, slots=True)
class DeviceImage:
    """What the device's image check finds in a slot."""

    version: ImageVersion
    model: str | None
    hash: bytes
    size: int


def build_image(
    version: str | ImageVersion,
    model: str,
    *,
    body_bytes: int = DEFAULT_BODY_BYTES,
    seed: int = 0,
    defect: ImageDefect | None = None,
) -> bytes:
    """A valid MCUboot image of ``body_bytes`` seeded pseudo-random firmware for ``model``."""
    ver = version if isinstance(version, ImageVersion) else ImageVersion.parse(version)
    model_bytes = model.encode("utf-8")
    if not 0 < len(model_bytes) <= MAX_MODEL_BYTES:
        raise ValueError(f"model must be 1..{MAX_MODEL_BYTES} UTF-8 bytes, got {model!r}")
    if body_bytes < 0:
        raise ValueError(f"body size must be non-negative, got {body_bytes}")
    body = np.random.default_rng([seed, ver.major, ver.minor, ver.revision]).bytes(body_bytes)
    protected = _tlv(MODEL_TLV, model_bytes)
    protected_area = TLV_INFO.pack(TLV_PROT_INFO_MAGIC, TLV_INFO.size + len(protected)) + protected
    magic = IMAGE_MAGIC ^ 0xFFFF if defect is ImageDefect.WRONG_MAGIC else IMAGE_MAGIC
    header = IMAGE_HEADER.pack(
        magic,
        0,  # load address: execute in place
        IMAGE_HEADER_SIZE,
        len(protected_area),
        body_bytes,
        0,  # flags
        ver.major,
        ver.minor,
        ver.revision,
        ver.build,
    )
    digest = hashlib.sha256(header + body + protected_area).digest()
    if defect is ImageDefect.WRONG_HASH:
        digest = bytes(b ^ 0xFF for b in digest)
    hash_tlv = _tlv(TLV_SHA256, digest)
    tlv_area = TLV_INFO.pack(TLV_INFO_MAGIC, TLV_INFO.size + len(hash_tlv)) + hash_tlv
    image = header + body + protected_area + tlv_area
    if defect is ImageDefect.TRUNCATED:
        image = image[: len(image) - SHA256_BYTES // 2]
    return image


def _tlv(kind: int, value: bytes) -> bytes:
    return TLV_HEADER.pack(kind, len(value)) + value


def check_image(data: bytes) -> DeviceImage:
    """What MCUboot checks before it boots a slot: magic, sizes, TLVs and the hash."""
    if len(data) < IMAGE_HEADER_SIZE:
        raise ImageCheckError(f"{len(data)} bytes is shorter than an image header")
    magic, _load, hdr_size, prot_size, img_size, _flags, *ver = IMAGE_HEADER.unpack_from(data)
    if magic != IMAGE_MAGIC:
        raise ImageCheckError(f"bad magic 0x{magic:08x}")
    if hdr_size < IMAGE_HEADER_SIZE:
        raise ImageCheckError(f"header size {hdr_size} < {IMAGE_HEADER_SIZE}")
    offset = hdr_size + img_size
    if offset + prot_size > len(data):
        raise ImageCheckError("image shorter than its header says")
    model: str | None = None
    if prot_size:
        for kind, value in _read_tlvs(data, offset, TLV_PROT_INFO_MAGIC, prot_size):
            if kind == MODEL_TLV:
                model = value.decode("utf-8", errors="replace")
    hashed_end = offset + prot_size
    hashes = [
        value
        for kind, value in _read_tlvs(data, hashed_end, TLV_INFO_MAGIC, None)
        if kind == TLV_SHA256
    ]
    if len(hashes) != 1:
        raise ImageCheckError(f"{len(hashes)} SHA256 TLVs (need exactly one)")
    digest = hashlib.sha256(data[:hashed_end]).digest()
    if digest != hashes[0]:
        raise ImageCheckError("SHA256 mismatch")
    return DeviceImage(ImageVersion(*ver), model, digest, len(data))


def _read_tlvs(
    data: bytes, offset: int, magic: int, expected_total: int | None
) -> list[tuple[int, bytes]]:
    if offset + TLV_INFO.size > len(data):
        raise ImageCheckError(f"no TLV info at offset {offset}")
    found_magic, total = TLV_INFO.unpack_from(data, offset)
    if found_magic != magic:
        raise ImageCheckError(f"TLV info magic 0x{found_magic:04x} at {offset}, want 0x{magic:04x}")
    if expected_total is not None and total != expected_total:
        raise ImageCheckError(f"protected TLV size {total} != header's {expected_total}")
    end = offset + total
    if end > len(data) or total < TLV_INFO.size:
        raise ImageCheckError(f"TLV area of {total} bytes at {offset} does not fit")
    tlvs = []
    position = offset + TLV_INFO.size
    while position < end:
        if position + TLV_HEADER.size > end:
            raise ImageCheckError(f"TLV header at {position} crosses the area end")
        kind, length = TLV_HEADER.unpack_from(data, position)
        position += TLV_HEADER.size
        if position + length > end:
            raise ImageCheckError(f"TLV 0x{kind:04x} at {position} crosses the area end")
        tlvs.append((kind, bytes(data[position : position + length])))
        position += length
    return tlvs
