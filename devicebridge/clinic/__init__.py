"""The clinic console: a therapist's web console over the bridges' MQTT topics.

An optional part of devicebridge (``pip install 'devicebridge[clinic]'``): an ASGI app
(Starlette, Jinja2 templates, htmx, uPlot) over a SQLAlchemy store (SQLite or
PostgreSQL, Alembic migrations), fed by an MQTT ingester. ``docs/clinic.md`` describes
it; ``devicebridge clinic serve`` runs it.

Nothing here is imported by the rest of devicebridge except the ``clinic`` commands,
which import it inside each command (:func:`require_extra` first).
"""

from __future__ import annotations

import importlib.util
from typing import Final

from devicebridge.clinic.errors import ClinicError, ClinicExtraMissingError

# The import names of the 'clinic' extra (pyproject.toml).
EXTRA_MODULES: Final = (
    "starlette",
    "uvicorn",
    "jinja2",
    "multipart",
    "sqlalchemy",
    "alembic",
    "argon2",
    "fhir.resources",
    "psycopg",
)


def require_extra() -> None:
    """Raise :class:`ClinicExtraMissingError` naming the extra if a part is missing."""
    for name in EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ClinicExtraMissingError(name)


__all__ = ["ClinicError", "ClinicExtraMissingError", "require_extra"]
