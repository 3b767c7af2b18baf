"""The device side of MCUmgr/SMP: MCUboot slots, an SMP server, and its transports.

Every simulated device runs an SMP server (:class:`SmpFirmware`) reached over
the SMP GATT service (the bleak backend routes it), a second pty speaking the
SMP console framing (:class:`SmpSerialPort`), or UDP (:class:`SmpUdpServer`).
Over BLE, requests and responses share the link's airtime (:class:`Radio`); the
flash can be kept between runs (:class:`FirmwareStateStore`).
The server is written from the SMP specification with ``cbor2`` and ``struct``,
not with the ``smp`` package the host uses, so the two check each other; the
stock ``smpmgr`` client is the referee in the tests.
"""

from simulators.errors import ImageCheckError
from simulators.smp.firmware import RequestSeen, Slot, SmpFirmware, SwapKind
from simulators.smp.image import (
    MODEL_TLV,
    ImageDefect,
    ImageVersion,
    build_image,
    check_image,
)
from simulators.smp.radio import Radio
from simulators.smp.serial_port import SmpSerialPort
from simulators.smp.state import FirmwareStateStore
from simulators.smp.udp import SmpUdpServer

__all__ = [
    "MODEL_TLV",
    "FirmwareStateStore",
    "ImageCheckError",
    "ImageDefect",
    "ImageVersion",
    "Radio",
    "RequestSeen",
    "Slot",
    "SmpFirmware",
    "SmpSerialPort",
    "SmpUdpServer",
    "SwapKind",
    "build_image",
    "check_image",
]
