"""Persistent state of the host (SQLite)."""

from devicebridge.storage.registry import DeviceRegistry, FirmwareRecord, PairedDevice

__all__ = ["DeviceRegistry", "FirmwareRecord", "PairedDevice"]
