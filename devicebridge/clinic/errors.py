"""Errors of the clinic console, under :class:`~devicebridge.errors.DeviceBridgeError`::

    ClinicError                        what the console cannot do (the message says why)
    ├── ClinicExtraMissingError        the 'clinic' extra is not installed (names it)
    ├── DatabaseError                  its database cannot be opened or migrated (db.py)
    ├── AccountError                   an account cannot be created or changed (auth.py)
    ├── AuthoringError                 a program cannot be signed or pushed (authoring.py)
    ├── NotFoundError                  no such thing, or not this user's (queries.py)
    └── RecordError                    a broker message the contract cannot read (ingest
                                       counts and skips it)

(``devicebridge.errors.FhirExportError`` is a DeviceBridgeError of its own: the CLI uses it
without the console.)
"""

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


class DatabaseError(ClinicError):
    """The console's database cannot be opened, migrated or used."""


class AccountError(ClinicError):
    """An account cannot be created or changed (the message says why)."""


class AuthoringError(ClinicError):
    """A program cannot be signed or pushed (invalid, no key, no client)."""


class NotFoundError(ClinicError):
    """No such thing, or not this user's to see."""


class RecordError(ClinicError, ValueError):
    """A message that cannot be read as the contract says (it is counted and skipped)."""
