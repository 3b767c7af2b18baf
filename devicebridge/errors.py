"""Errors raised by the host side of devicebridge.

Every error devicebridge raises on purpose derives from :class:`DeviceBridgeError`;
errors of bleak, pyserial, sqlite3 and tomllib are translated where they are
caught (``raise X(...) from exc``), so callers need to know only this tree::

    DeviceBridgeError
    ├── TransportError                 the link to a device failed (device: where)
    │   ├── DeviceNotFoundError        no device answered to an identifier in time
    │   ├── ConnectionLostError        the link went down while in use
    │   ├── BluetoothUnavailableError  no Bluetooth stack or adapter to scan with
    │   └── NotConnectedError          an operation that needs a link, without one
    ├── CommandError                   a command did not succeed (command_id, opcode)
    │   ├── CommandTimeoutError        no acknowledgement within timeout_s
    │   └── CommandRejectedError       the device answered with a non-OK result
    ├── ProgramTransferError           a device program was not installed or started (stage)
    ├── ProgramRejectedError           a pushed signed program was refused (reason, nonce)
    ├── InvalidStateTransitionError    a connection state change the state machine forbids
    ├── SessionClosedError             the session was closed
    ├── PolicyError (also ValueError)  a safety policy file is malformed or unsafe (problems)
    ├── RoutineError (also ValueError) a routine file is malformed or breaks the policy (problems)
    ├── CatalogueError (also ValueError) device catalogue files are malformed (problems)
    ├── RoutineRunError                a routine could not be run on a device
    │   ├── RoutineRefusedError        admission refused it (refusals, allowed_from)
    │   ├── DeviceMismatchError        it is for another kind of device
    │   └── DeviceUnsupportedError     it needs what the device cannot do or measure (problems)
    ├── RegistryError                  the paired-device registry (path)
    │   ├── UnknownDeviceError         no paired device with that name
    │   ├── DuplicateNameError         the name is already used by another device
    │   ├── AlreadyPairedError         the serial number is paired under another name
    │   └── RegistrySchemaError        a database this version cannot read
    ├── SessionStoreError              the session store (path)
    ├── ProgramStoreError              programs and trusted keys (path)
    │   └── KeyBoundError              the key is trusted for another therapist
    ├── OutboxError                    the MQTT outbox (path)
    │   └── OutboxFullError            it reached its size limit
    ├── BridgeLockError                the data directory's bridge lock (path)
    │   └── BridgeRunningError         another bridge runs with it (pid)
    ├── ServiceError                   a request `serve` cannot carry out (device)
    ├── LocalApiError                  the running bridge could not run what was asked
    │   └── BridgeRefusedError         its admission refused the routine
    ├── MqttUnavailableError           the broker could not be reached (host, port)
    ├── ReportError                    a report could not be made or written (path)
    ├── FhirExportError                a FHIR Bundle could not be built or validated
    ├── CliInputError                  bad input on the command line or in a file
    ├── TherapistKeyError              a therapist key file (path)
    ├── QaError                        a QA run could not be set up
    ├── ConfigError                    an invalid configuration file (path, key)
    ├── DataDirError                   the data directory cannot be created or written (path)
    ├── FirmwareError                  firmware updates: devicebridge/firmware/errors.py
    └── ClinicError                    the clinic console: devicebridge/clinic/errors.py
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import datetime

    from devicebridge.core.admission import Admission
    from devicebridge.core.routine import Routine
    from devicebridge.core.signed_program import RejectReason
    from devicebridge.core.states import ConnectionState
    from devicebridge.core.tomlpath import Problem
    from protocols import Opcode, ProgramRejectReason, ResultCode


class DeviceBridgeError(Exception):
    """Root of every error raised by devicebridge."""


# --------------------------------------------------------------------------- transport


class TransportError(DeviceBridgeError):
    """The link to a device failed; ``device`` says which link (address or port)."""

    def __init__(self, message: str, *, device: str) -> None:
        super().__init__(f"{device}: {message}")
        self.device = device


class DeviceNotFoundError(TransportError):
    """No device matching ``identifier`` was seen within ``timeout_s``."""

    def __init__(self, identifier: str, *, timeout_s: float | None = None, where: str = "") -> None:
        within = f" within {timeout_s:g} s" if timeout_s is not None else ""
        place = f" ({where})" if where else ""
        super().__init__(f"no device found{within}{place}", device=identifier)
        self.identifier = identifier
        self.timeout_s = timeout_s


class ConnectionLostError(TransportError):
    """The link went down while an operation was using it."""


class BluetoothUnavailableError(TransportError):
    """Bluetooth cannot be used at all: no stack (BlueZ), no adapter, or it is off."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, device="Bluetooth")
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class NotConnectedError(TransportError):
    """An operation needs a connected link and there is none."""


# --------------------------------------------------------------------------- commands


class CommandError(DeviceBridgeError):
    """A command did not complete successfully."""

    def __init__(self, message: str, *, command_id: int, opcode: Opcode | int) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.opcode = opcode


def _opcode_name(opcode: Opcode | int) -> str:
    return getattr(opcode, "name", None) or f"0x{int(opcode):02x}"


class CommandTimeoutError(CommandError):
    """No acknowledgement arrived within ``timeout_s`` (on the session's clock)."""

    def __init__(
        self, *, command_id: int, opcode: Opcode | int, timeout_s: float, device: str
    ) -> None:
        super().__init__(
            f"{device}: {_opcode_name(opcode)} (command {command_id}) "
            f"not acknowledged within {timeout_s:g} s",
            command_id=command_id,
            opcode=opcode,
        )
        self.timeout_s = timeout_s
        self.device = device


class CommandRejectedError(CommandError):
    """The device acknowledged the command with a non-OK ``result``."""

    def __init__(
        self,
        *,
        command_id: int,
        opcode: Opcode | int,
        result: ResultCode | int,
        device: str,
        payload: bytes = b"",
    ) -> None:
        result_name = getattr(result, "name", None) or str(int(result))
        super().__init__(
            f"{device}: {_opcode_name(opcode)} (command {command_id}) rejected: {result_name}",
            command_id=command_id,
            opcode=opcode,
        )
        self.result = result
        self.device = device
        self.payload = payload


class ProgramTransferError(DeviceBridgeError):
    """A device program could not be installed or started.

    ``stage`` is where it failed (``"begin"``, ``"chunk"``, ``"commit"``, ``"start"``,
    ``"abort"``); ``result`` is the device's result code when it refused, ``reason`` and
    ``detail`` the refusal's reason code and detail (``protocols.ProgramRejection``), e.g.
    ``INCOMPLETE`` with the first missing byte offset.
    """

    def __init__(
        self,
        message: str,
        *,
        device: str,
        stage: str,
        transfer_id: int | None = None,
        result: ResultCode | int | None = None,
        reason: ProgramRejectReason | int | None = None,
        detail: int | None = None,
    ) -> None:
        where = f"transfer {transfer_id}, " if transfer_id is not None else ""
        super().__init__(f"{device}: program {stage} failed ({where}{message})")
        self.device = device
        self.stage = stage
        self.transfer_id = transfer_id
        self.result = result
        self.reason = reason
        self.detail = detail


class ProgramRejectedError(DeviceBridgeError, ValueError):
    """A signed program pushed by a therapist was refused (docs/mqtt.md).

    ``reason`` is the :class:`~devicebridge.core.signed_program.RejectReason` sent back in
    the acknowledgement, ``message`` the detail; ``nonce`` is the envelope's nonce when it
    could be read (the pusher matches the answer by it), else None: nobody to answer.
    """

    def __init__(self, reason: RejectReason, message: str, *, nonce: str | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.nonce = nonce


# --------------------------------------------------------------------------- session


class InvalidStateTransitionError(DeviceBridgeError):
    """The connection state machine does not allow ``current`` -> ``requested``."""

    def __init__(self, current: ConnectionState, requested: ConnectionState) -> None:
        super().__init__(f"illegal connection state change {current.name} -> {requested.name}")
        self.current = current
        self.requested = requested


class SessionClosedError(DeviceBridgeError):
    """The session was closed; it cannot be used again."""


# --------------------------------------------------------------------------- policy and routines


def _problem_lines(label: str, problems: list[Problem]) -> str:
    return "\n".join(p.render(label) for p in problems)


class PolicyError(DeviceBridgeError, ValueError):
    """A safety policy file is malformed or unsafe; ``problems`` says what and where
    (key path, line), one a line in the message."""

    def __init__(self, label: str, problems: list[Problem]) -> None:
        super().__init__(_problem_lines(label, problems))
        self.label = label
        self.problems = problems


class RoutineError(DeviceBridgeError, ValueError):
    """A routine file is malformed or breaks the policy; ``problems`` says what and where
    (key path, line and, for a broken limit, the policy rule and its source)."""

    def __init__(self, label: str, problems: list[Problem]) -> None:
        super().__init__(_problem_lines(label, problems))
        self.label = label
        self.problems = problems


class CatalogueError(DeviceBridgeError, ValueError):
    """Device catalogue files are malformed; ``problems`` pairs each problem with the file
    it was found in (key path and line in the message, one a line)."""

    def __init__(self, problems: list[tuple[str, Problem]]) -> None:
        count = len(problems)
        lines = [f"device catalogue: {count} problem{'s' if count != 1 else ''}"]
        lines += [problem.render(label) for label, problem in problems]
        super().__init__("\n".join(lines))
        self.problems = problems


# --------------------------------------------------------------------------- registry


class RegistryError(DeviceBridgeError):
    """The paired-device registry at ``path`` could not do what was asked."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(f"{message} (registry {path})" if path is not None else message)
        self.path = path


class UnknownDeviceError(RegistryError):
    def __init__(self, name: str, *, path: Path | None = None) -> None:
        super().__init__(f"no paired device named {name!r}", path=path)
        self.name = name


class DuplicateNameError(RegistryError):
    def __init__(self, name: str, *, existing_serial: str, path: Path | None = None) -> None:
        super().__init__(
            f"the name {name!r} is already used by the device with serial {existing_serial}",
            path=path,
        )
        self.name = name
        self.existing_serial = existing_serial


class AlreadyPairedError(RegistryError):
    def __init__(self, serial_number: str, *, existing_name: str, path: Path | None = None) -> None:
        super().__init__(
            f"the device with serial {serial_number} is already paired as {existing_name!r}",
            path=path,
        )
        self.serial_number = serial_number
        self.existing_name = existing_name


class RegistrySchemaError(RegistryError):
    def __init__(self, message: str, *, found_version: int, path: Path | None = None) -> None:
        super().__init__(message, path=path)
        self.found_version = found_version


# --------------------------------------------------------------------------- configuration


class ConfigError(DeviceBridgeError):
    """The configuration file is invalid; ``key`` names the setting when one is at fault."""

    def __init__(self, message: str, *, path: Path, key: str | None = None) -> None:
        where = f"{path}: {key}" if key else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.key = key


class DataDirError(DeviceBridgeError):
    """The data directory cannot be used; ``origin`` says where its path came from."""

    def __init__(self, message: str, *, path: Path, origin: str) -> None:
        super().__init__(
            f"data directory: {message} (from {origin}); choose a writable folder with "
            "--data-dir or DEVICEBRIDGE_DATA_DIR"
        )
        self.path = path
        self.origin = origin


# --------------------------------------------------------------------------- routines


class RoutineRunError(DeviceBridgeError):
    """A routine could not be run on a device."""


class RoutineRefusedError(RoutineRunError):
    """Admission refused the routine; ``refusals`` says why and from when it is possible."""

    def __init__(self, routine: Routine, admission: Admission, session_id: int | None) -> None:
        lines = [f"{routine.name!r} refused:"]
        for refusal in admission.refusals:
            lines.append(f"  - {refusal.message} (policy: {refusal.rule})")
        super().__init__("\n".join(lines))
        self.routine = routine
        self.admission = admission
        self.refusals = admission.refusals
        self.session_id = session_id

    @property
    def allowed_from(self) -> datetime | None:
        """The earliest time every refusal is lifted (None: not a matter of time)."""
        moments = [r.allowed_from for r in self.refusals]
        if any(m is None for m in moments):
            return None
        return max(m for m in moments if m is not None)


class DeviceMismatchError(RoutineRunError):
    """The routine is for another kind of device than the one connected."""

    def __init__(self, routine: Routine, device: str, kind: object) -> None:
        super().__init__(
            f"{device}: routine {routine.name!r} is for a {routine.device_kind.value}, "
            f"the device is a {getattr(kind, 'name', kind)}"
        )
        self.device = device


class DeviceUnsupportedError(RoutineRunError):
    """The routine needs something the device cannot do or measure (a pressure band on a
    device without a pressure sensor, a mode it does not have); ``problems`` name each step
    and say why, with the line in the routine file."""

    def __init__(self, routine: Routine, device: str, problems: list[Problem]) -> None:
        lines = [f"{device} cannot run {routine.name!r}:"]
        lines += [f"  - {p.render('routine')}" for p in problems]
        super().__init__("\n".join(lines))
        self.routine = routine
        self.device = device
        self.problems = problems
        self.session_id: int | None = None  # the refused attempt, when it was recorded


# --------------------------------------------------------------------------- stores


class SessionStoreError(DeviceBridgeError):
    """The session store could not be read or written; ``path`` says which file."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class ProgramStoreError(DeviceBridgeError):
    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class KeyBoundError(ProgramStoreError):
    """The key is already trusted for another therapist (remove it first)."""

    def __init__(self, key_id: str, *, therapist_id: str, wanted: str, path: Path) -> None:
        super().__init__(
            f"key {key_id} is already trusted for {therapist_id}, not {wanted}: a key signs"
            f" for one therapist (devicebridge trust remove {key_id}, then add it again)",
            path=path,
        )
        self.key_id = key_id
        self.therapist_id = therapist_id


class OutboxError(DeviceBridgeError):
    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class OutboxFullError(OutboxError):
    """The outbox reached its size limit; the oldest telemetry was not dropped silently."""


class BridgeLockError(DeviceBridgeError):
    """The data directory's bridge lock could not be taken or read; ``path`` says which."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class BridgeRunningError(BridgeLockError):
    """Another bridge (process ``pid``) runs with this data directory."""

    def __init__(self, pid: int, *, path: Path) -> None:
        super().__init__(
            f"a bridge is already running with data dir {path.parent} (pid {pid}); "
            "stop it first (devicebridge status)",
            path=path,
        )
        self.pid = pid


# --------------------------------------------------------------------------- the bridge service


class ServiceError(DeviceBridgeError):
    """A request to the service that cannot be carried out (unknown device, busy, ...)."""

    def __init__(self, message: str, *, device: str | None = None) -> None:
        super().__init__(f"{device}: {message}" if device else message)
        self.device = device


class LocalApiError(DeviceBridgeError):
    """The running bridge could not run what was asked (its message says why)."""


class BridgeRefusedError(LocalApiError):
    """The running bridge's admission refused the routine (the message lists why)."""


class MqttUnavailableError(DeviceBridgeError):
    """The broker could not be reached or dropped the connection."""

    def __init__(self, host: str, port: int, detail: str) -> None:
        super().__init__(f"MQTT broker {host}:{port}: {detail}")
        self.host = host
        self.port = port


# --------------------------------------------------------------------------- reports


class ReportError(DeviceBridgeError):
    """A report could not be made or written; ``path`` says where when a file is at fault."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path


class FhirExportError(DeviceBridgeError):
    """A Bundle could not be built or does not validate (a bug, or the extra is missing)."""


# --------------------------------------------------------------------------- command line and QA


class CliInputError(DeviceBridgeError):
    """Bad input on the command line or in a file; the message says what and where."""


class TherapistKeyError(DeviceBridgeError):
    """A therapist key file is missing, unreadable or already there."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class QaError(DeviceBridgeError):
    """A QA run could not be set up (bad routine, unknown device)."""
