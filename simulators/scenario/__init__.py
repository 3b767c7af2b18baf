"""Scenarios: a TOML timeline of devices, what the hand does, and which faults happen when.

This module reads the device side of a scenario and builds it into a
:class:`~simulators.world.SimulatedWorld`. What the bridge must do (the ``[expect]``
tables) is kept as plain data here and checked by ``devicebridge.qa``, which runs the
bridge; the format is in ``docs/qa.md``.

Every problem in a file is reported with the table it is in (``[[faults]] #2: ...``).
"""
