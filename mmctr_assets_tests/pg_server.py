"""A throw-away PostgreSQL server for tests: Debian's `postgresql` package (installed by
`make postgres`, part of `make test`), initialised in a temp dir and listening on a free loopback
port, with password (scram) authentication so that wrong credentials are really refused.

PostgreSQL refuses to run as root; CI runs as root, so there the server runs as the `postgres`
user that the Debian package creates (through `runuser`)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "mmctr"
PASSWORD = "mmctr-test-password"


def find_bindir() -> Path:
    """Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    message = ("PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on "
               "PATH: the production-instance tests need them; install them with `sudo apt-get update && "
               "sudo apt-get install -y postgresql` (`make test` does this itself when run as root).")
    if os.environ.get("MMCTR_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{message} MMCTR_REQUIRE_POSTGRES=1 (CI) makes a missing server an error.")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, db: str, user: str | None = None, password: str | None = None) -> str:
        return f"postgresql://{user or self.user}:{password or self.password}@{self.host}:{self.port}/{db}"

    def connect(self, db: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=db)
        conn.autocommit = True
        return conn

    def create_database(self, name: str) -> None:
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')

    def query(self, db: str, sql: str, args: tuple = ()) -> list[tuple]:
        with contextlib.closing(self.connect(db)) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()


@contextlib.contextmanager
def postgres_server():
    """Yield a running PostgresServer; stop it and delete its files afterwards."""
    bindir = find_bindir()
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError(
                "Running as root, and PostgreSQL refuses to run as root, but there is no `postgres` "
                "user to run it as (Debian's postgresql package creates one: `make postgres`)."
            ) from None
        as_user = ["runuser", "-u", "postgres", "--"]
    # not under pytest's tmp_path: that is private to root, and the server runs as `postgres`
    base = Path(tempfile.mkdtemp(prefix="mmctr-pg-"))
    data, pwfile, log = base / "data", base / "pwfile", base / "server.log"
    pwfile.write_text(PASSWORD + "\n")
    if owner:
        os.chown(base, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    port = free_port()

    def run(*args: str) -> None:
        result = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            server_log = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n"
                               f"{result.stdout[-2000:]}{result.stderr[-2000:]}\n{server_log}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} -c fsync=off"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        try:
            yield PostgresServer("127.0.0.1", port, SUPERUSER, PASSWORD)
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)
