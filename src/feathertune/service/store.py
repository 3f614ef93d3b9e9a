"""The service's state behind one small class: SQLite (embedded default) or PostgreSQL.

    Store.open("sqlite:///data/state.db")          one machine: WAL, one connection per thread
    Store.open("postgresql://user@host/db")         several `feathertune serve --worker` processes

Rows are plain dicts (JSON columns decoded). Every write that decides something (a job claimed, a
status changed) is a compare-and-set inside a transaction, so two workers never take one job and a
cancel never races a finish. Claiming is `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL and
`BEGIN IMMEDIATE` (one writer at a time) on SQLite.

A job whose worker died is claimed again: by any worker once its heartbeat is older than the lease,
and at once by a worker on the same host that sees the dead worker's process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from feathertune.service.paths import new_id

SCHEMA = Path(__file__).with_name("schema.sql")
JSON_COLUMNS = {"metadata", "method", "options", "error", "result_files", "data", "metrics"}
TABLES = ("files", "jobs", "events", "checkpoints", "models")
TERMINAL = ("succeeded", "failed", "cancelled")


def schema_versions() -> list[tuple[int, str]]:
    """(version, SQL) of every section of schema.sql, in order."""
    parts = re.split(r"^-- version (\d+)\s*$", SCHEMA.read_text(), flags=re.M)
    return [(int(parts[i]), parts[i + 1]) for i in range(1, len(parts), 2)]


class Store:
    """Files, jobs, events, checkpoints and models of one service (see schema.sql)."""

    def __init__(self, backend: _Backend):
        self._db = backend
        self._migrate()

    @classmethod
    def open(cls, url: str) -> Store:
        """`sqlite:///path/state.db` or `postgresql://...` (psycopg 3)."""
        if url.startswith("sqlite:///"):
            return cls(_Sqlite(url[len("sqlite:///"):]))
        if url.startswith(("postgresql://", "postgres://")):
            return cls(_Postgres(url))
        raise ValueError(f"database url {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")

    @property
    def kind(self) -> str:
        return self._db.kind

    def close(self) -> None:
        self._db.close()

    # -- schema -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._db.transaction() as db:
            if self._db.migration_lock:  # SQLite's BEGIN IMMEDIATE already lets one in at a time
                db.all(self._db.migration_lock)
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.one("SELECT MAX(version) AS v FROM schema_version")
            current = (row or {}).get("v") or 0
            for version, sql in schema_versions():
                if version > current:
                    for statement in _statements(sql):
                        db.execute(statement)
                    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def version(self) -> int:
        return self._db.one("SELECT MAX(version) AS v FROM schema_version")["v"]

    # -- generic rows -------------------------------------------------------------------------
    def insert(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        """Add a row (created_ns / created_at filled in when absent); returns it as stored."""
        assert table in TABLES, table
        row = dict(row)
        now = time.time_ns()
        row.setdefault("created_ns", now)
        row.setdefault("created_at", now // 1_000_000_000)
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._db.transaction() as db:
            db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(_encode(k, v) for k, v in row.items()))
        return row

    def get(self, table: str, row_id: str) -> dict[str, Any] | None:
        assert table in TABLES, table
        return _decoded(self._db.one(f"SELECT * FROM {table} WHERE id = ?", (row_id,)))

    def page(self, table: str, *, after: str | None = None, limit: int = 20, where: dict[str, Any] | None = None,
             newest_first: bool = True) -> tuple[list[dict[str, Any]], bool]:
        """One page of rows, OpenAI style: those past the row `after` (by creation), at most `limit`;
        and whether more follow (`has_more`). An unknown `after` gives an empty page."""
        assert table in TABLES, table
        clauses, params = [], []
        for key, value in (where or {}).items():
            clauses.append(f"{key} = ?")
            params.append(value)
        if after is not None:
            anchor = self._db.one(f"SELECT created_ns, id FROM {table} WHERE id = ?", (after,))
            if anchor is None:
                return [], False
            op = "<" if newest_first else ">"
            clauses.append(f"(created_ns {op} ? OR (created_ns = ? AND id {op} ?))")
            params += [anchor["created_ns"], anchor["created_ns"], anchor["id"]]
        order = "DESC" if newest_first else "ASC"
        sql = (f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
               + f" ORDER BY created_ns {order}, id {order} LIMIT ?")
        rows = self._db.all(sql, (*params, limit + 1))
        return [_decoded(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, table: str, row_id: str) -> bool:
        assert table in TABLES, table
        with self._db.transaction() as db:
            return db.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,)) > 0

    def all(self, table: str, **where: Any) -> list[dict[str, Any]]:
        rows, _ = self.page(table, where=where, limit=1_000_000, newest_first=False)
        return rows

    # -- jobs -----------------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None) -> None:
        """A job's event, as its events route lists them (level info/warn/error, type message/metrics)."""
        self.insert("events", {"id": new_id("ftevent"), "job_id": job_id, "level": level, "message": message,
                               "type": type, "data": data})

    def update_job(self, job_id: str, *, when_status: tuple[str, ...] | None = None,
                   when_worker: str | None = None, **fields: Any) -> bool:
        """Set `fields` of a job, only if its status is one of `when_status` (and, if given, it is
        held by `when_worker`). Returns whether the row changed: the compare-and-set every state
        change goes through."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql, params = f"UPDATE jobs SET {sets} WHERE id = ?", [*(_encode(k, v) for k, v in fields.items()), job_id]
        if when_status is not None:
            sql += f" AND status IN ({', '.join('?' for _ in when_status)})"
            params += list(when_status)
        if when_worker is not None:
            sql += " AND worker = ?"
            params.append(when_worker)
        with self._db.transaction() as db:
            return db.execute(sql, tuple(params)) > 0

    def claim_job(self, worker: str, lease_s: float) -> dict[str, Any] | None:
        """Take the oldest job that waits for a worker: its files to validate, or queued, or held
        by a worker that died. A queued job becomes running; all are held by `worker`. None when
        there is none. Never gives one job to two workers."""
        now = time.time()
        with self._db.transaction() as db:
            rows = db.all("SELECT id, status, worker, heartbeat_at FROM jobs "
                          "WHERE status IN ('validating_files', 'queued', 'running') ORDER BY created_ns"
                          + self._db.skip_locked)
            for row in rows:
                held = row["status"] != "queued" and row["worker"] is not None
                if held and not _worker_gone(row["worker"], row["heartbeat_at"], now, lease_s):
                    continue
                status = "validating_files" if row["status"] == "validating_files" else "running"
                db.execute("UPDATE jobs SET status = ?, worker = ?, heartbeat_at = ? WHERE id = ?",
                           (status, worker, now, row["id"]))
                return self.get_in(db, row["id"])
        return None

    def get_in(self, db, job_id: str) -> dict[str, Any] | None:
        return _decoded(db.one("SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def heartbeat(self, job_id: str, worker: str) -> dict[str, Any] | None:
        """Say `worker` still runs the job; returns the job (None if another worker has it now)."""
        if not self.update_job(job_id, when_worker=worker, heartbeat_at=time.time()):
            return None
        return self.get("jobs", job_id)


def worker_name() -> str:
    """host:pid:token — the host and pid let a worker on the same machine see that it died."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def _worker_gone(worker: str | None, heartbeat_at: float | None, now: float, lease_s: float) -> bool:
    if worker is None or heartbeat_at is None or now - heartbeat_at > lease_s:
        return True
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # this process: a thread of ours holds it
    return not _process_alive(int(pid))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) still answers kill(0).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _statements(sql: str) -> list[str]:
    text = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
    return [s.strip() for s in text.split(";") if s.strip()]


def _encode(key: str, value: Any) -> Any:
    return json.dumps(value) if key in JSON_COLUMNS and value is not None else value


def _decoded(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: (json.loads(v) if k in JSON_COLUMNS and isinstance(v, str) else v) for k, v in row.items()}


# -- backends: a connection per thread, `?` placeholders, transactions -------------------------
class _Backend:
    kind = ""
    skip_locked = ""
    migration_lock = ""  # a statement that makes concurrent starts migrate one at a time

    def __init__(self):
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def all(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return self._run(self._connection(), sql, params, True)

    def one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all.clear()
        self._local = threading.local()


class _Cursor:
    """What a transaction's body sees: execute (returns the row count), one, all."""

    def __init__(self, run):
        self._run = run

    def execute(self, sql: str, params: tuple = ()) -> int:
        return self._run(sql, params, fetch=False)

    def all(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return self._run(sql, params, fetch=True)

    def one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None


class _Sqlite(_Backend):
    kind = "sqlite"

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _run(self, conn, sql, params, fetch):
        cursor = conn.execute(sql, params)
        return [dict(r) for r in cursor.fetchall()] if fetch else cursor.rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock later
        try:
            yield _Cursor(lambda sql, params, fetch: self._run(conn, sql, params, fetch))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class _Postgres(_Backend):
    kind = "postgresql"
    skip_locked = " FOR UPDATE SKIP LOCKED"  # a row another worker is claiming is passed over
    migration_lock = "SELECT pg_advisory_xact_lock(7466)"  # held to the end of the transaction

    def __init__(self, url: str):
        super().__init__()
        import importlib.util

        if importlib.util.find_spec("psycopg") is None:  # say so now, with the url, not at the first query
            raise ValueError(f"{url}: PostgreSQL needs psycopg 3 (pip install 'psycopg[binary]')")
        self.url = url

    def _connect(self):
        import psycopg
        from psycopg.rows import dict_row

        return psycopg.connect(self.url, row_factory=dict_row, autocommit=True)

    def _connection(self):
        # A connection the server dropped (a restart, a failover) stays closed: the call that found
        # it so has failed; the next one connects again, or a worker would never claim again.
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.closed:
            self._local.conn = None
            with self._lock:
                self._all.remove(conn)
        return super()._connection()

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _run(self, conn, sql, params, fetch):
        with conn.cursor() as cursor:
            cursor.execute(self._sql(sql), params)
            return [dict(r) for r in cursor.fetchall()] if fetch else cursor.rowcount

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        conn = self._connection()
        with conn.transaction():
            yield _Cursor(lambda sql, params, fetch: self._run(conn, sql, params, fetch))
