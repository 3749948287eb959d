"""Alembic revisions of the state store, oldest first (a package so that wheels carry them)."""
