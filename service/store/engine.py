"""Engines: SQLite tuned for one server's write pattern (WAL, immediate write transactions,
checkpoints in a thread of their own), or PostgreSQL by URL."""

from __future__ import annotations

import logging
import threading

import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger("topk.service")

WAL_AUTOCHECKPOINT_PAGES = 10_000
WAL_RESTART_PAGES = 2_000


def make_engine(database_url: str) -> Engine:
    """An engine for SQLite (WAL, busy timeout, immediate write transactions) or PostgreSQL."""
    if not database_url.startswith("sqlite"):
        return sa.create_engine(database_url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    engine = sa.create_engine(
        database_url,
        connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
        pool_size=10,
        max_overflow=20,
    )
    sa.event.listen(engine, "connect", _tune_sqlite_connection)
    sa.event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _tune_sqlite_connection(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL: a commit is in the WAL file when it returns (it survives a crash of this
    # process, not a power loss); only checkpoints fsync.
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A committing writer runs a checkpoint (copy the WAL into the database, fsync it) once the
    # WAL passes this many pages: 10x SQLite's default, as a safety net. A server runs
    # checkpoints in a thread of their own (WalCheckpointer): made by the writer, their fsync
    # stalled every queued submission for tens to hundreds of milliseconds (the submission
    # benchmark's p99).
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _begin_sqlite_transaction(conn) -> None:
    # A deferred transaction that later writes can fail with "database is locked" when another
    # writer got there first; taking the write lock up front makes it wait.
    if conn.get_execution_options().get("readonly"):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def checkpoint(engine: Engine) -> tuple[int, int, int]:
    """One PASSIVE WAL checkpoint of a SQLite engine: (busy, WAL frames, frames checkpointed)."""
    connection = engine.raw_connection()
    try:  # the raw connection is in autocommit mode: a checkpoint cannot run in a transaction
        return tuple(
            connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        )
    finally:
        connection.close()


class WalCheckpointer:
    """Checkpoints a SQLite WAL every `interval_s` in a thread of its own, so writers do not
    wait for a checkpoint's fsync (see `_tune_sqlite_connection`). Checkpoints are PASSIVE
    (they never block readers or writers), except one short pass with `write_lock` held when
    the WAL has grown (see `_run`)."""

    def __init__(self, engine: Engine, write_lock: threading.Lock, interval_s: float = 1.0):
        self.engine, self.write_lock, self.interval_s = engine, write_lock, interval_s
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topk-wal-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._closing.set()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._closing.wait(self.interval_s):
            try:
                _, wal_frames, _ = checkpoint(self.engine)
                if wal_frames >= WAL_RESTART_PAGES:
                    # Under steady writes a passive checkpoint never catches up with the end of
                    # the WAL, and SQLite only starts the WAL over once it has. One more pass
                    # with our writers held catches up: it copies only what was committed
                    # since the pass above (milliseconds), and the next commit restarts the
                    # WAL from its beginning.
                    with self.write_lock:
                        checkpoint(self.engine)
            except Exception as exc:  # the next try may work; writers checkpoint past the limit
                log.warning("WAL checkpoint failed: %s", exc)
