"""A local Ray head for the embedded service (`topk serve`, `topk demo`) and the tests.

Every port is picked free (Redis holds 6379 here, and other clusters may run on this machine),
the head runs under its own temp dir, and `stop()` ends only the processes of this head (the
`ray start --block` process we own, then anything left whose command line names our temp
dir): never a global `ray stop`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayHead:
    """`ray start --head --block` on free ports; `dashboard_url` is the Jobs API address."""

    def __init__(
        self,
        num_cpus: int,
        *,
        log_path: Path | None = None,
        gcs_port: int | None = None,
        dashboard_port: int | None = None,
    ):
        """`gcs_port`/`dashboard_port` pin the addresses (to restart a head in place); free
        ports otherwise."""
        self.num_cpus = num_cpus
        self.requested_ports = (gcs_port, dashboard_port)
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        self.dashboard_url: str | None = None
        self.gcs_address: str | None = None

    def start(self, timeout: float = 120.0) -> str:
        """Start the head and wait until its Jobs API answers; returns the dashboard URL.
        Raises RuntimeError (with the head's output) when it does not come up."""
        # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
        self.temp_dir = tempfile.mkdtemp(prefix="topkray-", dir="/tmp")
        gcs_port = self.requested_ports[0] or free_port()
        dashboard_port = self.requested_ports[1] or free_port()
        ray = str(Path(sys.executable).with_name("ray"))
        command = [
            ray if Path(ray).exists() else "ray", "start", "--head", "--block",
            "--port", str(gcs_port),
            "--dashboard-port", str(dashboard_port),
            "--dashboard-host", "127.0.0.1",
            "--include-dashboard", "true",
            "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0",
            "--temp-dir", self.temp_dir,
            "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--disable-usage-stats",
        ]  # fmt: skip
        log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - owned by the child
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        # The jobs run `python -m jobs`: make sure it is the interpreter running us.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"ray start exited with code {self.process.returncode}")
            try:
                # Any answer will do: with token auth on, an anonymous request gets a 401.
                httpx.get(f"{self.dashboard_url}/api/version", timeout=2)
                _export_auth_env()
                return self.dashboard_url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local Ray head did not come up within {timeout:.0f}s")

    def stop(self) -> None:
        """Stop this head only: our `ray start --block` process group, then stragglers that
        name our temp dir."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
        if self.temp_dir:
            _kill_processes_naming(self.temp_dir)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> LocalRayHead:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _export_auth_env() -> None:
    """Clusters with token auth write ~/.ray/auth_token; Ray's job client reads these."""
    token_path = Path.home() / ".ray" / "auth_token"
    if token_path.exists() and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)


def _kill_processes_naming(marker: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line contains `marker` (Linux /proc)."""
    victims = _pids_naming(marker)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while victims and time.monotonic() < deadline:
        time.sleep(0.2)
        victims = [pid for pid in victims if Path(f"/proc/{pid}").exists()]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _pids_naming(marker: str) -> list[int]:
    pids = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
