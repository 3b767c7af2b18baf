"""The local API of a running bridge: routines started on it from this computer.

While ``devicebridge serve`` runs it holds the devices' links, so ``devicebridge run`` on
the same data directory does not open a second link: it asks the bridge to run the routine
through a Unix socket in the data directory (``bridge.sock``, mode 0600, so only the user
who runs the bridge can use it). The routine then runs on the bridge's own runner, under
its policy, recorded in its store and published like any session (a therapist's program
counts for adherence), and the command shows the same live guidance as a local run.

The protocol is one JSON object per line. The client sends one request::

    {"op": "run", "device": "face" | null, "routine_text": "..." | null, "label": "...",
     "program_id": 4 | null, "mode": "auto" | "host" | "device" | null,
     "max_duration_s": 3600 | null}

and reads events until the last: ``{"event": "started", "device": ..., "session_id": ...}``,
``{"event": "state", "state": {...}}`` (a :class:`~devicebridge.run.view.RunnerState`),
``{"event": "decision", "decision": {...}}``, then one of ``{"event": "result", ...}``
(a :class:`~devicebridge.run.summary.RunSummary`), ``{"event": "refused", "message": ...}`` or
``{"event": "error", "message": ...}``. Closing the connection stops the routine (the
device is stopped and the session stored as ``stopped``).

Requests are checked like anything else from outside: a malformed line, an unknown
device or an invalid routine is answered with an error event, never ends the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import platformdirs

from devicebridge.config import APP_NAME
from devicebridge.core.engine import Decision, DecisionKind, PressureState
from devicebridge.core.routine import DeviceKindName, RoutineError, parse_routine
from devicebridge.errors import (
    BridgeRefusedError,
    DeviceBridgeError,
    LocalApiError,
    RoutineRefusedError,
)
from devicebridge.run.runner import RunMode
from devicebridge.run.summary import RunSummary
from devicebridge.run.view import RunnerState

if TYPE_CHECKING:
    from devicebridge.service.supervisor import BridgeService

LOG = logging.getLogger(__name__)

SOCKET_FILENAME: Final = "bridge.sock"
SOCKET_MODE: Final = 0o600
PRIVATE_DIR_MODE: Final = 0o700
# sockaddr_un holds 108 bytes on Linux, 104 on macOS, with the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 100
MAX_REQUEST_BYTES: Final = 256 * 1024  # a routine file is at most a few kilobytes


def socket_path(data_dir: Path) -> Path:
    """Where the bridge serving ``data_dir`` listens: in the data directory, or, where that
    path is too long for a Unix socket, in the user's private runtime directory under a
    name derived from the data directory."""
    path = data_dir.resolve() / SOCKET_FILENAME
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH_BYTES:
        return path
    runtime = Path(platformdirs.user_runtime_dir(APP_NAME))
    runtime.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    digest = hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()[:24]
    return runtime / f"{digest}.sock"


# --------------------------------------------------------------------------- wire forms


def state_json(state: RunnerState) -> dict[str, Any]:
    body = dataclasses.asdict(state)
    body["device_kind"] = state.device_kind.value
    body["pressure_state"] = None if state.pressure_state is None else int(state.pressure_state)
    return body


def state_from_json(body: Mapping[str, Any]) -> RunnerState:
    values = dict(body)
    values["device_kind"] = DeviceKindName(values["device_kind"])
    if values.get("pressure_state") is not None:
        values["pressure_state"] = PressureState(values["pressure_state"])
    for key in ("band_kpa", "not_measured"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return RunnerState(**values)


def decision_json(decision: Decision) -> dict[str, Any]:
    body = dataclasses.asdict(decision)
    body["kind"] = decision.kind.value
    return body


def decision_from_json(body: Mapping[str, Any]) -> Decision:
    values = dict(body)
    values["kind"] = DecisionKind(values["kind"])
    return Decision(**values)


def result_json(result: RunSummary) -> dict[str, Any]:
    return {
        "session_id": result.session_id,
        "status": result.status,
        "end_reason": result.end_reason,
        "summary": dict(result.summary),
    }


# --------------------------------------------------------------------------- server


class LocalApiServer:
    """Serves the local API of ``service`` on ``socket_path(service.data_dir)``."""

    def __init__(self, service: BridgeService) -> None:
        self.service = service
        self.path = socket_path(service.data_dir)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # A socket file left by a bridge that was killed: nobody listens on it any more
        # (the data directory's lock says this bridge is the only one).
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._on_client, path=str(self.path), limit=MAX_REQUEST_BYTES
        )
        os.chmod(self.path, SOCKET_MODE)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(event: Mapping[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")

        try:
            line = await reader.readline()
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            if request.get("op") != "run":
                raise ValueError(f"unknown op {request.get('op')!r} (run)")
            await self._run(request, reader, send)
        except (ValueError, RecursionError, asyncio.LimitOverrunError) as exc:
            send({"event": "error", "message": f"bad request: {exc}"})
        except RoutineRefusedError as exc:
            send({"event": "refused", "message": str(exc)})
        except DeviceBridgeError as exc:
            send({"event": "error", "message": str(exc)})
        except ConnectionError:
            pass
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    async def _run(
        self,
        request: Mapping[str, Any],
        reader: asyncio.StreamReader,
        send: Callable[[Mapping[str, Any]], None],
    ) -> None:
        service = self.service
        program_id = request.get("program_id")
        if program_id is not None:
            if isinstance(program_id, bool) or not isinstance(program_id, int):
                raise ValueError("program_id must be an integer")
            routine = service.program_routine(program_id)
        else:
            text, label = request.get("routine_text"), request.get("label") or "routine"
            if not isinstance(text, str) or not isinstance(label, str):
                raise ValueError("routine_text and label must be strings")
            try:
                routine = parse_routine(text, service.policy, label=label)
            except RoutineError as exc:
                raise LocalApiError(f"{label}: not a valid routine:\n{exc}") from exc
        mode_text = request.get("mode")
        mode = RunMode(mode_text) if isinstance(mode_text, str) else None
        max_duration = request.get("max_duration_s")
        if max_duration is not None and (
            isinstance(max_duration, bool) or not isinstance(max_duration, int | float)
        ):
            raise ValueError("max_duration_s must be a number")
        device = request.get("device")
        serial = service.device_for(
            str(device) if device is not None else None, routine.device_kind.value
        )
        runner = await service.start_routine(
            serial,
            routine,
            program_id=program_id,
            mode=mode,
            max_duration_s=None if max_duration is None else float(max_duration),
            on_update=lambda state: send({"event": "state", "state": state_json(state)}),
            on_decision=lambda d: send({"event": "decision", "decision": decision_json(d)}),
        )
        worker = service.workers[serial]
        send({"event": "started", "device": worker.paired.name, "serial": serial})
        # The client closing its end (Ctrl-C) stops the routine.
        hang_up = asyncio.ensure_future(reader.read())
        done = asyncio.ensure_future(worker.wait_routine())
        try:
            await asyncio.wait({hang_up, done}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                runner.request_stop("stopped by the user")
            result = await done
        finally:
            hang_up.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await hang_up
        if result is None:
            why = worker.last_failure or "the routine failed (see the bridge's log)"
            raise LocalApiError(f"{serial}: {why}")
        send({"event": "result", **result_json(result)})


# --------------------------------------------------------------------------- client


async def connect(data_dir: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection to the bridge serving ``data_dir``, or None when none listens."""
    try:
        return await asyncio.open_unix_connection(str(socket_path(data_dir)))
    except (FileNotFoundError, ConnectionRefusedError):
        return None


async def run_on_bridge(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    request: Mapping[str, Any],
    *,
    on_started: Callable[[str], None] | None = None,
    on_state: Callable[[RunnerState], None] | None = None,
    on_decision: Callable[[Decision], None] | None = None,
) -> RunSummary:
    """Ask the bridge to run a routine and follow it to its end (see the module doc).

    Cancelling this (Ctrl-C) closes the connection, which stops the routine.
    """
    reader, writer = connection
    try:
        writer.write(json.dumps({"op": "run", **request}).encode() + b"\n")
        await writer.drain()
        decisions: list[Decision] = []
        while line := await reader.readline():
            event = json.loads(line)
            kind = event.get("event")
            if kind == "started" and on_started is not None:
                on_started(str(event["device"]))
            elif kind == "state" and on_state is not None:
                on_state(state_from_json(event["state"]))
            elif kind == "decision":
                decision = decision_from_json(event["decision"])
                decisions.append(decision)
                if on_decision is not None:
                    on_decision(decision)
            elif kind == "result":
                return RunSummary(
                    event["session_id"],
                    event["status"],
                    event["end_reason"],
                    event["summary"],
                    tuple(decisions),
                )
            elif kind == "refused":
                raise BridgeRefusedError(str(event["message"]))
            elif kind == "error":
                raise LocalApiError(f"the running bridge: {event['message']}")
        raise LocalApiError("the running bridge closed the connection (it stopped?)")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
