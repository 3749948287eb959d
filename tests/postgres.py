"""A real PostgreSQL server for the tests, from Debian's `postgresql` package.

`PostgresServer` initialises a throwaway cluster in a temporary folder owned by the
`postgres` OS user (the server refuses to run as root), listens on 127.0.0.1 on a free
port and on a Unix socket in that folder, trusts every local connection, creates a
database and gives its SQLAlchemy URL. Leaving the `with` block stops the server
(`pg_ctl stop -m fast`) and removes the folder. Durability is off (fsync and friends):
it is a test server.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from glob import glob
from pathlib import Path
from ports import free_port

INSTALL_HINT = ("PostgreSQL is not installed: no /usr/lib/postgresql/<version>/bin/initdb. The test "
                "command installs it (apt-get install -y postgresql); install it the same way and rerun.")


class PostgresUnavailable(RuntimeError):
    """The server cannot be started here. The `postgres_url` fixture fails the test with it."""


def newest_bin_dir() -> Path:
    """The bin folder of the newest installed PostgreSQL."""
    found = [Path(p).parent for p in glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        raise PostgresUnavailable(INSTALL_HINT)
    return max(found, key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0])



class PostgresServer:
    """`with PostgresServer() as url:` — a running server and a fresh database in it."""

    def __init__(self, database: str = "proctor_test", os_user: str = "postgres"):
        self.bin = newest_bin_dir()
        self.database = database
        self.os_user = os_user
        self.port = free_port()
        self.root: Path | None = None

    @property
    def data(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "data"

    def url(self, database: str | None = None) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database or self.database}"

    def _as_owner(self, *args: str, timeout: float = 120) -> str:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        done = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise PostgresUnavailable(f"{' '.join(args[:2])} failed ({done.returncode}):\n"
                                      f"{done.stdout}{done.stderr}{tail}")
        return done.stdout

    def start(self) -> str:
        self.root = Path(tempfile.mkdtemp(prefix="proctor-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(self.os_user)
            except KeyError:
                raise PostgresUnavailable(f"no OS user {self.os_user!r}; {INSTALL_HINT}") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.root.chmod(0o700)
        self._as_owner("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--no-locale", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.root}'\nmax_connections = 200\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                       "start")
        self.create_database(self.database)
        return self.url()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self._psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _psql(self, sql: str) -> None:
        self._as_owner("psql", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                       "-v", "ON_ERROR_STOP=1", "-qc", sql)

    def halt(self) -> None:
        """Stop the server as an upgrade or a failover does (`pg_ctl stop -m fast`: open
        connections are terminated); `resume()` starts it again on the same port and data."""
        self._as_owner("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.data.parent / "server.log"), "-w", "-t", "60",
                       "start")

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: connections terminated, the server back a moment later."""
        self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.data.parent / "server.log"), "-m", "fast",
                       "-w", "-t", "60", "restart")

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self._as_owner("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
