"""The launcher and reconciler against a real local Ray cluster, through the real server.

Jobs run tests/service/fake_job.py in place of `python -m jobs` (TOPK_JOB_PYTHON), which
writes the runtime's files in seconds; the real runtime is exercised in test_end_to_end.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import yaml
from service_harness import FAKE_JOB, REPO, client_for, ray_submissions, tiny_spec, wait_for

from service.local_ray import LocalRayHead, free_port

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_status(http: httpx.Client, job_id: str, statuses=TERMINAL, timeout=90.0) -> dict:
    collection = "sweeps" if job_id.startswith("sweep-") else "jobs"

    def current():
        job = http.get(f"/v1/{collection}/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(current, timeout, message=f"{job_id} to reach {statuses}")


def test_job_runs_on_ray_to_success_with_metrics_and_logs(ray_server, ray_head):
    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        assert http.get("/readyz").json()["ray"] == "ok"
        job = http.post("/v1/jobs", json=tiny_spec("sleep3")).json()
        done = wait_status(http, job["id"])
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1 and done["submission_id"] == f"{job['id']}-1"
        assert [e["to_status"] for e in done["events"]] == [
            "queued", "launching", "running", "succeeded",
        ]  # fmt: skip
        assert done["latest_metrics"]["epoch"] == 3
        assert done["result"]["status"] == "succeeded"
        assert done["dashboard_url"].endswith(f"/#/jobs/{job['id']}-1")
        epochs = http.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2, 3]
        logs = http.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 0}).text
        assert "epoch 3 done" in logs and "fake job done" in logs
        assert http.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 1}).text.count("\n") <= 1
        followed = http.get(f"/v1/jobs/{job['id']}/logs", params={"follow": "true"}).text
        assert followed.count("fake job done") == 1
        assert "topk_launches_total 1.0" in httpx.get(f"{server.url}/metrics").text
    assert ray_submissions(ray_head, job["id"]) == [f"{job['id']}-1"]


def test_queue_launches_in_submission_order_when_resources_free_up(ray_server, ray_head):
    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    three_cpus = {"num_workers": 1, "cpus_per_worker": 3.0}
    with client_for(server, token) as http:
        huge = http.post("/v1/jobs", json=tiny_spec("sleep1", scaling={"num_workers": 8})).json()
        ids = [
            http.post("/v1/jobs", json=tiny_spec("sleep3", scaling=three_cpus)).json()["id"]
            for _ in range(3)
        ]
        wait_status(http, ids[0], ("running",), timeout=60)
        waiting = http.get(f"/v1/jobs/{ids[1]}").json()
        assert waiting["status"] == "queued"
        assert "waiting for resources" in waiting["status_reason"]
        finished = [wait_status(http, job_id, timeout=120) for job_id in ids]
        assert all(job["status"] == "succeeded" for job in finished)
        starts = [job["started_at"] for job in finished]
        ends = [job["finished_at"] for job in finished]
        assert starts == sorted(starts)
        # never two at once: 3 + 3 CPUs do not fit a 4-CPU cluster
        assert starts[1] >= ends[0] and starts[2] >= ends[1]
        # the job larger than the cluster waits without blocking the others
        big = http.get(f"/v1/jobs/{huge['id']}").json()
        assert big["status"] == "queued" and "cluster to grow" in big["status_reason"]
        assert http.post(f"/v1/jobs/{huge['id']}/cancel").json()["status"] == "cancelled"
    assert ray_submissions(ray_head, huge["id"]) == []


def test_infrastructure_failure_is_retried_and_user_failure_is_not(ray_server, ray_head):
    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        flaky = http.post("/v1/jobs", json=tiny_spec("flaky")).json()
        broken = http.post("/v1/jobs", json=tiny_spec("userfail")).json()
        flaky_done, broken_done = wait_status(http, flaky["id"]), wait_status(http, broken["id"])
    assert flaky_done["status"] == "succeeded" and flaky_done["attempts"] == 2
    reasons = [e["reason"] for e in flaky_done["events"] if e["to_status"] == "queued"]
    assert any("attempt 1 failed" in reason and "retrying" in reason for reason in reasons)
    assert ray_submissions(ray_head, flaky["id"]) == [f"{flaky['id']}-1", f"{flaky['id']}-2"]
    assert broken_done["status"] == "failed" and broken_done["attempts"] == 1
    assert "no shards found" in broken_done["failure_reason"]


def test_cancel_stops_the_ray_job_and_keeps_the_run_folder(ray_server, ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep60")).json()
        running = wait_status(http, job["id"], ("running",))
        wait_for(lambda: http.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"], 30)
        cancelled = http.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.auth_headers)
    wait_for(
        lambda: str(client.get_job_status(running["submission_id"]).value) == "STOPPED",
        30, message="the Ray job to stop",
    )  # fmt: skip
    run_dir = tmp_path / "data0" / "runs" / job["id"]
    assert (run_dir / "spec.json").exists() and (run_dir / "metrics.jsonl").exists()


def test_sweep_through_the_api_reports_trials_and_best_config(ray_server):
    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    sweep = {"train": tiny_spec("sleep1"), "search": {"optim.lr": {"grid": [0.1, 0.01]}},
             "scheduler": {"name": "fifo"}}  # fmt: skip
    with client_for(server, token) as http:
        created = http.post("/v1/sweeps", json=sweep).json()
        done = wait_status(http, created["id"])
    assert done["status"] == "succeeded"
    assert [t["params"] for t in done["trials"]] == [{"optim.lr": 0.1}, {"optim.lr": 0.01}]
    assert done["best_params"] == {"optim.lr": 0.01}
    assert done["best_config"]["name"] == "sleep1"


def test_restart_while_running_adopts_the_job(ray_server, ray_head):
    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep6")).json()
        wait_status(http, job["id"], ("running",))
    server.kill()
    server.start()
    with client_for(server, token) as http:
        done = wait_status(http, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert ray_submissions(ray_head, job["id"]) == [f"{job['id']}-1"]


@pytest.mark.parametrize(
    "step", ["after_insert", "after_spec_write", "after_launching_recorded", "after_submit"]
)
def test_kill9_at_each_submit_step_loses_nothing_and_launches_once(ray_server, ray_head, step):
    server, store = ray_server()
    server.start(extra_env={"TOPK_TEST_CRASH_AT": step})
    token = store.create_token("alice")
    key = {"Idempotency-Key": f"crash-{step}"}
    acknowledged = None
    with client_for(server, token) as http:
        try:
            response = http.post("/v1/jobs", json=tiny_spec("sleep1"), headers=key)
            assert response.status_code == 201
            acknowledged = response.json()["id"]
        except httpx.HTTPError:
            assert step == "after_insert"  # died before answering: the client retries
    assert server.wait_exit(60) == 137, server.log()
    server.start()  # no crash point this time
    with client_for(server, token) as http:
        retry = http.post("/v1/jobs", json=tiny_spec("sleep1"), headers=key)
        assert retry.status_code == 200, retry.text  # the same job, not a new one
        job_id = retry.json()["id"]
        assert acknowledged in (None, job_id)
        done = wait_status(http, job_id)
        assert len(http.get("/v1/jobs").json()["items"]) == 1
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert ray_submissions(ray_head, job_id) == [f"{job_id}-1"]
    launches = [e for e in done["events"] if e["to_status"] == "launching"]
    assert len(launches) == 1


def test_postgres_backend_runs_jobs_too(ray_server, postgres_url):
    import sqlalchemy as sa

    server, store = ray_server(postgres_url)
    with store.engine.begin() as conn:  # the session database is shared with the API tests
        conn.execute(sa.text("DELETE FROM events"))
        conn.execute(sa.text("DELETE FROM jobs"))
    server.start()
    token = store.create_token("carol")
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep1")).json()
        assert wait_status(http, job["id"])["status"] == "succeeded"


def topk_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_command_line_against_the_server(ray_server, tmp_path):
    server, _ = ray_server()
    server.start()
    created = topk_cli("token", "create", "dana", env={"TOPK_DATA_DIR": str(tmp_path / "data0")})
    assert created.returncode == 0, created.stderr
    env = {"TOPK_URL": server.url, "TOPK_TOKEN": created.stdout.split()[-1]}

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec("sleep1")))
    submitted = topk_cli("submit", str(spec_file), "--wait", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[1]
    assert "succeeded" in submitted.stdout and "epoch 1" in submitted.stdout
    logs = topk_cli("logs", job_id, env=env)
    assert logs.returncode == 0 and "fake job done" in logs.stdout

    spec_file.write_text(yaml.safe_dump(tiny_spec("sleep60")))
    long_job = topk_cli("submit", str(spec_file), env=env).stdout.split()[1]
    cancelled = topk_cli("cancel", long_job, env=env)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"{long_job}: cancelled"
    shown = topk_cli("status", long_job, env=env)
    assert "cancelled" in shown.stdout and "cancelled by dana" in shown.stdout
    table = topk_cli("status", env=env)
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "KIND", "STATUS"]
    assert job_id in table.stdout and long_job in table.stdout

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"train": tiny_spec("sleep1"),
                                          "search": {"optim.lr": {"grid": [0.1, 0.01]}},
                                          "scheduler": {"name": "fifo"}}))  # fmt: skip
    sweep = topk_cli("submit", str(sweep_file), env=env)
    assert sweep.returncode == 0 and sweep.stdout.split()[1].startswith("sweep-"), sweep.stderr

    spec_file.write_text(yaml.safe_dump(tiny_spec(loss={"name": "noised_topk", "k": 50})))
    invalid = topk_cli("submit", str(spec_file), env=env)
    assert invalid.returncode == 3 and "loss.k" in invalid.stderr  # an invalid spec
    assert "Traceback" not in invalid.stderr
    missing = topk_cli("submit", str(tmp_path / "nope.yaml"), env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    refused = topk_cli("status", env={**env, "TOPK_TOKEN": "topk_wrong"})
    assert refused.returncode == 4 and "invalid or revoked token" in refused.stderr
    unreachable = topk_cli("status", env={**env, "TOPK_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 4 and "cannot reach the service" in unreachable.stderr


def test_serve_starts_and_stops_its_own_ray_head(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_")}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--ray-cpus", "2"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        ready = wait_for(
            lambda: _ready(f"http://127.0.0.1:{port}"), 150, interval=1.0, message="serve"
        )
        assert ready["ray"] == "ok" and ready["database"] == "ok"
        output = (tmp_path / "serve.log").read_text()
        dashboard = output.split("Ray dashboard: ")[1].split()[0]
        assert httpx.get(f"{dashboard}/api/version", timeout=5).status_code in (200, 401)
        assert (tmp_path / "data" / "topk.db").exists()
    finally:
        serve.send_signal(signal.SIGINT)
        assert serve.wait(90) == 0
        log.close()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{dashboard}/api/version", timeout=5)


def _ready(url: str) -> dict | None:
    try:
        response = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def test_unreachable_ray_keeps_jobs_queued_and_readyz_says_so(make_server):
    server, store = make_server(ray_address="http://127.0.0.1:9")
    server.start()
    token = store.create_token("erin")
    with client_for(server, token) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "ray: unreachable" in ready.json()["message"]
        job = http.post("/v1/jobs", json=tiny_spec("sleep1")).json()
        waiting = wait_for(
            lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["status_reason"].startswith(
                "waiting: Ray unreachable"
            ) and j,
            30,
        )  # fmt: skip
        assert waiting["status"] == "queued" and waiting["attempts"] == 0
        assert http.get(f"/v1/jobs/{job['id']}/logs").status_code == 409
        assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_autoscaling_limit_admits_jobs_larger_than_the_current_cluster(ray_server):
    server, store = ray_server(cluster_max_cpus="16")
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep1", scaling={"num_workers": 8})).json()
        done = wait_status(http, job["id"])
    # submitted although the 4-CPU cluster has no room: Ray's autoscaler would add the nodes
    assert done["status"] == "succeeded" and done["attempts"] == 1


def test_a_job_lost_with_its_cluster_is_relaunched_on_the_new_one(make_server, tmp_path):
    """The head is replaced (same address and token, empty job table): the running job
    vanished, so it is an infrastructure failure and attempt 2 runs on the new cluster."""
    head = LocalRayHead(2, log_path=tmp_path / "head.log", token_path=tmp_path / "ray-token")
    address = head.start()
    server, store = make_server(env=head.auth_env, ray_address=address,
                                job_python=f"{sys.executable} {FAKE_JOB}",
                                retry_backoff_s="0.5")  # fmt: skip
    server.start()
    token = store.create_token("alice")
    try:
        with client_for(server, token) as http:
            job = http.post("/v1/jobs", json=tiny_spec("sleep30")).json()
            wait_status(http, job["id"], ("running",))
            assert head.restart() == address
            relaunched = wait_for(
                lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["attempts"] == 2
                and j["status"] == "running" and j,
                120, message="attempt 2 to run",
            )  # fmt: skip
            reasons = [e["reason"] for e in relaunched["events"]]
            assert any("vanished" in reason for reason in reasons), reasons
            http.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        head.stop()
