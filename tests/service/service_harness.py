"""Helpers of the service tests: a server subprocess, HTTP clients, specs, polling."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.local_ray import free_port

REPO = Path(__file__).resolve().parents[2]
FAKE_JOB = Path(__file__).with_name("fake_job.py")


class ServerProcess:
    """`uvicorn --factory service.app:create_app` in a subprocess, configured by TOPK_* env."""

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
                [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
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


def tiny_spec(name: str | None = None, **overrides) -> dict:
    """A small valid training spec (the data URLs need not exist to be accepted)."""
    spec = {
        "data": {"train": "/tmp/topk-nonexistent/train-{000..001}.tar",
                 "val": "/tmp/topk-nonexistent/val-000.tar", "num_classes": 10,
                 "image_size": 16, "channels": 1},
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
