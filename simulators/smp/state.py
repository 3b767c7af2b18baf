"""Simulated devices' flash kept in a directory between runs (``--simulate`` commands).

A real device keeps its firmware when the host's command ends; a simulated one
lives only as long as the command's process. :class:`FirmwareStateStore` saves
each device's slots, pending swap and partial upload (:meth:`SmpFirmware.snapshot`)
as ``<serial number>.smp`` when a run ends, and puts them back when the next run
builds the same devices, so an update, its resume after Ctrl-C, and ``firmware
info`` afterwards see the same device. Only devices whose flash changed are written.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Final

from simulators.devices.device import SimulatedDevice
from simulators.smp.firmware import SmpFirmware

_LOGGER = logging.getLogger(__name__)

SUFFIX: Final = ".smp"


class FirmwareStateStore:
    """Loads and saves the flash of simulated devices in ``directory`` (one file each)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._baseline: dict[str, bytes] = {}

    def path_for(self, device: SimulatedDevice) -> Path:
        return self.directory / f"{device.serial_number}{SUFFIX}"

    def load(self, device: SimulatedDevice, firmware: SmpFirmware) -> bool:
        """Put back what the last run saved for ``device``; ``False`` when there was nothing
        (or nothing usable: a damaged file is reported and the device starts from the factory)."""
        path = self.path_for(device)
        try:
            saved = path.read_bytes()
        except FileNotFoundError:
            saved = None
        except OSError as exc:
            _LOGGER.warning("simulated device %s: cannot read %s: %s", device.name, path, exc)
            saved = None
        if saved is not None:
            try:
                firmware.restore(saved)
            except ValueError as exc:
                _LOGGER.warning(
                    "simulated device %s: ignoring %s (%s); it starts from its factory image",
                    device.name,
                    path,
                    exc,
                )
                saved = None
        self._baseline[device.serial_number] = firmware.snapshot()
        return saved is not None

    def save(self, device: SimulatedDevice, firmware: SmpFirmware) -> bool:
        """Write ``device``'s flash if it changed since :meth:`load`; ``True`` if written."""
        snapshot = firmware.snapshot()
        if self._baseline.get(device.serial_number) == snapshot:
            return False
        path = self.path_for(device)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Atomic: a run killed while writing leaves the previous state, not half a file.
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(snapshot)
                os.replace(temporary, path)
            except OSError:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            _LOGGER.warning(
                "simulated device %s: its firmware state is not kept (%s: %s)",
                device.name,
                path,
                exc,
            )
            return False
        self._baseline[device.serial_number] = snapshot
        return True
