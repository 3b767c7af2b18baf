"""The ``mosquitto`` fixture lives in tests/conftest.py (shared with tests/service/)."""
