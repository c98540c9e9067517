"""The API's parts reach its routes as FastAPI dependencies (service/api/deps.py), so one can be
swapped with `app.dependency_overrides`: here Ray's launcher and the reconciler, around a real
app on a real SQLite file (in process, through Starlette's test client)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from service_harness import tiny_spec

from service.api import create_app
from service.api.deps import get_launcher, get_reconciler, get_store
from service.job_status import LAUNCHING, QUEUED
from service.settings import Settings


class QuietRay:
    """A launcher whose cluster answers and whose jobs printed three lines."""

    def ping(self) -> None:
        pass

    def logs(self, submission_id: str) -> str:
        return f"{submission_id} one\ntwo\nthree\n"


class FailingReconciler:
    """A reconciler whose latest pass failed, once."""

    last_error = "OperationalError: database is locked"

    def health_problem(self) -> None:
        return None

    def wake(self) -> None:
        pass


@pytest.fixture
def app(tmp_path):
    return create_app(Settings(data_dir=tmp_path, launch_mode="hold"), run_reconciler=False)


def test_readyz_shows_the_reconcilers_last_error_before_it_turns_unready(app):
    app.dependency_overrides[get_launcher] = QuietRay
    app.dependency_overrides[get_reconciler] = FailingReconciler
    with TestClient(app) as http:
        ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "database": "ok",
        "ray": "ok",
        "reconciler": "ok",
        "reconciler_last_error": "OperationalError: database is locked",
    }


def test_routes_read_logs_through_the_launcher_dependency(app):
    app.dependency_overrides[get_launcher] = QuietRay
    with TestClient(app) as http:
        store = app.state.services.store
        assert app.dependency_overrides.get(get_store) is None  # the real one
        token = store.create_token("alice")
        http.headers["Authorization"] = f"Bearer {token}"
        job = http.post("/v1/jobs", json=tiny_spec()).json()
        store.transition(
            job["id"], LAUNCHING, "test", expect=QUEUED, attempt=1, submission_id="s-1"
        )
        logs = http.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 2})
    assert logs.status_code == 200, logs.text
    assert logs.text == "two\nthree\n"
