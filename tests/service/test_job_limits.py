"""What the service hands its Ray jobs and how it reads their exit, against the real server and a
real local Ray head, with tests/service/fake_job.py as the job: the URL limits travel with the
job (the runs folder always among the roots), and a spec refused by the worker (exit code 3,
jobs/contract/exit_codes.py) fails at once while an infrastructure-like death is still retried."""

from __future__ import annotations

import json

import pytest
from service_harness import client_for, ray_submissions, tiny_data, tiny_spec, wait_for

from jobs.contract.urls import ALLOWED_PROTOCOLS

DATA_ROOT = str(tiny_data())  # where tiny_spec's data URLs point


def _finished(http, job_id: str, timeout: float = 120.0) -> dict:
    def current():
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(current, timeout, message=f"{job_id} to finish")


def test_the_job_gets_the_services_url_limits_with_its_runs_folder(ray_server, tmp_path):
    """TOPK_ALLOWED_ROOTS leaves the runs folder out: the job still reads its spec.json there
    (the fake job checks its spec and storage URLs as `python -m jobs` does) and runs with the
    service's limits, not the Ray head's environment."""
    server, store = ray_server(allowed_roots=DATA_ROOT, allowed_protocols="file,s3")
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=tiny_spec("sleep1")).json()
        done = _finished(http, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    runs = tmp_path / "data0" / "runs"
    seen = json.loads((runs / job["id"] / "env.json").read_text())
    assert seen["TOPK_ALLOWED_PROTOCOLS"] == "file,s3"
    assert seen["TOPK_ALLOWED_ROOTS"].split(",") == [DATA_ROOT, str(runs.absolute())]


def test_a_spec_refused_by_the_worker_fails_at_once_and_a_lost_node_is_retried(
    ray_server, ray_head
):
    server, store = ray_server()
    server.start()
    token = store.create_token("alice")
    with client_for(server, token) as http:
        refused = http.post("/v1/jobs", json=tiny_spec("specfail")).json()
        flaky = http.post("/v1/jobs", json=tiny_spec("flaky")).json()
        refused_done, flaky_done = _finished(http, refused["id"]), _finished(http, flaky["id"])
    assert refused_done["status"] == "failed" and refused_done["attempts"] == 1, refused_done
    reason = refused_done["failure_reason"]
    assert reason.startswith("the worker refused the spec (exit code 3): ")
    assert "invalid spec (1 problem(s)): loss.k: k + 1 must be at most" in reason
    assert "retrying" not in " ".join(e["reason"] for e in refused_done["events"])
    assert ray_submissions(ray_head, refused["id"]) == [f"{refused['id']}-1"]
    assert flaky_done["status"] == "succeeded" and flaky_done["attempts"] == 2


def test_the_runs_folder_is_always_among_the_roots_the_service_checks_and_hands_on(tmp_path):
    from service.launcher import build_job_env
    from service.settings import Settings
    from service.specs import InvalidSpec, validate_spec

    runs = str((tmp_path / "runs").absolute())
    settings = Settings.from_env({"TOPK_DATA_DIR": str(tmp_path), "TOPK_ALLOWED_ROOTS": DATA_ROOT})
    assert settings.allowed_roots == (DATA_ROOT, runs)
    assert build_job_env(
        allowed_protocols=settings.allowed_protocols, allowed_roots=settings.allowed_roots
    ) == {"TOPK_ALLOWED_PROTOCOLS": ",".join(sorted(ALLOWED_PROTOCOLS)),
          "TOPK_ALLOWED_ROOTS": f"{DATA_ROOT},{runs}"}  # fmt: skip
    assert validate_spec("train", tiny_spec(storage=f"{runs}/mine"), settings).storage_root
    with pytest.raises(InvalidSpec, match="storage: refused URL"):
        validate_spec("train", tiny_spec(storage=str(tmp_path / "elsewhere")), settings)
    # object storage adds no local root; no roots at all stays no limit
    remote = Settings.from_env({"TOPK_STORAGE_URL": "s3://b/runs", "TOPK_ALLOWED_ROOTS": DATA_ROOT})
    assert remote.allowed_roots == (DATA_ROOT,)
    assert Settings.from_env({"TOPK_DATA_DIR": str(tmp_path)}).allowed_roots is None
    assert build_job_env(allowed_protocols=("s3",), allowed_roots=None)["TOPK_ALLOWED_ROOTS"] == ""
