"""Pure decision cores: no I/O, no asyncio, no bleak/serial/sqlite (import-linter enforced)."""
