"""The ``devicebridge`` command line.

``main`` is the click group (:mod:`devicebridge.cli.base`); it imports the module of a
command only when that command runs (:data:`devicebridge.cli.base.COMMANDS`).
"""

from devicebridge.cli.base import main

__all__ = ["main"]
