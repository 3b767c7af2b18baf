"""Simulated facial-care devices that plug in where hardware would.

The devices run real firmware behaviour (commands, events, sampling, a ring
buffer) on a :class:`VirtualClock`; a host reaches them through the real bleak
API with ``backend=world.scanner_backend`` / ``world.client_backend``, or over
a real pty (:class:`simulators.links.serial_port.PtySerialPort`). Nothing here
imports ``devicebridge``: a simulator that reused the host's code would hide
the host's bugs.
"""

from protocols import ShutdownReason
from simulators.clock import VirtualClock
from simulators.devices.device import Button, Press, SimulatedDevice
from simulators.devices.hand import HandScript, HandSegment
from simulators.devices.link import Channel, DeviceLink
from simulators.devices.mask import SimulatedLedMask
from simulators.devices.massager import SimulatedMassager
from simulators.devices.ring import TelemetryRing
from simulators.links.bleak_backend import SimulatedBleakClient, SimulatedBleakScanner
from simulators.world import SimulatedWorld

__all__ = [
    "Button",
    "Channel",
    "DeviceLink",
    "HandScript",
    "HandSegment",
    "Press",
    "ShutdownReason",
    "SimulatedBleakClient",
    "SimulatedBleakScanner",
    "SimulatedDevice",
    "SimulatedLedMask",
    "SimulatedMassager",
    "SimulatedWorld",
    "TelemetryRing",
    "VirtualClock",
]
