"""The state store's Alembic environment, run in code: no alembic.ini anywhere.

`upgrade(connection)` brings a database to the newest revision inside the caller's
transaction; `StateStore` calls it on open, under a lock, so that several processes
opening the same database at once migrate it exactly once. A new revision goes into
`versions/` (`NNNN_what.py`, `down_revision` = the previous one); the initial revision
creates every table.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

HERE = Path(__file__).resolve().parent


def config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic config for this folder; env.py uses `connection`, else opens `url`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE).replace("%", "%%"))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Connection) -> None:
    """Run every migration not yet applied, on `connection`, in its open transaction."""
    command.upgrade(config(connection), "head")


def head() -> str:
    """The newest revision: what `alembic_version` holds once `upgrade` ran."""
    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev
