"""The store (service/store/): schema migrations, the job state machine, idempotency keys and
hashed tokens, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from service.job_status import (
    CANCELLED,
    LAUNCHING,
    LEGAL_TRANSITIONS,
    QUEUED,
    STATUSES,
    TERMINAL,
)
from service.store import IdempotencyConflict, IllegalTransition, NewJob, Store
from service.store.engine import WAL_AUTOCHECKPOINT_PAGES
from service.store.schema import MIGRATIONS, jobs, schema_migrations, tokens


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'topk.db'}"
    store = Store.from_url(url)
    store.migrate()
    yield store
    store.close()


def new_job(store: Store, owner_id: int, key: str | None = None, spec: dict | None = None):
    """(job, created) for one submission, as the API records it (a batch of one); raises what
    recording it raised."""
    (outcome,) = store.create_jobs([a_job(owner_id, key, spec=spec or {"epochs": 1})])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def owner(store: Store, name: str) -> int:
    """A fresh owner (the session's Postgres database is shared with other test modules)."""
    return store.owner_for_token(store.create_token(f"{name}-{secrets.token_hex(4)}"))[0]


def test_migrations_are_recorded_and_idempotent(store):
    assert store.schema_version() == len(MIGRATIONS)
    assert store.migrate() == len(MIGRATIONS)
    with store.engine.connect() as conn:
        versions = conn.execute(sa.select(schema_migrations.c.version)).scalars().all()
    assert versions == [version for version, _, _ in MIGRATIONS]


def test_tokens_are_stored_as_sha256_only(store):
    token = store.create_token("tess")
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(tokens.c.token_hash)).scalars().all()
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert token not in stored
    assert store.owner_for_token(token)[1] == "tess"
    assert store.owner_for_token(token + "x") is None
    assert store.owner_for_token(store.create_token("tess"))[0] == store.owner_for_token(token)[0]


def test_every_transition_follows_the_state_machine(store):
    owner_id = owner(store, "alice")
    for source, targets in LEGAL_TRANSITIONS.items():
        for target in STATUSES:
            job, _ = new_job(store, owner_id)
            with store.engine.begin() as conn:  # put the job in `source` directly
                conn.execute(jobs.update().where(jobs.c.id == job.id).values(status=source))
            if target in targets:
                moved = store.transition(job.id, target, "test", expect=source)
                assert moved is not None and moved.status == target
                assert store.events_for(job.id)[-1].to_status == target
                if target in TERMINAL:
                    assert moved.finished_at is not None
            else:
                with pytest.raises(IllegalTransition):
                    store.transition(job.id, target, "test", expect=source)


def test_transition_is_a_compare_and_set(store):
    owner_id = owner(store, "alice")
    job, _ = new_job(store, owner_id)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda _: store.transition(job.id, LAUNCHING, "race", expect=QUEUED), range(8)
        ))  # fmt: skip
    assert sum(result is not None for result in results) == 1
    assert [e.to_status for e in store.events_for(job.id)] == ["queued", "launching"]
    assert store.transition(job.id, CANCELLED, "late", expect=QUEUED) is None


def test_idempotency_keys_are_per_owner_and_bind_the_body(store):
    alice, bob = owner(store, "alice"), owner(store, "bob")
    first, created = new_job(store, alice, key="k")
    again, created_again = new_job(store, alice, key="k")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        new_job(store, alice, key="k", spec={"epochs": 2})
    assert new_job(store, bob, key="k")[0].id != first.id
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: new_job(store, alice, key="burst"), range(16)))
    assert len({job.id for job, _ in made}) == 1
    assert sum(created for _, created in made) == 1


def test_listing_orders_and_pages(store):
    owner_id = owner(store, "alice")
    ids = [new_job(store, owner_id)[0].id for _ in range(5)]
    newest = store.list_jobs(owner_id=owner_id, limit=2)
    assert [job.id for job in newest] == ids[::-1][:2]
    older = store.list_jobs(owner_id=owner_id, before_seq=newest[-1].seq, limit=10)
    assert [job.id for job in older][:3] == ids[::-1][2:5]
    queue = store.list_jobs(statuses=(QUEUED,), oldest_first=True, limit=100)
    positions = [job.id for job in queue if job.id in ids]
    assert positions == ids
    assert store.count_by_status()[QUEUED] >= 5


def a_job(
    owner_id: int, key: str | None = None, epochs: int = 1, spec: dict | None = None
) -> NewJob:
    return NewJob(
        kind="train", owner_id=owner_id, spec=spec or {"epochs": epochs},
        storage_root="/tmp/runs", requested_cpus=1.0, requested_gpus=0.0, idempotency_key=key,
    )  # fmt: skip


def test_a_batch_of_jobs_is_committed_in_one_transaction(store):
    owner_id = owner(store, "alice")
    outcomes = store.create_jobs([a_job(owner_id, epochs=n) for n in range(1, 6)])
    assert all(created for _, created in outcomes)
    made = [job for job, _ in outcomes]
    for job, epochs in zip(made, range(1, 6), strict=True):
        stored = store.get_job(job.id)
        assert stored == job  # seq included
        assert stored.spec == {"epochs": epochs} and stored.status == QUEUED
        assert [e.reason for e in store.events_for(job.id)] == ["submitted"]
    assert len({job.seq for job in made}) == 5


def test_a_batch_breaking_an_idempotency_key_answers_each_job_as_alone(store):
    alice = owner(store, "alice")
    first, _ = new_job(store, alice, key="used")
    outcomes = store.create_jobs(
        [
            a_job(alice),
            a_job(alice, key="used"),  # the same body: the existing job
            a_job(alice, key="used", epochs=2),  # another body: a conflict
            a_job(alice, key="twice"),  # twice in the batch: one job
            a_job(alice, key="twice"),
        ]
    )
    plain, same, conflict, twice_1, twice_2 = outcomes
    assert plain[1] and store.get_job(plain[0].id) is not None
    assert same == (store.get_job(first.id), False)
    assert isinstance(conflict, IdempotencyConflict) and conflict.job_id == first.id
    assert twice_1[1] and twice_2 == (twice_1[0], False)
    assert store.get_job_by_key(alice, "twice").id == twice_1[0].id


def test_the_checkpointer_keeps_the_sqlite_wal_short_under_steady_writes(tmp_path):
    # Writers no longer checkpoint before WAL_AUTOCHECKPOINT_PAGES: without the checkpointer
    # (and its pass with writers held) the WAL would grow to that size under steady writes.
    store = Store.from_url(f"sqlite:///{tmp_path / 'topk.db'}")
    store.migrate()
    alice = owner(store, "alice")
    store.start_checkpointer(interval_s=0.05)
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            store.create_jobs([a_job(alice) for _ in range(20)])
            # The server's writer waits for requests between batches; a loop that takes the
            # write lock back at once could keep the checkpointer's held pass out for seconds
            # on a loaded machine (the lock is not fair), which no server does.
            time.sleep(0.002)
        wal_pages = (tmp_path / "topk.db-wal").stat().st_size / 4096
        assert wal_pages < WAL_AUTOCHECKPOINT_PAGES / 2, wal_pages
    finally:
        store.close()
    assert not store._checkpointer.is_alive()


def test_touch_never_overwrites_the_reason_of_a_job_that_moved_on(store):
    """The reconciler reads a job, then notes why it waits; a cancel in between wins: the
    cancelled job keeps "cancelled by ..." (the note is a compare-and-set on the status)."""
    owner_id = owner(store, "alice")
    job, _ = new_job(store, owner_id)
    store.touch(job.id, "waiting: 1 job ahead", expect=QUEUED)
    assert store.get_job(job.id).status_reason == "waiting: 1 job ahead"
    store.transition(job.id, LAUNCHING, "launching", expect=QUEUED)
    store.transition(job.id, CANCELLED, "cancelled by alice", expect=LAUNCHING)
    store.touch(job.id, "Ray job x is pending", expect=LAUNCHING)  # read before the cancel
    store.touch(job.id, "reconciler error, will retry")  # default: non-terminal jobs only
    assert store.get_job(job.id).status_reason == "cancelled by alice"
    other, _ = new_job(store, owner_id)
    store.touch(other.id, "submitted to Ray", expect=LAUNCHING)  # it is still queued
    assert store.get_job(other.id).status_reason == other.status_reason != "submitted to Ray"
