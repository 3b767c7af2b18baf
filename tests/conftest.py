"""Suite-wide settings and the private Mosquitto fixture (tests/broker.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.broker import Mosquitto

# CI runs a fixed set of examples so that main stays green for a reason that can be
# reproduced; developers get fresh random examples on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# A suite started in the background by a shell without job control (``cmd &`` in a script)
# inherits SIGINT ignored, and an ignored signal stays ignored in every command the tests
# start: the Ctrl-C tests would then watch commands that cannot be interrupted. A handler
# here is reset to the default in each command started, as a terminal would have it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private broker on a free port (skips with an install hint without mosquitto)."""
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
