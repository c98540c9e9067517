"""Fixtures of the service tests: real server processes over real HTTP, a real local Ray head,
SQLite files and a fresh PostgreSQL database per test session."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest
from service_harness import FAKE_JOB, Serve, ServerProcess, postgres_database

from service.local_ray import LocalRayHead
from service.store import Store


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> Iterator[LocalRayHead]:
    """One real local Ray head for the session (4 logical CPUs), stopped at the end."""
    log = tmp_path_factory.mktemp("ray") / "head.log"
    head = LocalRayHead(4, log_path=log)
    head.start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped after the session."""
    with postgres_database("topk_service_test") as url:
        yield url


@pytest.fixture
def make_server(tmp_path) -> Iterator:
    """Factory: make_server(database_url, env=..., **TOPK settings) -> (ServerProcess, Store)
    sharing one database; `env` adds other variables (a Ray head's `auth_env`). Every server
    started through it is stopped at the end of the test."""
    servers: list[ServerProcess] = []
    stores: list[Store] = []

    def make(database_url: str | None = None, env: dict[str, str] | None = None, **settings):
        data_dir = tmp_path / f"data{len(servers)}"
        env = {
            **(env or {}),
            "TOPK_DATA_DIR": str(data_dir),
            "TOPK_RECONCILE_INTERVAL_S": "0.5",
            **{f"TOPK_{key.upper()}": str(value) for key, value in settings.items()},
        }
        if database_url:
            env["TOPK_DATABASE_URL"] = database_url
        data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.from_url(database_url or f"sqlite:///{data_dir / 'topk.db'}")
        store.migrate()
        server = ServerProcess(env, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        stores.append(store)
        return server, store

    yield make
    for server in servers:
        server.stop()
    for store in stores:
        store.close()


@pytest.fixture
def serve(tmp_path) -> Iterator:
    """Factory: serve(ray_cpus=2, args=(), **env) -> Serve, `topk serve [args]` with its own Ray head on a data dir under
    tmp_path. At the end every server is stopped, and any head it left behind too."""
    servers: list[Serve] = []

    def make(*, ray_cpus: int = 2, args: tuple[str, ...] = (), **env: str) -> Serve:
        server = Serve(tmp_path, ray_cpus=ray_cpus, args=args, **env)
        servers.append(server)
        return server

    yield make
    for server in servers:
        with contextlib.suppress(Exception):
            server.terminate()
        state_file = server.data_dir / "ray-head.json"
        if state_file.exists():
            head = LocalRayHead.adopt(state_file)
            if head is not None:
                head.stop()


@pytest.fixture
def ray_server(make_server, ray_head):
    """Factory: a server on the session's Ray head that runs the fake job (fake_job.py)."""

    def make(database_url: str | None = None, **settings):
        return make_server(
            database_url,
            env=ray_head.auth_env,
            ray_address=ray_head.dashboard_url,
            job_python=f"{sys.executable} {FAKE_JOB}",
            retry_backoff_s="0.5",
            **settings,
        )

    return make
