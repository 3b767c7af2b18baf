"""Errors of the clinic console (each derives from DeviceBridgeError)."""

from __future__ import annotations

from devicebridge.errors import DeviceBridgeError


class ClinicError(DeviceBridgeError):
    """Something the console cannot do; the message says what and why."""


class ClinicExtraMissingError(ClinicError):
    """The console's optional dependencies are not installed."""

    def __init__(self, missing: str) -> None:
        super().__init__(
            f"the clinic console needs the optional 'clinic' extra ({missing} is missing): "
            "pip install 'devicebridge[clinic]'"
        )
        self.missing = missing
