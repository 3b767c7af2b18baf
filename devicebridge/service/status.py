"""The status file ``devicebridge status`` reads, and whether a bridge runs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from devicebridge.errors import ServiceError
from devicebridge.storage.files import open_private, private_directory
from devicebridge.storage.lock import holder as lock_holder

LOG = logging.getLogger(__name__)


STATUS_FILENAME: Final = "status.json"


def status_file(data_dir: Path) -> Path:
    return data_dir / STATUS_FILENAME


def write_status_file(data_dir: Path, status: Mapping[str, Any]) -> None:
    """Replace the status file atomically (a reader never sees half a file); mode 0600."""
    path = status_file(data_dir)
    temporary = path.with_suffix(".tmp")
    private_directory(data_dir)
    fd = open_private(temporary, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(status, indent=2, sort_keys=True))
    temporary.replace(path)


def read_status_file(data_dir: Path) -> dict[str, Any] | None:
    """The last status the service wrote, with ``alive`` telling whether a bridge runs now.

    ``alive`` comes from the data directory's bridge lock (:mod:`devicebridge.storage.lock`),
    not from the pid in the file: a killed bridge leaves ``state: running`` behind, and its
    pid may belong to another process by now. A bridge that holds the lock but has not
    written its own status yet (the file is missing or an earlier bridge's) is reported as
    ``{"state": "starting", "pid": ..., "alive": true}``. ``None``: no status and no bridge.
    """
    path = status_file(data_dir)
    running_pid = lock_holder(data_dir)
    status: dict[str, Any] | None
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        status = None
    except (OSError, ValueError) as exc:
        raise ServiceError(f"{path}: unreadable status file: {exc}") from exc
    if status is not None and not isinstance(status, dict):
        raise ServiceError(f"{path}: unreadable status file: not a JSON object")
    if running_pid is not None and (status is None or status.get("pid") != running_pid):
        status = {"state": "starting", "pid": running_pid}
    if status is None:
        return None
    status["alive"] = running_pid is not None
    return status
