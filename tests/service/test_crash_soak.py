"""Crash soak: submissions from several clients while `topk serve` is killed with -9 at random
points and its embedded Ray head once, then restarted.

Invariants: every acknowledged job exists once (one row per idempotency key); each attempt's
submission started a driver at most once across every head that ever ran, and no job ran more
attempts than it needed; no job is stuck; every process and temp folder is gone at the end.
Real processes: `topk serve`, its Ray head, the fake job as the Ray job, real HTTP, SQLite.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from service_harness import driver_starts, tiny_spec, token_for

from service.local_ray import pids_naming

CLIENTS = 4
SUBMISSIONS = 200
REPEATS = 2  # each key is sent twice (a client that lost the answer sends it again): 100 jobs
JOBS = SUBMISSIONS // REPEATS
SERVER_KILLS = 5
TIME_LIMIT_S = 180.0  # for the clients to have every submission acknowledged
# Then the jobs drain through Ray; on 2 busy cores 100 driver starts can take minutes, so a job
# counts as stuck when no job has changed status for STALL_S while some are not finished (and
# DRAIN_LIMIT_S bounds the wait).
STALL_S = 90.0
DRAIN_LIMIT_S = 450.0  # with TIME_LIMIT_S, well inside pytest's 900 s per test


class Client(threading.Thread):
    """Submits its share with idempotency keys, each key REPEATS times in a row; a request
    that got no answer (the server was killed) is retried with the same key until it is
    acknowledged, and every answer for a key must name the same job."""

    def __init__(self, number: int, url: str, token: str, count: int, deadline: float):
        super().__init__(name=f"soak-client-{number}", daemon=True)
        self.number, self.url, self.token = number, url, token
        self.count, self.deadline = count, deadline
        self.acknowledged: dict[str, str] = {}  # idempotency key -> job id
        self.answers = 0
        self.conflicting: list[tuple[str, str, str]] = []
        self.retries = 0
        self.server_errors: list[str] = []

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as http:
            for index in range(self.count):
                key = f"client{self.number}-{index // REPEATS}"
                while time.monotonic() < self.deadline:
                    try:
                        response = http.post(
                            "/v1/jobs",
                            json=tiny_spec("sleep0"),
                            headers={"Idempotency-Key": key},
                        )
                    except httpx.HTTPError:
                        self.retries += 1
                        time.sleep(0.3)
                        continue
                    if response.status_code >= 500:
                        self.server_errors.append(f"{response.status_code} {response.text}")
                        time.sleep(0.3)
                        continue
                    assert response.status_code in (200, 201), response.text
                    job_id = response.json()["id"]
                    if self.acknowledged.setdefault(key, job_id) != job_id:
                        self.conflicting.append((key, self.acknowledged[key], job_id))
                    self.answers += 1
                    break
                time.sleep(random.uniform(0.0, 0.1))


@pytest.mark.slow
def test_crash_soak_no_lost_no_duplicate_no_stuck_no_leak(serve):
    rng = random.Random(20261201)
    started = time.monotonic()
    deadline = started + TIME_LIMIT_S
    server = serve(ray_cpus=12).start()
    token = token_for(server)
    head_dirs = {server.head_state()["temp_dir"]}
    clients = [
        Client(n, server.url, token, SUBMISSIONS // CLIENTS, deadline) for n in range(CLIENTS)
    ]
    for client in clients:
        client.start()

    head_killed = False
    for kill in range(SERVER_KILLS):
        time.sleep(rng.uniform(2.0, 8.0))
        if kill == 2:  # the embedded head, once, while the server runs
            import os
            import signal

            os.killpg(server.head_state()["pid"], signal.SIGKILL)
            head_killed = True
            time.sleep(rng.uniform(2.0, 5.0))
        server.kill()
        server.start()
        head_dirs.add(server.head_state()["temp_dir"])
    assert head_killed
    for client in clients:
        client.join(max(1.0, deadline - time.monotonic()))
    assert not any(client.is_alive() for client in clients), "clients did not finish in time"

    acknowledged = {}
    for client in clients:
        acknowledged.update(client.acknowledged)
        assert client.conflicting == []  # a key always names one job
    assert sum(client.answers for client in clients) == SUBMISSIONS
    assert len(acknowledged) == JOBS

    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as http:

        def all_jobs() -> list[dict]:
            jobs, cursor = [], None
            while True:
                params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
                page = http.get("/v1/jobs", params=params).json()
                jobs += page["items"]
                cursor = page["next_cursor"]
                if not cursor:
                    return jobs

        drain_deadline = time.monotonic() + DRAIN_LIMIT_S
        last_change, last_statuses = time.monotonic(), None
        while True:
            jobs = all_jobs()
            pending = [j for j in jobs if j["status"] not in ("succeeded", "failed", "cancelled")]
            statuses = sorted((j["id"], j["status"]) for j in jobs)
            if statuses != last_statuses:
                last_change, last_statuses = time.monotonic(), statuses
            now = time.monotonic()
            if not pending or now - last_change > STALL_S or now > drain_deadline:
                break
            time.sleep(1.0)
        head_dirs.add(server.head_state()["temp_dir"])
        details = {j["id"]: http.get(f"/v1/jobs/{j['id']}").json() for j in jobs}
    elapsed = time.monotonic() - started

    # Every acknowledged job exists, once: one row per key, and no row without a key.
    assert sorted(j["id"] for j in jobs) == sorted(set(acknowledged.values()))
    assert len(jobs) == JOBS
    # No job stuck, and none failed: a lost attempt is retried.
    assert not pending, [(j["id"], j["status"], j["status_reason"]) for j in pending]
    statuses = Counter(j["status"] for j in jobs)
    assert statuses == {"succeeded": JOBS}, statuses
    # Each attempt's submission started a driver at most once, over all heads; a job's last
    # attempt ran, and its attempts moved on only when the head that ran one died.
    duplicates, reruns = {}, 0
    for job_id, job in details.items():
        starts = driver_starts(server, job_id)
        counted = Counter(starts)
        if any(n > 1 for n in counted.values()):
            duplicates[job_id] = starts
        assert counted[f"{job_id}-{job['attempts']}"] == 1, (job_id, starts, job["events"])
        launches = [e for e in job["events"] if e["to_status"] == "launching"]
        assert len(launches) == job["attempts"]
        reruns += job["attempts"] - 1
        for event in job["events"]:
            assert "vanished" not in event["reason"], (job_id, event)
    assert duplicates == {}
    assert server.terminate() == 0
    # Every process and temp folder of every head is gone.
    for temp_dir in head_dirs:
        assert pids_naming(temp_dir) == [], temp_dir
        assert not Path(temp_dir).exists(), temp_dir
    server_errors = [e for client in clients for e in client.server_errors]
    retries = sum(client.retries for client in clients)
    print(
        f"\ncrash soak: {SUBMISSIONS} submissions acknowledged, {len(jobs)} jobs kept (one per "
        f"key), 0 duplicate starts, "
        f"{reruns} attempts moved on after the head died, {retries} client retries, "
        f"{len(server_errors)} 5xx, {elapsed:.0f}s"
    )
    assert server_errors == []
