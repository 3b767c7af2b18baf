"""BOOT and SHUTDOWN payloads with the sample counts a host needs after a restart."""

from __future__ import annotations

import pytest

import protocols as p


def test_boot_payload_layouts() -> None:
    assert p.BootEvent().encode() == b""
    assert p.BootEvent(p.ResetReason.WATCHDOG).encode() == bytes.fromhex("01")
    assert p.BootEvent(p.ResetReason.SOFTWARE, 0x12345678).encode() == bytes.fromhex("0378563412")
    # The whole event (docs/protocol.md): BOOT at 0 ms, event 0, watchdog reset, the
    # previous boot took 4660 samples.
    event = p.Event(0, 0, p.EventCode.BOOT, p.BootEvent(p.ResetReason.WATCHDOG, 4660).encode())
    assert event.encode() == bytes.fromhex("20 0000 00000000 01 01 34120000")


def test_boot_payload_decodes_every_generation() -> None:
    assert p.BootEvent.decode(b"") == p.BootEvent(None, None)  # nothing known
    assert p.BootEvent.decode(b"\x02") == p.BootEvent(p.ResetReason.BROWN_OUT, None)
    assert p.BootEvent.decode(bytes.fromhex("00e8030000")) == p.BootEvent(
        p.ResetReason.POWER_ON, 1000
    )
    # Fields a later version may append are ignored; unknown reasons stay numbers.
    assert p.BootEvent.decode(bytes.fromhex("07e8030000ff")) == p.BootEvent(7, 1000)
    with pytest.raises(p.TruncatedFrameError):
        p.BootEvent.decode(bytes.fromhex("03e803"))  # half a count is no count
    with pytest.raises(p.EncodeError):
        p.BootEvent(None, 5).encode()


def test_shutdown_payload_layouts() -> None:
    assert p.ShutdownEvent(p.ShutdownReason.BUTTON).encode() == b"\x01"
    assert p.ShutdownEvent(p.ShutdownReason.BATTERY_EMPTY, 1000).encode() == bytes.fromhex(
        "00e8030000"
    )
    assert p.ShutdownEvent.decode(b"\x02") == p.ShutdownEvent(p.ShutdownReason.HOST)
    assert p.ShutdownEvent.decode(bytes.fromhex("01ffffffff")) == p.ShutdownEvent(
        p.ShutdownReason.BUTTON, 2**32 - 1
    )
    with pytest.raises(p.TruncatedFrameError):
        p.ShutdownEvent.decode(b"")
    with pytest.raises(p.EncodeError):
        p.ShutdownEvent(p.ShutdownReason.HOST, 2**32).encode()
