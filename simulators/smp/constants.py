"""SMP numbers from the MCUmgr specification (Zephyr ``smp_protocol.rst``, ``img_mgmt.h``)."""

from __future__ import annotations

import enum
import struct
from typing import Final

SMP_UDP_PORT: Final = 1337  # the convention; tests use a free port

# res(3) ver(2) op(3), flags, length, group, sequence, command: network byte order.
SMP_HEADER: Final = struct.Struct("!BBHHBB")
SMP_HEADER_SIZE: Final = SMP_HEADER.size
VERSION_SHIFT: Final = 3
VERSION_MASK: Final = 0b11
OP_MASK: Final = 0b111


class Op(enum.IntEnum):
    READ = 0
    READ_RSP = 1
    WRITE = 2
    WRITE_RSP = 3


class Group(enum.IntEnum):
    OS = 0
    IMAGE = 1


class OsCommand(enum.IntEnum):
    ECHO = 0
    RESET = 5
    MCUMGR_PARAMETERS = 6


class ImageCommand(enum.IntEnum):
    STATE = 0
    UPLOAD = 1
    ERASE = 5
    SLOT_INFO = 6  # Zephyr CONFIG_MCUMGR_GRP_IMG_SLOT_INFO


class MgmtErr(enum.IntEnum):
    """General SMP result codes (``rc``)."""

    EOK = 0
    EUNKNOWN = 1
    EINVAL = 3
    ENOENT = 5
    EBADSTATE = 6
    ENOTSUP = 8
    EBUSY = 10


class ImgErr(enum.IntEnum):
    """Image management group result codes (SMP v2 ``err.rc``)."""

    NO_IMAGE = 3
    INVALID_TLV = 5
    HASH_NOT_FOUND = 8
    NO_FREE_SLOT = 9
    INVALID_SLOT = 14
    INVALID_OFFSET = 20
    INVALID_LENGTH = 21
    INVALID_IMAGE_HEADER = 22
    INVALID_IMAGE_HEADER_MAGIC = 23
    INVALID_HASH = 24
    CURRENT_VERSION_IS_NEWER = 27
    IMAGE_ALREADY_PENDING = 28
    INVALID_IMAGE_TOO_LARGE = 30
    INVALID_IMAGE_DATA_OVERRUN = 31
    IMAGE_SETTING_TEST_TO_ACTIVE_DENIED = 33


# SMP over a serial console (Zephyr CONFIG_MCUMGR_TRANSPORT_UART/SHELL): base64 lines.
SERIAL_START: Final = b"\x06\x09"
SERIAL_CONTINUE: Final = b"\x04\x14"
SERIAL_LINE_END: Final = b"\n"
SERIAL_LINE_BYTES: Final = 128  # CONFIG_UART_MCUMGR_RX_BUF_SIZE / console line convention

# The first four bytes of every MCUboot image (magic 0x96f3b83d, little-endian).
IMAGE_MAGIC_BYTES: Final = bytes.fromhex("3db8f396")
