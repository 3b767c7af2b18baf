"""Edges that carry protocol messages to and from a device: BLE (bleak) and serial (pyserial)."""

from devicebridge.device.transport.base import DeviceInfo, Transport

__all__ = ["DeviceInfo", "Transport"]
