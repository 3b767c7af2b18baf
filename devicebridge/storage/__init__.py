"""Persistent state of the host (SQLite): import the module you need
(``devicebridge.storage.registry``, ``.sessions``, ...); this package imports none of them,
so that opening one store does not load the others."""
