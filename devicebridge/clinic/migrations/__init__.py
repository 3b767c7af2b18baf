"""Alembic migrations of the console's database (run by ``devicebridge clinic migrate``)."""
