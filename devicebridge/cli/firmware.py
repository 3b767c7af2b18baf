"""Firmware commands: ``firmware info`` and ``firmware update`` (MCUmgr/SMP)."""

from __future__ import annotations

from devicebridge.cli.base import main


@main.group("firmware")
def firmware_group() -> None:
    """Device firmware over the standard MCUmgr/SMP protocol (BLE or serial)."""
