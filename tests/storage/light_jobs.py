"""A job that must not load anything itself (see
``test_a_new_writer_process_answers_a_runs_first_job_without_the_host_s_heavy_modules``)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devicebridge.storage.desk import StoreDesk


def modules_loaded_job(desk: StoreDesk, prefixes: tuple[str, ...]) -> list[str]:
    """The modules the writer's process has loaded whose names start with ``prefixes``."""
    return sorted(name for name in sys.modules if name.startswith(prefixes))
