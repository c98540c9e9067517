"""Data access: `Store`, the service's only way to read and write its database.

Every method runs its own transaction. Job status changes only through `Store.transition`, a
compare-and-set on the current status that writes an `events` row (time + reason) in the same
transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from service.job_status import KINDS, LEGAL_TRANSITIONS, QUEUED, RUNNING, STATUSES, TERMINAL
from service.store.engine import WalCheckpointer, make_engine
from service.store.rows import (
    TOKEN_ID_LENGTH,
    EventRow,
    IdempotencyConflict,
    IllegalTransition,
    JobRow,
    NewJob,
    TokenInfo,
    hash_token,
    new_job_id,
)
from service.store.schema import MIGRATIONS, events, jobs, owners, schema_migrations, tokens

# Statements built once: their values travel as parameters, so SQLAlchemy compiles each once
# (building `.values(**row)` per call made a new statement and cache key for every job).
_INSERT_JOB = jobs.insert()
_INSERT_JOBS_RETURNING = jobs.insert().returning(jobs.c.id, jobs.c.seq)
_INSERT_EVENT = events.insert()

JobOutcome = tuple[JobRow, bool] | Exception
"""What recording one new job gave: (the job, whether it was created), or the error."""


class Store:
    """Data access for the service. Thread-safe: every method runs its own transaction."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock
        # SQLite has one writer at a time; waiting on a lock here instead of in SQLite's busy
        # handler (which sleeps in growing steps) keeps the write latency tail short.
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else None
        self._checkpointer: WalCheckpointer | None = None

    @classmethod
    def from_url(cls, database_url: str) -> Store:
        return cls(make_engine(database_url))

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    def _read(self):
        return self.engine.connect().execution_options(readonly=True)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()

    def start_checkpointer(self, interval_s: float = 1.0) -> None:
        """SQLite: checkpoint the WAL in a thread of its own (store/engine.py); no-op for
        other databases."""
        if self._write_lock is None or self._checkpointer is not None:
            return
        self._checkpointer = WalCheckpointer(self.engine, self._write_lock, interval_s)
        self._checkpointer.start()

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
        refuses a revoked token within `TokenCache.ttl_s` (service/api/deps.py)."""
        hashes = list(token_hashes)
        if not hashes:
            return 0
        with self._write() as conn:
            return conn.execute(
                tokens.update()
                .where(tokens.c.token_hash.in_(hashes), tokens.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            ).rowcount

    # -- recording jobs -----------------------------------------------------------------------

    def create_jobs(self, batch: list[NewJob]) -> list[JobOutcome]:
        """Insert queued jobs in one transaction (a group commit); per job, (job, created) or
        the exception that recording it alone raises.

        With an idempotency key already used by this owner, a job is the existing one and
        created=False when the body is the same, IdempotencyConflict otherwise; the unique
        constraint on (owner, key) makes concurrent requests create exactly one job. When the
        batch breaks a constraint (a key used before, or twice in the batch), none of it is
        kept and every job is recorded on its own, so the outcome is the same as one request
        at a time. Any other error fails the whole batch (nothing of it is committed) and is
        raised.
        """
        prepared = [self._job_values(job) for job in batch]
        rows = [values for values, _ in prepared]
        try:
            with self._write() as conn:
                seqs = dict(conn.execute(_INSERT_JOBS_RETURNING, rows).all())
                conn.execute(_INSERT_EVENT, [_submitted_event(values) for values in rows])
        except sa.exc.IntegrityError:
            outcomes: list[JobOutcome] = []
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

    # -- reading jobs -------------------------------------------------------------------------

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

    # -- moving jobs --------------------------------------------------------------------------

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

    def touch(self, job_id: str, reason: str, *, expect: str | Iterable[str] | None = None) -> None:
        """Update the status reason without a transition (e.g. why a queued job waits), only
        while the job is in one of the `expect` statuses (the one the caller saw; default: any
        status but a terminal one). A compare-and-set like `transition`: a job cancelled (or
        moved on) after the caller read it keeps the reason of its new status."""
        if expect is None:
            allowed = _NOT_TERMINAL
        else:
            allowed = {expect} if isinstance(expect, str) else set(expect)
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status.in_(sorted(allowed)),
                    jobs.c.status_reason.is_distinct_from(reason),
                )
                .values(status_reason=reason, updated_at=self.clock())
            )


_NOT_TERMINAL = frozenset(STATUSES) - TERMINAL


def _submitted_event(job_values: dict[str, Any]) -> dict[str, Any]:
    return dict(
        job_id=job_values["id"],
        from_status=None,
        to_status=QUEUED,
        reason="submitted",
        at=job_values["created_at"],
    )
