"""What the bridge publishes goes through the outbox, with its message id."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from devicebridge.errors import OutboxError
from devicebridge.storage.outbox import Outbox

LOG = logging.getLogger(__name__)

# How long published messages are gathered before they are stored in the outbox together
# (wall seconds): one transaction per group instead of one per message. A killed bridge
# loses at most this much of what it published; the broker sees it this much later.
GROUP_S: Final = 0.1


class Publisher:
    """JSON messages into the outbox (with their ``message_id``), or nowhere without a broker.

    Messages are staged in the outbox and stored together :data:`GROUP_S` after the first
    of a group; :meth:`flush` stores them at once (the service calls it before it drains
    the outbox and closes it).
    """

    def __init__(
        self, outbox: Outbox | None, notify: Callable[[], None], *, group_s: float = GROUP_S
    ) -> None:
        self.outbox = outbox
        self.group_s = group_s
        self._notify = notify
        self._flush_handle: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self.outbox is not None

    def publish(self, topic: str, body: Mapping[str, Any], *, retain: bool = False) -> None:
        if self.outbox is None:
            return
        message = {"message_id": self.outbox.message_id(self.outbox.next_sequence()), **body}
        self.outbox.stage(topic, json.dumps(message, separators=(",", ":")).encode(), retain=retain)
        self._flush_soon()

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.outbox is None:
            return
        self.outbox.stage(topic, payload, retain=retain)
        self._flush_soon()

    def flush(self) -> None:
        """Store the staged messages now (one transaction) and wake the link."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.outbox is not None and self.outbox.commit():
            self._notify()

    def _flush_soon(self) -> None:
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop to wait on: store it now
            return
        self._flush_handle = loop.call_later(self.group_s, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_handle = None
        try:
            self.flush()
        except OutboxError:
            # The messages stay staged; the next publish schedules another try.
            LOG.exception("cannot store %d messages in the outbox", self._staged())

    def _staged(self) -> int:
        return self.outbox.staged if self.outbox is not None else 0
