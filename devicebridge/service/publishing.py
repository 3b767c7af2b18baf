"""What the bridge publishes goes through the outbox, with its message id."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from devicebridge.storage.outbox import Outbox

LOG = logging.getLogger(__name__)


class Publisher:
    """JSON messages into the outbox (with their ``message_id``), or nowhere without a broker."""

    def __init__(self, outbox: Outbox | None, notify: Callable[[], None]) -> None:
        self.outbox = outbox
        self._notify = notify

    @property
    def enabled(self) -> bool:
        return self.outbox is not None

    def publish(self, topic: str, body: Mapping[str, Any], *, retain: bool = False) -> None:
        if self.outbox is None:
            return
        message = {"message_id": self.outbox.message_id(self.outbox.next_sequence()), **body}
        self.outbox.append(
            topic, json.dumps(message, separators=(",", ":")).encode(), retain=retain
        )
        self._notify()

    def publish_raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self.outbox is None:
            return
        self.outbox.append(topic, payload, retain=retain)
        self._notify()
