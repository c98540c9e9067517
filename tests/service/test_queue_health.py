"""One bad job must not stall the queue, and a failing reconciler must show.

The red team's case: a job whose storage cannot be written was accepted; its spec.json write then
failed on every reconciler pass (218 of them) and every later job of every user stayed queued
while Ray was idle, with /readyz saying ready. Real server, real Ray head, the fake job.
"""

from __future__ import annotations

import shutil

import pytest
from service_harness import client_for, tiny_spec, wait_for

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_status(http, job_id: str, statuses=TERMINAL, timeout: float = 90.0) -> dict:
    def current():
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(current, timeout, message=f"{job_id} to reach {statuses}")


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("https://example.com/runs", "https:// storage is read-only"),
        ("{file}", "is a file, not a folder"),
        ("{file}/runs", "which is a file, not a folder"),
    ],
)
def test_storage_that_cannot_be_written_is_refused_at_submission(
    make_server, tmp_path, storage, message
):
    server, store = make_server(launch_mode="hold")
    server.start()
    token = store.create_token("alice")
    regular_file = tmp_path / "not-a-folder"
    regular_file.write_text("x")
    spec = tiny_spec("x", storage=storage.format(file=regular_file))
    with client_for(server, token) as http:
        response = http.post("/v1/jobs", json=spec)
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert error["field"] == "storage" and message in error["message"], error
        fine = http.post("/v1/jobs", json=tiny_spec("x", storage=str(tmp_path / "new" / "runs")))
        assert fine.status_code == 201, fine.text


def test_a_job_whose_storage_breaks_fails_alone_and_the_queue_moves_on(
    ray_server, ray_head, tmp_path
):
    server, store = ray_server()
    server.start()
    alice, bob = store.create_token("alice"), store.create_token("bob")
    storage = tmp_path / "alice-runs"
    storage.mkdir()
    with client_for(server, alice) as http_a, client_for(server, bob) as http_b:
        # The whole 4-CPU cluster is busy, so the next jobs wait in the queue ...
        blocker = http_b.post("/v1/jobs", json=tiny_spec("sleep4", scaling={"num_workers": 4}))
        wait_status(http_b, blocker.json()["id"], ("running",))
        broken = http_a.post("/v1/jobs", json=tiny_spec("sleep1", storage=str(storage))).json()
        later = http_b.post("/v1/jobs", json=tiny_spec("sleep1")).json()
        assert broken["status"] == later["status"] == "queued"
        # ... while alice's storage turns into a file: her launch can never write spec.json.
        shutil.rmtree(storage)
        storage.write_text("not a folder any more")
        failed = wait_status(http_a, broken["id"])
        done = wait_status(http_b, later["id"])
        assert http_b.get("/readyz").status_code == 200
    assert failed["status"] == "failed" and failed["attempts"] == 0, failed
    assert "cannot write the run folder" in failed["status_reason"]
    assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_a_reconciler_that_keeps_failing_shows_in_readyz_and_metrics(ray_server):
    import sqlalchemy as sa

    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        assert http.get("/readyz").json()["reconciler"] == "ok"
        with store.engine.begin() as conn:  # every pass now fails on the missing table
            conn.execute(sa.text("ALTER TABLE jobs RENAME TO jobs_away"))
        try:
            failing = wait_for(
                lambda: (r := http.get("/readyz")).status_code == 503 and r.json(), 30,
                message="/readyz to report the failing reconciler",
            )  # fmt: skip
            assert "reconciler: failing: " in failing["message"], failing
            assert "passes in a row" in failing["message"]
            metrics = http.get("/metrics").text
            assert _metric(metrics, "topk_reconciler_consecutive_failures") >= 3
            assert _metric(metrics, "topk_reconciler_failed_passes_total") >= 3
            assert _metric(metrics, "topk_database_up") == 0  # the jobs table is gone
        finally:
            with store.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE jobs_away RENAME TO jobs"))
        wait_for(lambda: http.get("/readyz").status_code == 200, 30, message="recovery")
        assert _metric(http.get("/metrics").text, "topk_reconciler_consecutive_failures") == 0
        job = http.post("/v1/jobs", json=tiny_spec("sleep1")).json()
        assert wait_status(http, job["id"])["status"] == "succeeded"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")
