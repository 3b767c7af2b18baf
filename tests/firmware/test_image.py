"""MCUboot images: the simulator's builder against our parser and against smpclient's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from smpclient.mcuboot import IMAGE_TLV, ImageInfo

from devicebridge.firmware import InvalidImageError, WrongModelError, load_image, parse_image
from simulators.smp import MODEL_TLV, ImageDefect, ImageVersion, build_image, check_image


def test_builder_output_parses_with_ours_and_with_smpclient(tmp_path: Path) -> None:
    data = build_image("2.3.4+5", "OFC-FM1", body_bytes=3000, seed=9)
    image = parse_image(data, path="a.bin")
    assert image.version == (2, 3, 4, 5)
    assert image.version_text == "2.3.4.5"
    assert image.model == "OFC-FM1"
    assert image.size_bytes == len(data)
    # A third party's parser (smpmgr uses it before uploading) reads the same things.
    path = tmp_path / "a.bin"
    path.write_bytes(data)
    info = ImageInfo.load_file(str(path))
    assert (info.header.ver.major, info.header.ver.minor, info.header.ver.revision) == (2, 3, 4)
    assert info.header.ver.build_num == 5
    assert info.get_tlv(IMAGE_TLV.SHA256).value == image.hash
    assert info.get_tlv(MODEL_TLV).value == b"OFC-FM1"
    # MCUboot's hash: header, body and protected TLVs (everything before the TLV info).
    hashed_bytes = info.header.hdr_size + info.header.img_size + info.header.protect_tlv_size
    assert hashlib.sha256(data[:hashed_bytes]).digest() == image.hash
    assert check_image(data).hash == image.hash
    assert load_image(path).hash == image.hash


def test_versions_order_and_print_like_zephyr() -> None:
    assert ImageVersion.parse("1.2.3") < ImageVersion.parse("1.10.0")
    assert str(ImageVersion.parse("1.2.3+0")) == "1.2.3"
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR\.REVISION"):
        ImageVersion.parse("1.2")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (build_image("1.1.0", "OFC-FM1", defect=ImageDefect.TRUNCATED), "truncated"),
        (build_image("1.1.0", "OFC-FM1", defect=ImageDefect.WRONG_MAGIC), "header magic"),
        (build_image("1.1.0", "OFC-FM1", defect=ImageDefect.WRONG_HASH), "hash mismatch"),
        (build_image("1.1.0", "OFC-FM1")[:20], "only 20 bytes"),
        (build_image("1.1.0", "OFC-FM1") + b"\0\0", "2 unexpected bytes after the TLV area"),
        (b"\x7fELF" + bytes(100), "header magic is 0x464c457f"),
    ],
    ids=["truncated", "wrong-magic", "wrong-hash", "header-only", "trailing", "elf"],
)
def test_bad_images_are_refused_with_what_and_where(data: bytes, expected: str) -> None:
    with pytest.raises(InvalidImageError, match=expected) as caught:
        parse_image(data, path="bad.bin")
    assert "bad.bin" in str(caught.value)
    assert caught.value.path == "bad.bin"


def test_image_without_model_tlv_is_not_a_device_image() -> None:
    data = bytearray(build_image("1.1.0", "OFC-FM1", body_bytes=100))
    # Rename the model TLV (type 0x00a0 -> 0x00a1): still a valid MCUboot image
    # once re-hashed, but it no longer says which model it is for.
    header_and_body = 32 + 100
    data[header_and_body + 4] = 0xA1
    hashed_end = len(data) - 40
    data[-32:] = hashlib.sha256(bytes(data[:hashed_end])).digest()
    with pytest.raises(InvalidImageError, match="no model TLV"):
        parse_image(bytes(data))


def test_wrong_model_is_refused_naming_both_models() -> None:
    image = parse_image(build_image("1.1.0", "OFC-LM1"), path="mask.bin")
    with pytest.raises(WrongModelError, match=r"built for model 'OFC-LM1'.*'OFC-FM1'"):
        image.check_model("OFC-FM1", device="left")
    image.check_model("OFC-LM1", device="mask")


def test_unreadable_file_is_an_invalid_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="cannot read"):
        load_image(tmp_path / "missing.bin")
