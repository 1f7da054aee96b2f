"""A real PostgreSQL server for tests and benchmarks: Debian's PostgreSQL binaries, a cluster
made with initdb in a temporary folder, TCP on a free local port, stopped and deleted after.

initdb and postgres refuse to run as root, so as root the cluster belongs to the `postgres`
user that Debian's package creates (or to `duet-pg`, made with useradd, if there is none);
its folder is handed to that user. Logins on 127.0.0.1 are trusted (`initdb --auth=trust`):
nothing else can reach the server, and it lives as long as the test session.

Fixtures (imported by conftest.py): `postgres_server` (session), `postgres_url` (a fresh
database per test, dropped after) and `db_target` (each test twice: a SQLite file and a
PostgreSQL database).

Left out: PostgreSQL versions other than the newest under /usr/lib/postgresql, TLS.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import free_port

ROLE = "duet"


def postgres_bin() -> Path | None:
    """The bin folder of the newest PostgreSQL installed from Debian's packages, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _run_as() -> list[str]:
    """The command prefix that runs the server as a user it accepts (never root)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "duet-pg"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            return ["runuser", "-u", user, "--"]
    subprocess.run(["useradd", "--system", "--no-create-home", "duet-pg"], check=True)
    return ["runuser", "-u", "duet-pg", "--"]


class PostgresServer:
    """initdb + pg_ctl start on enter; pg_ctl stop and rm -rf on exit."""

    def __init__(self, durable: bool = False) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin): "
                                    "apt-get install postgresql")
        self.durable = durable  # False: fsync off, as tests need no crash safety
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="duet-pg-"))
        self.run_as = _run_as()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def _pg(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([*self.run_as, *args], check=True, capture_output=True,
                              text=True, **kwargs)

    def __enter__(self) -> PostgresServer:
        if self.run_as:
            shutil.chown(self.folder, user=self.run_as[2])
        data = self.folder / "data"
        self._pg(str(self.bin / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust",
                 "-E", "UTF8", "--no-sync", "--locale=C")
        self.start()
        return self

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (`immediate`: as a crash would; `fast`: as an administrator)."""
        self._pg(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", mode, "-w",
                 "stop")

    def start(self) -> None:
        data = self.folder / "data"
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300")
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            self._pg(str(self.bin / "pg_ctl"), "-D", str(data), "-o", options,
                     "-l", str(self.folder / "server.log"), "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as exc:
            log = self.folder / "server.log"
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n"
                               + (log.read_text() if log.exists() else "")) from None

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m",
                     "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def create_database(self, **settings: str) -> str:
        """A new empty database, with these settings for every session on it (e.g.
        synchronous_commit="off"); returns its name."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"create database {name}")
            for key, value in settings.items():
                conn.execute(f"alter database {name} set {key} = {value}")
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if postgres_bin() is None:
        if os.environ.get("DUET_REQUIRE_POSTGRES"):  # CI: never skip them
            pytest.fail("PostgreSQL is not installed and DUET_REQUIRE_POSTGRES is set")
        pytest.skip("PostgreSQL is not installed: `apt-get install postgresql` "
                    "(make test and .ci/run install it)")
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request, tmp_path) -> str:
    """What Store() opens: a SQLite file, or a fresh PostgreSQL database (both, in turn)."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "duet.db")
    return request.getfixturevalue("postgres_url")
