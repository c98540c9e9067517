"""`topk serve` with its embedded Ray head: signals, crashes, a dying head, and what the head
exposes. Real processes throughout: `topk serve` as a subprocess, its real local Ray head, the
fake job (tests/service/fake_job.py) as the Ray job, real HTTP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from pathlib import Path

import grpc
import httpx
import pytest
from service_harness import driver_starts, tiny_spec, token_for, wait_for

from service.local_ray import pids_naming

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_status(http: httpx.Client, job_id: str, statuses=TERMINAL, timeout=120.0) -> dict:
    def current():
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_for(current, timeout, message=f"{job_id} to reach {statuses}")


def assert_head_gone(state: dict) -> None:
    assert pids_naming(state["temp_dir"]) == []
    assert not Path(state["temp_dir"]).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_serve_with_its_ray_head(serve, sig):
    """`kill %1` (SIGTERM) after the README's `topk serve ... &` left ~20 Ray processes and the
    topkray-* folder behind; Ctrl-C (SIGINT) did not. Both must stop everything."""
    server = serve().start()
    state = server.head_state()
    assert pids_naming(state["temp_dir"])  # the head runs
    assert server.terminate(sig) == 0, server.output()
    assert_head_gone(state)
    assert not (server.data_dir / "ray-head.json").exists()
    assert "stopping the local Ray head" in server.output()


def test_the_embedded_head_wants_its_token_everywhere(serve):
    """Ray 2.60 binds the GCS and raylet on every interface: with token auth on they refuse a
    caller without the token. The token and state files are the owner's only, and the Jobs API
    listens on the loopback only."""
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    server = serve().start()
    state = server.head_state()
    token_path = Path(state["token_path"])
    for private in (token_path, server.data_dir / "ray-head.json"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    token = token_path.read_text().strip()
    dashboard = f"http://127.0.0.1:{state['dashboard_port']}"
    assert httpx.get(f"{dashboard}/api/version", timeout=10).status_code == 401
    authorized = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{dashboard}/api/version", headers=authorized, timeout=10).status_code == 200

    channel = grpc.insecure_channel(f"127.0.0.1:{state['gcs_port']}")
    stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
    request = gcs_service_pb2.GetClusterIdRequest()
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetClusterId(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stub.GetClusterId(request, timeout=20, metadata=[("authorization", f"Bearer {token}")])
    channel.close()
    assert dashboard_listeners(state) == {"127.0.0.1"}
    server.terminate()


def dashboard_listeners(state: dict) -> set[str]:
    """The local addresses a listening socket on the dashboard's port is bound to (/proc)."""
    port = f"{state['dashboard_port']:04X}"
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, status = line.split()[1:4]
            address, local_port = local.split(":")
            if local_port == port and status == "0A":  # LISTEN
                addresses.add(_ip(address))
    return addresses


def _ip(hex_address: str) -> str:
    if len(hex_address) == 8:
        return ".".join(str(int(hex_address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    return "ipv6:" + hex_address


@pytest.mark.parametrize("crash_at", ["after_launching_recorded", "after_submit"])
def test_kill9_of_serve_then_restart_adopts_the_head_and_launches_once(serve, crash_at):
    """The red team's duplicate: kill -9 while a job was launching, restart, and both the old
    head and a new one ran it. The restarted server must adopt the head it left running."""
    server = serve().start(TOPK_TEST_CRASH_AT=crash_at)
    token = token_for(server)
    head_before = server.head_state()
    with server.client(token) as http, contextlib.suppress(httpx.HTTPError):
        job_id = http.post("/v1/jobs", json=tiny_spec("sleep2")).json()["id"]
    assert server.process.wait(60) == 137, server.output()  # the crash point killed it
    assert pids_naming(head_before["temp_dir"])  # its head lives on, orphaned
    server.start()
    assert "adopting the local Ray head" in server.output()
    assert server.head_state()["pid"] == head_before["pid"]
    with server.client(token) as http:
        (job,) = http.get("/v1/jobs").json()["items"]
        job_id = job["id"]
        done = wait_status(http, job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert driver_starts(server, job_id) == [f"{job_id}-1"]
    assert server.terminate() == 0
    assert_head_gone(head_before)


def test_a_dead_head_is_restarted_and_its_jobs_run_again(serve):
    server = serve().start()
    token = token_for(server)
    state = server.head_state()
    with server.client(token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep4")).json()
        wait_status(http, job["id"], ("running",))
        os.killpg(state["pid"], signal.SIGKILL)  # the whole head, at once
        done = wait_status(http, job["id"], timeout=180)
        ready = wait_for(
            lambda: (r := http.get("/readyz")).status_code == 200 and r.json(), 60
        )  # fmt: skip
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert any("was lost: the local Ray head died" in e["reason"] for e in done["events"])
    starts = driver_starts(server, job["id"])
    assert starts == [f"{job['id']}-1", f"{job['id']}-2"]  # each attempt on one head, once
    assert ready["ray"] == "ok"
    restarted = server.head_state()
    assert restarted["dashboard_port"] == state["dashboard_port"]
    assert restarted["pid"] != state["pid"]
    assert "the local Ray head is back" in server.output()
    assert pids_naming(state["temp_dir"]) == []
    assert server.terminate() == 0
    assert_head_gone(restarted)


def test_serve_and_head_both_killed_then_restart_moves_jobs_to_a_new_attempt(serve):
    server = serve().start()
    token = token_for(server)
    state = server.head_state()
    with server.client(token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep30")).json()
        wait_status(http, job["id"], ("running",))
    server.kill()
    os.killpg(state["pid"], signal.SIGKILL)
    server.start()
    assert "adopting" not in server.output()
    assert_head_gone(state)  # what was left of the dead head was cleaned up
    with server.client(token) as http:
        moved = wait_for(
            lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["attempts"] == 2 and j,
            120, message="attempt 2",
        )  # fmt: skip
        assert any("recorded in the data dir is gone" in e["reason"] for e in moved["events"])
        http.post(f"/v1/jobs/{job['id']}/cancel")
    assert driver_starts(server, job["id"])[0] == f"{job['id']}-1"
    assert f"{job['id']}-1" not in driver_starts(server, job["id"])[1:]
    assert server.terminate() == 0
