"""Edges that carry the bridge's messages to and from a device, one driver per device family:
OFCP over BLE (bleak) and serial (pyserial), FOREO over BLE."""

from devicebridge.device.transport.base import DeviceInfo, Transport

__all__ = ["DeviceInfo", "Transport"]
