"""Schemathesis fuzzing of the OpenAPI schema against the real server: no input, valid or not,
gets a 5xx, and every error is the service's JSON error shape."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from service_harness import ServerProcess

from service.db import Store


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz")
    database_url = f"sqlite:///{data_dir / 'topk.db'}"
    store = Store.from_url(database_url)
    store.migrate()
    token = store.create_token("fuzzer")
    env = {"TOPK_DATA_DIR": str(data_dir), "TOPK_DATABASE_URL": database_url,
           "TOPK_LAUNCH_MODE": "hold", "TOPK_ALLOWED_ROOTS": "/tmp"}  # fmt: skip
    server = ServerProcess(env, data_dir / "server.log").start()
    yield server, token
    server.stop()
    store.close()


def _operations(url: str):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_covers_every_route(fuzz_server):
    server, _ = fuzz_server
    routes = {(op.method.upper(), op.path) for op in _operations(server.url)}
    assert ("POST", "/v1/jobs") in routes and ("POST", "/v1/sweeps/{job_id}/cancel") in routes
    assert len(routes) >= 15


def test_no_input_makes_the_server_fail(fuzz_server):
    """Every operation, 25 generated cases each (valid and invalid), with and without a token."""
    server, token = fuzz_server
    for operation in _operations(server.url):

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(case):
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                response = case.call(base_url=server.url, headers=headers, timeout=30)
                assert response.status_code < 500, (
                    case.path, response.status_code, response.text[:500],
                )  # fmt: skip
                if response.status_code >= 400:
                    body = response.json()
                    assert set(body) == {"error", "message", "errors"}, body
                    assert "Traceback" not in response.text

        check()
