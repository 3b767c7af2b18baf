"""Log lines that could repeat without bound (one per hostile MQTT payload), throttled.

Each kind of line (a name the code chooses, never text from outside) is logged at most
``burst`` times per ``window_s`` of wall time: the log is for a person to read, and ten
thousand identical warnings hide everything else. The first line held back in a window
says that more are being held back; the next line of that kind after the window says how
many were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

DEFAULT_BURST: Final = 5
DEFAULT_WINDOW_S: Final = 60.0


@dataclass(slots=True)
class _Window:
    started_s: float
    logged: int = 0
    suppressed: int = 0


class ThrottledLog:
    """``logger``, at most ``burst`` lines of each kind per ``window_s``."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = DEFAULT_BURST,
        window_s: float = DEFAULT_WINDOW_S,
        now_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.window_s = window_s
        self._now_s = now_s
        self._windows: dict[str, _Window] = {}

    def log(
        self, level: int, kind: str, message: str, *args: object, exc_info: bool = False
    ) -> None:
        now_s = self._now_s()
        window = self._windows.get(kind)
        if window is None or now_s - window.started_s >= self.window_s:
            if window is not None and window.suppressed:
                self.logger.log(
                    level,
                    "%d more %s line(s) were suppressed in the %.0f s before this one",
                    window.suppressed,
                    kind,
                    now_s - window.started_s,
                )
            window = self._windows[kind] = _Window(now_s)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(level, message, *args, exc_info=exc_info)
            return
        if not window.suppressed:
            self.logger.log(
                level,
                "more than %d %s lines in %g s: further ones are suppressed (and counted)"
                " until the window ends",
                self.burst,
                kind,
                self.window_s,
            )
        window.suppressed += 1
