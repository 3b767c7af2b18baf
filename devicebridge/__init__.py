"""devicebridge: an async bridge between a laptop and facial-care devices over BLE and serial.

The public surface, importable from the package itself::

    from devicebridge import DeviceSession, BleTransport, SerialTransport, SystemClock

Names load on first use (PEP 562), so importing a pure core such as
``devicebridge.core.engine`` does not pull in bleak, pyserial or SQLite.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

__version__: Final = "0.1.0"

_EXPORTS: Final[dict[str, str]] = {
    "BleTransport": "devicebridge.device.transport.ble",
    "SerialTransport": "devicebridge.device.transport.serial",
    "Transport": "devicebridge.device.transport.base",
    "DeviceInfo": "devicebridge.device.transport.base",
    "scan": "devicebridge.device.transport.ble",
    "DeviceSession": "devicebridge.device.session",
    "MassagerSession": "devicebridge.device.session",
    "MaskSession": "devicebridge.device.session",
    "SessionStats": "devicebridge.device.session",
    "Clock": "devicebridge.clock",
    "SystemClock": "devicebridge.clock",
    "DeviceBridgeError": "devicebridge.errors",
    "DeviceRegistry": "devicebridge.storage.registry",
    "SessionStore": "devicebridge.storage.sessions",
    "SafetyPolicy": "devicebridge.core.policy",
    "parse_policy": "devicebridge.core.policy",
    "default_policy": "devicebridge.core.policy",
    "Routine": "devicebridge.core.routine",
    "parse_routine": "devicebridge.core.routine",
    "MassageEngine": "devicebridge.core.engine",
    "LedEngine": "devicebridge.core.engine",
    "Decision": "devicebridge.core.engine",
}

__all__ = [
    "BleTransport",
    "Clock",
    "Decision",
    "DeviceBridgeError",
    "DeviceInfo",
    "DeviceRegistry",
    "DeviceSession",
    "LedEngine",
    "MaskSession",
    "MassageEngine",
    "MassagerSession",
    "Routine",
    "SafetyPolicy",
    "SerialTransport",
    "SessionStats",
    "SessionStore",
    "SystemClock",
    "Transport",
    "default_policy",
    "parse_policy",
    "parse_routine",
    "scan",
]

if TYPE_CHECKING:
    from devicebridge.clock import Clock, SystemClock
    from devicebridge.core.engine import Decision, LedEngine, MassageEngine
    from devicebridge.core.policy import SafetyPolicy, default_policy, parse_policy
    from devicebridge.core.routine import Routine, parse_routine
    from devicebridge.device.session import (
        DeviceSession,
        MaskSession,
        MassagerSession,
        SessionStats,
    )
    from devicebridge.device.transport.base import DeviceInfo, Transport
    from devicebridge.device.transport.ble import BleTransport, scan
    from devicebridge.device.transport.serial import SerialTransport
    from devicebridge.errors import DeviceBridgeError
    from devicebridge.storage.registry import DeviceRegistry
    from devicebridge.storage.sessions import SessionStore


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'devicebridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
