"""Link-level mode: the simulated devices behind virtual Bluetooth controllers.

The in-process backend (:mod:`simulators.links.bleak_backend`) calls the device
models directly and is the default, for speed. This package puts each device
behind its own virtual controller (the `bumble <https://github.com/google/bumble>`_
stack) and gives the host a bumble central behind the same bleak ``backend=``
seam, so that real ATT and GATT packets carry the traffic: MTU exchange and
cutting, long writes, encryption and pairing, connects that wait for an
advertisement, disconnects from either side. QA chooses it for fidelity::

    from simulators.linklevel import LinkLevelWorld, link_level_clock

    world = LinkLevelWorld(seed=1234, clock=link_level_clock())
    massager = world.add_massager()
    async with world:
        world.clock.start()
        client = BleakClient(massager.address, backend=world.client_backend)

It needs the ``linklevel`` extra (``pip install devicebridge[linklevel]``).
See docs/qa.md, "Link-level mode".
"""

from __future__ import annotations

try:
    import bumble  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "simulators.linklevel needs bumble: pip install 'devicebridge[linklevel]'"
    ) from exc

from simulators.linklevel.central import (
    LinkLevelBleakClient,
    LinkLevelBleakScanner,
    LinkLevelCentral,
)
from simulators.linklevel.gatt import ENCRYPTED_CHAR_UUIDS
from simulators.linklevel.peripheral import LinkLevelPeripheral
from simulators.linklevel.world import LinkLevelWorld, controller_address, link_level_clock

__all__ = [
    "ENCRYPTED_CHAR_UUIDS",
    "LinkLevelBleakClient",
    "LinkLevelBleakScanner",
    "LinkLevelCentral",
    "LinkLevelPeripheral",
    "LinkLevelWorld",
    "controller_address",
    "link_level_clock",
]
