"""A real, throwaway PostgreSQL server for the service tests: initdb into a temporary directory,
pg_ctl start on a free loopback port, one database, `pg_ctl stop -m immediate` at the end.

    with postgres_server() as url:      # postgresql://postgres@127.0.0.1:PORT/feathertune
        Store.open(url)

PostgreSQL refuses to run as root: as root the data directory belongs to the `postgres` user and
every server command runs as that user (runuser); as anyone else they run directly. Without
initdb and pg_ctl (on PATH or in /usr/lib/postgresql/*/bin) the tests skip, saying how to install.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from live import free_port

INSTALL = "apt-get install postgresql (Debian/Ubuntu), or put initdb and pg_ctl on PATH"
DATABASE = "feathertune"


def postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned directories
    (newest first), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        if all(os.access(Path(directory) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    return None


def _version(directory: str) -> tuple[int, ...]:
    name = Path(directory).parent.name
    return tuple(int(p) for p in name.split(".") if p.isdigit())


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a PostgreSQL server on 127.0.0.1 and yield the URL of an empty database on it; the
    server is stopped and its files removed afterwards. Skips the test when PostgreSQL is missing."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'psycopg[binary]'")
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL is not installed: {INSTALL} (no initdb/pg_ctl on PATH or in "
                    f"/usr/lib/postgresql/*/bin)")
    as_user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="feathertune-pg-"))  # /tmp itself: postgres can reach it
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if as_user:
        shutil.chown(root, as_user)
        shutil.chown(sockets, as_user)
    started = False
    try:
        _run(as_user, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
             "--locale=C", "--no-sync")
        port = _start(as_user, bin_dir, data, sockets, root / "server.log")
        started = True
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            _run(as_user, bin_dir / "pg_ctl", "-D", data, "stop", "-m", "immediate", "-w", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _server_user() -> str | None:
    """`postgres` when running as root (the server will not run as root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL will not run as root and there is no `postgres` user to run it as: "
                    f"{INSTALL} (it creates the user), or run the tests as a normal user")
    return "postgres"


def _start(as_user: str | None, bin_dir: Path, data: Path, sockets: Path, log: Path, tries: int = 3) -> int:
    """pg_ctl start on a free port (another on a clash); returns the port."""
    for attempt in range(tries):
        port = free_port()
        # fsync off and no checkpoints to speak of: a throwaway server, fast on a busy CI machine.
        options = (f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        done = _run(as_user, bin_dir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60",
                    "start", check=False)
        if done.returncode == 0:
            return port
    raise RuntimeError(f"pg_ctl start failed {tries} times:\n{done.stdout}\n{_tail(log)}")


def _run(as_user: str | None, *command, check: bool = True) -> subprocess.CompletedProcess:
    argv = [str(part) for part in command]
    if as_user:
        argv = ["runuser", "-u", as_user, "--", *argv]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with {done.returncode}:\n{done.stdout}")
    return done


def _tail(log: Path) -> str:
    try:
        return log.read_text()[-3000:]
    except OSError:
        return ""
