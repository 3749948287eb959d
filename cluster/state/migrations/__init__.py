"""The state store's Alembic environment, run in code: no alembic.ini anywhere.

`upgrade(connection)` brings a database to the newest revision inside the caller's
transaction; `StateStore` calls it on open, under a lock, so that several processes
opening the same database at once migrate it exactly once. A new revision goes into
`versions/` (`NNNN_what.py`, `down_revision` = the previous one); the initial revision
creates every table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

HERE = Path(__file__).resolve().parent
# the newest revision: versions/ holds NNNN_what.py with revision "NNNN" (a test checks
# that this is Alembic's head)
HEAD = max(p.name.split("_", 1)[0] for p in (HERE / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


class MigrationError(RuntimeError):
    """Alembic could not bring the database to `HEAD` (a revision it does not know: a newer
    Proctor wrote it)."""


def config(connection: Connection | None = None, url: str | None = None) -> "Config":
    """An Alembic config for this folder; env.py uses `connection`, else opens `url`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE).replace("%", "%%"))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def current(connection: Connection) -> str | None:
    """The revision the database is at; None when it has none yet."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(connection: Connection) -> None:
    """Run every migration not yet applied, on `connection`, in its open transaction.
    A database already at `HEAD` (every open but the first) is left without loading
    Alembic, whose import costs each of the platform's processes ~0.3 s of CPU as it
    starts. Raises `MigrationError`."""
    if current(connection) == HEAD:
        return
    from alembic import command
    from alembic.util.exc import CommandError

    try:
        command.upgrade(config(connection), "head")
    except CommandError as exc:
        raise MigrationError(str(exc)) from exc


def head() -> str:
    """The newest revision as Alembic reads it from versions/."""
    from alembic.script import ScriptDirectory

    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev
