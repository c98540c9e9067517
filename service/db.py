"""The system of record: owners, hashed tokens, jobs and their status history (SQLAlchemy Core).

SQLite (WAL mode, one writer at a time via BEGIN IMMEDIATE) by default, PostgreSQL by URL. The
schema is created and migrated at start (`Store.migrate`), by numbered migrations recorded in
`schema_migrations`.

Job status is a state machine; `Store.transition` is the only way to change it, as a
compare-and-set on the current status, and it writes an `events` row (time + reason) in the same
transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

QUEUED, LAUNCHING, RUNNING = "queued", "launching", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, LAUNCHING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({LAUNCHING, RUNNING})

LEGAL_TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({LAUNCHING, CANCELLED, FAILED}),
    # launching -> queued: the submission failed for an infrastructure reason, retry later;
    # launching -> succeeded/failed: adopted after a restart, the Ray job had already ended.
    LAUNCHING: frozenset({RUNNING, QUEUED, SUCCEEDED, FAILED, CANCELLED}),
    # running -> queued: the attempt died for an infrastructure reason; the next attempt resumes
    # from the run's checkpoints.
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

KINDS = ("train", "sweep")

log = logging.getLogger("topk.service")

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

owners = sa.Table(
    "owners",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("owners.id"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    # seq orders the queue (submission order) and pages the listing.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("kind", sa.String(10), nullable=False),
    sa.Column("owner_id", sa.Integer, sa.ForeignKey("owners.id"), nullable=False),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_reason", sa.Text, nullable=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("spec_hash", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("storage_root", sa.Text, nullable=False),
    sa.Column("requested_cpus", sa.Float, nullable=False),
    sa.Column("requested_gpus", sa.Float, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("submission_id", sa.String(60), nullable=True),
    sa.Column("not_before", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
)
sa.Index("ix_jobs_status_seq", jobs.c.status, jobs.c.seq)
sa.Index("ix_jobs_owner_seq", jobs.c.owner_id, jobs.c.seq)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("from_status", sa.String(16), nullable=True),
    sa.Column("to_status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "owners, tokens, jobs, events", _migration_1),
]


class IllegalTransition(RuntimeError):
    """A status change the state machine forbids (a bug in the caller, not a user error)."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used by this owner with a different body."""

    def __init__(self, job_id: str):
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different body")
        self.job_id = job_id


@dataclass(frozen=True)
class JobRow:
    seq: int
    id: str
    kind: str
    owner_id: int
    name: str | None
    status: str
    status_reason: str | None
    spec: dict
    spec_hash: str
    idempotency_key: str | None
    storage_root: str
    requested_cpus: float
    requested_gpus: float
    attempt: int
    submission_id: str | None
    not_before: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_mapping(cls, row: Any) -> JobRow:
        data = dict(row._mapping)
        data["spec"] = json.loads(data["spec"])
        return cls(**data)


@dataclass(frozen=True)
class EventRow:
    from_status: str | None
    to_status: str
    reason: str
    at: float


TOKEN_ID_LENGTH = 12
"""A token's public id is the start of its sha256 (hex): safe to show, since the token itself
is 256 random bits, and long enough (48 bits) that two tokens of one service never share it."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as `topk token list` shows it: never the token, only its public id."""

    id: str
    owner: str
    created_at: float
    revoked_at: float | None
    token_hash: str


@dataclass(frozen=True)
class NewJob:
    """A validated submission, to be recorded as a queued job."""

    kind: str
    owner_id: int
    spec: dict
    storage_root: str
    requested_cpus: float
    requested_gpus: float
    idempotency_key: str | None = None
    name: str | None = None


# Statements built once: their values travel as parameters, so SQLAlchemy compiles each once
# (building `.values(**row)` per call made a new statement and cache key for every job).
_INSERT_JOB = jobs.insert()
_INSERT_JOBS_RETURNING = jobs.insert().returning(jobs.c.id, jobs.c.seq)
_INSERT_EVENT = events.insert()


def _submitted_event(job_values: dict[str, Any]) -> dict[str, Any]:
    return dict(
        job_id=job_values["id"],
        from_status=None,
        to_status=QUEUED,
        reason="submitted",
        at=job_values["created_at"],
    )


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_job_id(kind: str) -> str:
    """A stable, URL- and shell-safe id: the Ray Train run name and the submission id prefix."""
    return f"{'job' if kind == 'train' else 'sweep'}-{secrets.token_hex(6)}"


WAL_AUTOCHECKPOINT_PAGES = 10_000
WAL_RESTART_PAGES = 2_000


def make_engine(database_url: str) -> Engine:
    """An engine for SQLite (WAL, busy timeout, immediate write transactions) or PostgreSQL."""
    if database_url.startswith("sqlite"):
        engine = sa.create_engine(
            database_url,
            connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
            pool_size=10,
            max_overflow=20,
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit is in the WAL file when it returns (it survives a crash of
            # this process, not a power loss); only checkpoints fsync.
            cursor.execute("PRAGMA synchronous=NORMAL")
            # A committing writer runs a checkpoint (copy the WAL into the database, fsync it)
            # once the WAL passes this many pages: 10x SQLite's default, as a safety net. A
            # server runs checkpoints in a thread of their own (Store.start_checkpointer):
            # made by the writer, their fsync stalled every queued submission for tens to
            # hundreds of milliseconds (the submission benchmark's p99).
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):
            # A deferred transaction that later writes can fail with "database is locked" when
            # another writer got there first; taking the write lock up front makes it wait.
            if conn.get_execution_options().get("readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(database_url, pool_size=10, max_overflow=20, pool_pre_ping=True)


class Store:
    """Data access for the service. Thread-safe: every method runs its own transaction."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock
        # SQLite has one writer at a time; waiting on a lock here instead of in SQLite's busy
        # handler (which sleeps in growing steps) keeps the write latency tail short.
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else None
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @classmethod
    def from_url(cls, database_url: str) -> Store:
        return cls(make_engine(database_url))

    def close(self) -> None:
        self._closing.set()
        if self._checkpointer is not None:
            self._checkpointer.join(10)
        self.engine.dispose()

    def start_checkpointer(self, interval_s: float = 1.0) -> None:
        """SQLite: checkpoint the WAL every `interval_s` in a thread of its own, so writers
        do not wait for a checkpoint's fsync (see make_engine). Checkpoints are PASSIVE (they
        never block readers or writers); see `_checkpoint_loop` for the one short exception.
        No-op for other databases."""
        if self.engine.dialect.name != "sqlite" or self._checkpointer is not None:
            return
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop,
            args=(interval_s,),
            name="topk-wal-checkpoint",
            daemon=True,
        )
        self._checkpointer.start()

    def checkpoint(self) -> tuple[int, int, int]:
        """One PASSIVE WAL checkpoint: (busy, WAL frames, frames checkpointed)."""
        connection = self.engine.raw_connection()
        try:  # the raw connection is in autocommit mode: a checkpoint cannot run in a transaction
            return tuple(
                connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            )
        finally:
            connection.close()

    def _checkpoint_loop(self, interval_s: float) -> None:
        while not self._closing.wait(interval_s):
            try:
                _, wal_frames, _ = self.checkpoint()
                if wal_frames >= WAL_RESTART_PAGES:
                    # Under steady writes a passive checkpoint never catches up with the end of
                    # the WAL, and SQLite only starts the WAL over once it has. One more pass
                    # with our writers held catches up: it copies only what was committed
                    # since the pass above (milliseconds), and the next commit restarts the
                    # WAL from its beginning.
                    with self._write_lock:
                        self.checkpoint()
            except Exception as exc:  # the next try may work; writers checkpoint past the limit
                log.warning("WAL checkpoint failed: %s", exc)

    def _read(self):
        return self.engine.connect().execution_options(readonly=True)

    # -- schema -------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create the schema and apply pending migrations; returns the schema version."""
        with self._write() as conn:
            schema_migrations.create(conn, checkfirst=True)
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                # Two replicas starting together must not both run a migration.
                conn.exec_driver_sql("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
            applied = set(conn.scalars(sa.select(schema_migrations.c.version)))
            for version, description, apply in MIGRATIONS:
                if version in applied:
                    continue
                apply(conn)
                conn.execute(
                    schema_migrations.insert().values(
                        version=version, description=description, applied_at=self.clock()
                    )
                )
        return self.schema_version()

    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.scalar(sa.select(sa.func.max(schema_migrations.c.version))) or 0

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- owners and tokens --------------------------------------------------------------------

    def create_token(self, owner_name: str) -> str:
        """Create the owner if new, and a new bearer token for them; only its sha256 is stored."""
        if not owner_name or len(owner_name) > 200:
            raise ValueError("owner name must be 1 to 200 characters")
        token = "topk_" + secrets.token_urlsafe(32)
        now = self.clock()
        with self._write() as conn:
            owner_id = conn.scalar(sa.select(owners.c.id).where(owners.c.name == owner_name))
            if owner_id is None:
                owner_id = conn.execute(
                    owners.insert().values(name=owner_name, created_at=now)
                ).inserted_primary_key[0]
            conn.execute(
                tokens.insert().values(
                    token_hash=hash_token(token), owner_id=owner_id, created_at=now
                )
            )
        return token

    def owner_for_token(self, token: str) -> tuple[int, str] | None:
        """(owner id, owner name) for a valid, unrevoked token; None otherwise."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(owners.c.id, owners.c.name)
                .join(tokens, tokens.c.owner_id == owners.c.id)
                .where(tokens.c.token_hash == hash_token(token), tokens.c.revoked_at.is_(None))
            ).first()
        return (row.id, row.name) if row else None

    def list_tokens(self) -> list[TokenInfo]:
        """Every token, revoked ones included, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(
                    tokens.c.token_hash, owners.c.name, tokens.c.created_at, tokens.c.revoked_at
                )
                .join(owners, tokens.c.owner_id == owners.c.id)
                .order_by(tokens.c.created_at, tokens.c.token_hash)
            ).all()
        return [
            TokenInfo(
                id=row.token_hash[:TOKEN_ID_LENGTH],
                owner=row.name,
                created_at=row.created_at,
                revoked_at=row.revoked_at,
                token_hash=row.token_hash,
            )
            for row in rows
        ]

    def revoke_tokens(self, token_hashes: Iterable[str]) -> int:
        """Revoke these tokens (by sha256) now; returns how many were live until now. The API
        refuses a revoked token within `TokenCache.ttl_s` (service/app.py)."""
        hashes = list(token_hashes)
        if not hashes:
            return 0
        with self._write() as conn:
            return conn.execute(
                tokens.update()
                .where(tokens.c.token_hash.in_(hashes), tokens.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            ).rowcount

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        kind: str,
        owner_id: int,
        spec: dict,
        storage_root: str,
        requested_cpus: float,
        requested_gpus: float,
        idempotency_key: str | None = None,
        name: str | None = None,
    ) -> tuple[JobRow, bool]:
        """Insert a queued job; returns (job, created).

        With an idempotency key already used by this owner: the existing job and created=False
        when the body is the same, IdempotencyConflict otherwise. The unique constraint on
        (owner, key) makes concurrent requests create exactly one job.
        """
        return self._create_one(
            NewJob(
                kind=kind,
                owner_id=owner_id,
                spec=spec,
                storage_root=storage_root,
                requested_cpus=requested_cpus,
                requested_gpus=requested_gpus,
                idempotency_key=idempotency_key,
                name=name,
            )
        )

    def _create_one(self, job: NewJob) -> tuple[JobRow, bool]:
        values, spec_text = self._job_values(job)
        idempotency_key, owner_id = job.idempotency_key, job.owner_id
        try:
            with self._write() as conn:
                seq = conn.execute(_INSERT_JOB, values).inserted_primary_key[0]
                conn.execute(_INSERT_EVENT, _submitted_event(values))
        except sa.exc.IntegrityError:
            if idempotency_key is None:
                raise
            existing = self.get_job_by_key(owner_id, idempotency_key)
            if existing is None:  # the conflict was something else
                raise
            if existing.spec_hash != values["spec_hash"]:
                raise IdempotencyConflict(existing.id) from None
            return existing, False
        return JobRow(seq=seq, **dict(values, spec=json.loads(spec_text))), True

    def create_jobs(self, batch: list[NewJob]) -> list[tuple[JobRow, bool] | Exception]:
        """Insert queued jobs in one transaction (a group commit); per job, what `create_job`
        would return, or the exception it would raise.

        When the batch breaks a constraint (an Idempotency-Key used before, or twice in the
        batch), none of it is kept and every job goes through `create_job` on its own, so the
        outcome is the same as one request at a time. Any other error fails the whole batch
        (nothing of it is committed) and is raised.
        """
        prepared = [self._job_values(job) for job in batch]
        rows = [values for values, _ in prepared]
        try:
            with self._write() as conn:
                seqs = dict(conn.execute(_INSERT_JOBS_RETURNING, rows).all())
                conn.execute(_INSERT_EVENT, [_submitted_event(values) for values in rows])
        except sa.exc.IntegrityError:
            outcomes: list[tuple[JobRow, bool] | Exception] = []
            for job in batch:
                try:
                    outcomes.append(self._create_one(job))
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes
        return [
            (JobRow(seq=seqs[values["id"]], **dict(values, spec=json.loads(spec_text))), True)
            for values, spec_text in prepared
        ]

    def _job_values(self, job: NewJob) -> tuple[dict[str, Any], str]:
        """The jobs row of a new queued job, and its spec as stored (sorted-key JSON)."""
        if job.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {job.kind!r}")
        spec_text = json.dumps(job.spec, sort_keys=True, separators=(",", ":"))
        now = self.clock()
        values = dict(
            id=new_job_id(job.kind),
            kind=job.kind,
            owner_id=job.owner_id,
            name=job.name,
            status=QUEUED,
            status_reason="waiting to launch",
            spec=spec_text,
            spec_hash=hashlib.sha256(f"{job.kind}:{spec_text}".encode()).hexdigest(),
            idempotency_key=job.idempotency_key,
            storage_root=job.storage_root,
            requested_cpus=job.requested_cpus,
            requested_gpus=job.requested_gpus,
            attempt=0,
            submission_id=None,
            not_before=None,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
        )
        return values, spec_text

    def get_job(self, job_id: str, owner_id: int | None = None) -> JobRow | None:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if owner_id is not None:
            query = query.where(jobs.c.owner_id == owner_id)
        with self._read() as conn:
            row = conn.execute(query).first()
        return JobRow.from_mapping(row) if row else None

    def get_job_by_key(self, owner_id: int, idempotency_key: str) -> JobRow | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(jobs).where(
                    jobs.c.owner_id == owner_id, jobs.c.idempotency_key == idempotency_key
                )
            ).first()
        return JobRow.from_mapping(row) if row else None

    def list_jobs(
        self,
        *,
        kind: str | None = None,
        owner_id: int | None = None,
        statuses: Iterable[str] | None = None,
        before_seq: int | None = None,
        limit: int = 50,
        oldest_first: bool = False,
    ) -> list[JobRow]:
        """Jobs newest first (or oldest first: the queue order), filtered; `before_seq` pages."""
        query = sa.select(jobs)
        if kind is not None:
            query = query.where(jobs.c.kind == kind)
        if owner_id is not None:
            query = query.where(jobs.c.owner_id == owner_id)
        if statuses is not None:
            query = query.where(jobs.c.status.in_(list(statuses)))
        if before_seq is not None:
            query = query.where(jobs.c.seq < before_seq)
        query = query.order_by(jobs.c.seq.asc() if oldest_first else jobs.c.seq.desc())
        query = query.limit(limit)
        with self._read() as conn:
            return [JobRow.from_mapping(row) for row in conn.execute(query)]

    def count_by_status(self) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
            ).all()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({status: count for status, count in rows})
        return counts

    def events_for(self, job_id: str) -> list[EventRow]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(events.c.from_status, events.c.to_status, events.c.reason, events.c.at)
                .where(events.c.job_id == job_id)
                .order_by(events.c.id)
            ).all()
        return [EventRow(*row) for row in rows]

    def transition(
        self,
        job_id: str,
        to_status: str,
        reason: str,
        *,
        expect: str | Iterable[str],
        **fields: Any,
    ) -> JobRow | None:
        """Move a job from one of the `expect` statuses to `to_status`, recording an event.

        Returns the updated job, or None when the job is not in an expected status any more
        (another actor moved it first: the compare-and-set lost). `fields` are other columns
        to set in the same update (attempt, submission_id, not_before, ...).
        Raises IllegalTransition for a change the state machine forbids.
        """
        expected = {expect} if isinstance(expect, str) else set(expect)
        for status in expected:
            if to_status not in LEGAL_TRANSITIONS[status]:
                raise IllegalTransition(f"{status} -> {to_status} is not a legal transition")
        now = self.clock()
        values = dict(fields, status=to_status, status_reason=reason, updated_at=now)
        if to_status == RUNNING:
            values.setdefault("started_at", now)
        if to_status in TERMINAL:
            values["finished_at"] = now
        with self._write() as conn:
            current = conn.scalar(sa.select(jobs.c.status).where(jobs.c.id == job_id))
            if current not in expected:
                return None
            updated = conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == current).values(**values)
            ).rowcount
            if updated != 1:
                return None
            conn.execute(
                events.insert().values(
                    job_id=job_id, from_status=current, to_status=to_status, reason=reason, at=now
                )
            )
        return self.get_job(job_id)

    def touch(self, job_id: str, reason: str) -> None:
        """Update the status reason without a transition (e.g. why a queued job waits)."""
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status_reason.is_distinct_from(reason))
                .values(status_reason=reason, updated_at=self.clock())
            )
