"""Helpers of the service tests: a server subprocess, HTTP clients, specs, polling."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.local_ray import free_port

REPO = Path(__file__).resolve().parents[2]
FAKE_JOB = Path(__file__).with_name("fake_job.py")
TINY_DATA = Path(tempfile.gettempdir()) / "topk-tiny-data"
"""Where tiny_spec's data URLs point: empty shard files. Local data must exist at submission
(the server stats it); the fake job never reads it."""


class ServerProcess:
    """`uvicorn --factory service.api:create_app` in a subprocess, configured by TOPK_* env."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, *, wait: bool = True, extra_env: dict[str, str] | None = None) -> ServerProcess:
        env = {**os.environ, **self.env}
        env.pop("TOPK_TEST_CRASH_AT", None)
        env.update(extra_env or {})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "service.api:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}):\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """kill -9: no shutdown hooks run."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def client_for(server: ServerProcess, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def tiny_data() -> Path:
    """TINY_DATA with its (empty) shards train-000.tar, train-001.tar and val-000.tar."""
    TINY_DATA.mkdir(parents=True, exist_ok=True)
    for name in ("train-000.tar", "train-001.tar", "val-000.tar"):
        (TINY_DATA / name).touch()
    return TINY_DATA


def tiny_spec(name: str | None = None, **overrides) -> dict:
    """A small valid training spec; its data are tiny_data()'s empty shards (they exist, as
    a submission's local data must, and nothing reads them)."""
    data = tiny_data()
    spec = {
        "data": {"train": f"{data}/train-{{000..001}}.tar", "val": f"{data}/val-000.tar",
                 "num_classes": 10, "image_size": 16, "channels": 1},
        "loss": {"name": "cross_entropy"},
        "epochs": 2,
        "batch_size": 8,
    }  # fmt: skip
    if name is not None:
        spec["name"] = name
    spec.update(overrides)
    return spec


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.3, message: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message or predicate}")


class Serve:
    """`topk serve --data-dir D` as a subprocess (the README's command), restartable."""

    def __init__(
        self, tmp_path: Path, *, ray_cpus: int = 2, args: tuple[str, ...] = (), **env: str
    ):
        self.ray_cpus = ray_cpus
        self.args = tuple(args)  # more `topk serve` options
        self.data_dir = tmp_path / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "serve.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TOPK_", "RAY_"))}
        self.env = {
            **base,
            "TOPK_JOB_PYTHON": f"{sys.executable} {FAKE_JOB}",
            "TOPK_RECONCILE_INTERVAL_S": "0.5",
            "TOPK_RETRY_BACKOFF_S": "0.5",
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self, **extra_env: str) -> Serve:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--ray-cpus", str(self.ray_cpus), *self.args],
                cwd=REPO, env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(self._ready, 150, interval=1.0, message=f"serve to be ready:\n{self.output()}")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited ({self.process.returncode}):\n{self.output()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def head_state(self) -> dict:
        return json.loads((self.data_dir / "ray-head.json").read_text())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        return self.process.wait(90)

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


def token_for(server: Serve, owner: str = "alice") -> str:
    """A new token for `owner` in the database of `topk serve`'s data dir."""
    from service.store import Store

    store = Store.from_url(f"sqlite:///{server.data_dir / 'topk.db'}")
    try:
        store.migrate()
        return store.create_token(owner)
    finally:
        store.close()


def driver_starts(server: Serve, job_id: str) -> list[str]:
    """The Ray submissions that started this job's driver, one per start, over every head that
    ever ran (the fake job appends them to its run folder)."""
    log = server.data_dir / "runs" / job_id / "submissions.log"
    return log.read_text().split() if log.exists() else []


def ray_submissions(ray_head, job_id: str) -> list[str]:
    """The submission ids the Ray head has for `job_id` (`<job id>-<attempt>`), sorted."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.auth_headers)
    return sorted(
        job.submission_id
        for job in client.list_jobs()
        if job.submission_id and job.submission_id.startswith(f"{job_id}-")
    )


POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def postgres_database(prefix: str):
    """A new, empty database on the local PostgreSQL server (its URL), dropped on exit; the
    test is skipped when the server is not reachable."""
    import pytest
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432: {exc}")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
