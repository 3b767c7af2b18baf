"""The ``devicebridge`` command line.

``main`` is the click group (:mod:`devicebridge.cli.base`); each module below adds one
family of commands to it when imported.
"""

from devicebridge.cli import clinic as _clinic  # noqa: F401  (registers commands)
from devicebridge.cli import devices as _devices  # noqa: F401
from devicebridge.cli import firmware as _firmware  # noqa: F401
from devicebridge.cli import programs as _programs  # noqa: F401
from devicebridge.cli import routines as _routines  # noqa: F401
from devicebridge.cli import service as _service  # noqa: F401
from devicebridge.cli.base import main

__all__ = ["main"]
