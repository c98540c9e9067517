"""A local Ray head for the embedded service (`topk serve`, `topk demo`) and the tests.

Every port is picked free (Redis holds 6379 here, and other clusters may run on this machine),
the head runs under its own temp dir, and `stop()` ends only the processes of this head (the
`ray start --block` process we own, then anything left whose command line names our temp
dir): never a global `ray stop`.

Security: the head runs with Ray's token authentication on (a fresh random token in a 0600 file)
and `--node-ip-address 127.0.0.1`. Ray 2.60 still binds its GCS, raylet and agent gRPC ports on
every interface whatever the node address; with the token on, they refuse any caller without it,
and the dashboard (the Jobs API) listens on 127.0.0.1 only.

`topk serve` records its head in a state file (pid, temp dir, ports, token file). A server that
was killed (kill -9) leaves its head running; the next `topk serve` on the same data dir adopts
that head, with the jobs it runs, instead of starting a second one (`LocalRayHead.adopt`), and
removes an orphan that no longer answers before it starts anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600 from the first byte: the file is
    created with that mode, then moved into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


class LocalRayHead:
    """`ray start --head --block` on free ports; `dashboard_url` is the Jobs API address."""

    def __init__(
        self,
        num_cpus: int,
        *,
        log_path: Path | None = None,
        gcs_port: int | None = None,
        dashboard_port: int | None = None,
        state_file: Path | None = None,
        token_path: Path | None = None,
    ):
        """`gcs_port`/`dashboard_port` pin the addresses (to restart a head in place); free
        ports otherwise. `state_file`: where the running head is recorded (for `adopt`).
        `token_path`: the auth token's file (default: inside the head's temp dir)."""
        self.num_cpus = num_cpus
        self.requested_ports = (gcs_port, dashboard_port)
        self.log_path = log_path
        self.state_file = state_file
        self.token_path = token_path
        self._token_in_temp_dir = token_path is None
        self.token: str | None = None
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None  # the `ray start --block` process (leader of its group)
        self.temp_dir: str | None = None
        self.dashboard_url: str | None = None
        self.gcs_address: str | None = None
        self.adopted = False

    @property
    def auth_env(self) -> dict[str, str]:
        """What a process needs in its environment to talk to this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self, timeout: float = 120.0, *, new_token: bool = True) -> str:
        """Start the head and wait until its Jobs API answers; returns the dashboard URL.
        Raises RuntimeError (with the head's output) when it does not come up. `new_token`
        False keeps the token of a previous start (a restart in place)."""
        # Unix socket paths are limited to ~107 bytes: keep the temp dir short.
        self.temp_dir = tempfile.mkdtemp(prefix="topkray-", dir="/tmp")
        if self._token_in_temp_dir:
            self.token_path = Path(self.temp_dir) / "auth_token"
        if new_token or self.token is None:
            self.token = secrets.token_hex(32)
        write_private_file(self.token_path, self.token)
        gcs_port = self.requested_ports[0] or free_port()
        dashboard_port = self.requested_ports[1] or free_port()
        self.requested_ports = (gcs_port, dashboard_port)  # a restart reuses the addresses
        ray = str(Path(sys.executable).with_name("ray"))
        command = [
            ray if Path(ray).exists() else "ray", "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(self.auth_env, RAY_USAGE_STATS_ENABLED="0")
        # The jobs run `python -m jobs`: make sure it is the interpreter running us.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.pid = self.process.pid
        self.adopted = False
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise RuntimeError(f"ray start exited with code {code}")
            if self.answers(timeout=2):
                self._write_state()
                return self.dashboard_url
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local Ray head did not come up within {timeout:.0f}s")

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether the head's Jobs API answers an authenticated request."""
        import httpx

        try:
            response = httpx.get(
                f"{self.dashboard_url}/api/version", headers=self.auth_headers, timeout=timeout
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def is_alive(self) -> bool:
        """Whether the head's `ray start --block` process lives (it exits when a Ray process of
        the head dies). Cheap: no request."""
        if self.process is not None:
            return self.process.poll() is None
        return self.pid is not None and _names(self.pid, self.temp_dir)

    def restart(self, timeout: float = 120.0) -> str:
        """Stop what is left of this head and start it again on the same ports and token, so
        clients keep their address (the new head's job table is empty)."""
        self.stop()
        return self.start(timeout, new_token=False)

    def stop(self) -> None:
        """Stop this head only: our `ray start --block` process group, then stragglers that
        name our temp dir."""
        if self.pid is not None and self.is_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            if not _wait_gone(self.process, self.pid, timeout=8):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                _wait_gone(self.process, self.pid, timeout=5)
        if self.temp_dir:
            _remove_head_dir(self.temp_dir)
            self.temp_dir = None
        self.pid = None
        if self.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        state = {
            "pid": self.pid,
            "temp_dir": self.temp_dir,
            "gcs_port": self.requested_ports[0],
            "dashboard_port": self.requested_ports[1],
            "num_cpus": self.num_cpus,
            "token_path": str(self.token_path),
            "started_at": time.time(),
        }
        write_private_file(self.state_file, json.dumps(state, indent=2))

    @classmethod
    def adopt(cls, state_file: Path, *, log_path: Path | None = None) -> LocalRayHead | None:
        """The head recorded in `state_file` when it is still alive and answers with its token
        (a server that was killed left it running); None otherwise, after stopping whatever is
        left of it (an orphan must not run jobs nobody follows)."""
        try:
            state = json.loads(state_file.read_text())
            pid, temp_dir = int(state["pid"]), str(state["temp_dir"])
            ports = int(state["gcs_port"]), int(state["dashboard_port"])
            token_path = Path(state["token_path"])
            num_cpus = int(state["num_cpus"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            state_file.unlink(missing_ok=True)  # unreadable: nothing to adopt or clean
            return None
        head = cls(
            num_cpus,
            log_path=log_path,
            gcs_port=ports[0],
            dashboard_port=ports[1],
            state_file=state_file,
            token_path=token_path,
        )
        head.pid, head.temp_dir = pid, temp_dir
        head.dashboard_url = f"http://127.0.0.1:{ports[1]}"
        head.gcs_address = f"127.0.0.1:{ports[0]}"
        with contextlib.suppress(OSError):
            head.token = token_path.read_text().strip()
        deadline = time.monotonic() + 20  # a loaded machine may answer slowly: do not kill
        while head.token and head.is_alive() and time.monotonic() < deadline:  # a live head
            if head.answers(timeout=5):
                head.adopted = True
                return head
            time.sleep(1)
        head.stop()  # an orphan (or its leftovers): gone before anything is launched
        return None

    def __enter__(self) -> LocalRayHead:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _names(pid: int, marker: str | None) -> bool:
    """Whether process `pid` exists and its command line contains `marker`."""
    if not marker:
        return False
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_gone(process: subprocess.Popen | None, pid: int, timeout: float) -> bool:
    if process is not None:
        try:
            process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.1)
    return False


def _kill_processes_naming(marker: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line contains `marker` (Linux /proc),
    waiting (boundedly) until they are gone."""
    victims = pids_naming(marker)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    victims = _wait_vanished(victims, timeout=10)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    _wait_vanished(victims, timeout=5)


def _wait_vanished(pids: list[int], timeout: float) -> list[int]:
    """The processes of `pids` still there after waiting up to `timeout` seconds for them."""
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    return pids


def _remove_head_dir(temp_dir: str, attempts: int = 10) -> None:
    """Stop the processes that name a head's temp dir, then remove the dir. A Ray process that
    is still exiting can write into it while it is removed (a CI run was left with the empty
    folders of a session's logs and sockets), so kill and remove again until it is gone."""
    for _ in range(attempts):
        _kill_processes_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if not os.path.lexists(temp_dir):
            return
        time.sleep(0.5)


def pids_naming(marker: str) -> list[int]:
    """The live processes whose command line contains `marker` (Linux /proc), except us."""
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


class HeadSupervisor:
    """Watches the embedded head while the server runs, and restarts it in place (same ports
    and token) when it dies. Before the restart, the reconciler moves the jobs that ran on the
    dead head to a new attempt (`cluster_replaced`), so they are relaunched on the new head,
    each attempt on one head only. `replaced_reason`: the server started a new head because the
    recorded one was gone, so the same applies to the jobs it had."""

    def __init__(self, head: LocalRayHead, *, replaced_reason=None, announce=print, interval_s=1.0):
        self.head = head
        self.replaced_reason = replaced_reason
        self.announce = announce
        self.interval_s = interval_s
        self.restarts = 0
        self.last_error: str | None = None
        self._reconciler = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, reconciler) -> None:
        """Start watching; call before the reconciler's first pass."""
        self._reconciler = reconciler
        if self.replaced_reason:
            reconciler.cluster_replaced(self.replaced_reason)
        self._thread = threading.Thread(target=self._run, name="topk-ray-head", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.wait(delay):
            if self.head.is_alive():
                delay = self.interval_s
                continue
            self.announce("the local Ray head died: its jobs move to a new attempt; restarting it")
            if self._reconciler is not None:
                self._reconciler.cluster_replaced("the local Ray head died", wait_s=60)
            if self._stop.is_set():
                return
            try:
                self.head.restart()
            except RuntimeError as exc:
                self.last_error = str(exc)
                self.announce(f"could not restart the local Ray head: {exc}; trying again")
                delay = min(30.0, max(delay * 2, 2.0))
                continue
            self.restarts += 1
            self.last_error = None
            self.announce(f"the local Ray head is back at {self.head.dashboard_url}")
