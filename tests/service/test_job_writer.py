"""The job writer: submissions recorded in group commits, each answered with its own outcome
only once its transaction has committed."""

from __future__ import annotations

import asyncio

import pytest

from service.job_status import QUEUED
from service.job_writer import JobWriter, WriterStopped
from service.store import IdempotencyConflict, NewJob, Store


@pytest.fixture
def store(tmp_path):
    store = Store.from_url(f"sqlite:///{tmp_path / 'topk.db'}")
    store.migrate()
    yield store
    store.close()


def submission(owner_id: int, key: str | None = None, epochs: int = 1) -> NewJob:
    return NewJob(
        kind="train", owner_id=owner_id, spec={"epochs": epochs}, storage_root="/tmp/runs",
        requested_cpus=1.0, requested_gpus=0.0, idempotency_key=key,
    )  # fmt: skip


def test_concurrent_submissions_share_transactions_and_are_committed_when_answered(store):
    alice = store.owner_for_token(store.create_token("alice"))[0]
    writer = JobWriter(store)
    writer.start()

    async def submit(n: int):
        job, created = await writer.create(submission(alice, epochs=n))
        # Answered means committed: another connection sees the job already.
        assert store.get_job(job.id) == job
        return job, created

    async def main():
        return await asyncio.gather(*(submit(n) for n in range(1, 201)))

    try:
        outcomes = asyncio.run(main())
    finally:
        writer.stop()
    assert [job.spec["epochs"] for job, _ in outcomes] == list(range(1, 201))
    assert all(created for _, created in outcomes)
    assert writer.jobs == 200 and writer.batches < 200
    assert store.count_by_status()[QUEUED] == 200


def test_each_submission_gets_its_own_outcome(store):
    alice = store.owner_for_token(store.create_token("alice"))[0]
    writer = JobWriter(store)
    writer.start()

    async def main():
        first, _ = await writer.create(submission(alice, key="k"))
        return first, await asyncio.gather(
            writer.create(submission(alice)),
            writer.create(submission(alice, key="k")),
            writer.create(submission(alice, key="k", epochs=2)),
            return_exceptions=True,
        )

    try:
        first, (plain, same, conflict) = asyncio.run(main())
    finally:
        writer.stop()
    assert plain[1] is True and plain[0].id != first.id
    assert same == (first, False)
    assert isinstance(conflict, IdempotencyConflict) and conflict.job_id == first.id


def test_a_stopped_writer_refuses_new_submissions(store):
    alice = store.owner_for_token(store.create_token("alice"))[0]
    writer = JobWriter(store)
    writer.start()
    job, _ = asyncio.run(writer.create(submission(alice)))
    writer.stop()
    assert store.get_job(job.id) is not None
    with pytest.raises(WriterStopped):
        asyncio.run(writer.create(submission(alice)))
