"""The API, started with the settings of the rendered prod Deployment, answers its probes and
reaches a token-authenticated Ray head the way the pod would (RAY_AUTH_MODE=token, the token in
a file at RAY_AUTH_TOKEN_PATH). Real processes: a local Ray head and `topk serve`."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from deploy_manifests import REPO, find

# A Ray head like KubeRay's: no logical CPUs, dashboard (Jobs API) on the given port. It stops
# (ray.shutdown) when its stdin closes, so the test ends every process it started.
RAY_HEAD = """
import sys, ray
ray.init(num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[1]), _temp_dir=sys.argv[2])
print("ready", flush=True)
sys.stdin.read()
ray.shutdown()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def wait_for(url: str, status: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last: tuple[int, dict] | Exception = (0, {})
    while time.monotonic() < deadline:
        try:
            last = http_status(url)
            if last[0] == status:
                return last[1]
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer {status} within {timeout_s} s (last: {last})")


def api_environment(objects, tmp_path: Path, token_file: Path, ray_port: int, api_port: int):
    """The API container's environment from the rendered objects, with the cluster-only values
    (addresses, mounted paths, the database Secret) mapped onto this machine."""
    (deployment,) = find(objects, "Deployment", "topk-api")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            (config,) = find(objects, "ConfigMap", source["configMapRef"]["name"])
            env.update(config["data"])
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    # The database Secret: SQLite here (the Postgres URL is the operator's).
    env["TOPK_DATABASE_URL"] = f"sqlite:///{tmp_path / 'topk.db'}"
    mount = next(
        m
        for m in container["volumeMounts"]
        if env["RAY_AUTH_TOKEN_PATH"].startswith(m["mountPath"])
    )
    assert mount["readOnly"] is True
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    ray = urlsplit(env["TOPK_RAY_ADDRESS"])
    assert ray.port == 8265
    env["TOPK_RAY_ADDRESS"] = f"http://127.0.0.1:{ray_port}"
    container_port = container["ports"][0]["containerPort"]
    assert env["TOPK_PORT"] == str(container_port) and env["TOPK_HOST"] == "0.0.0.0"
    env["TOPK_HOST"], env["TOPK_PORT"] = "127.0.0.1", str(api_port)  # loopback only here
    assert env["TOPK_DATA_DIR"].startswith("/tmp/")
    env["TOPK_DATA_DIR"] = str(tmp_path / "data")
    return container, env


@pytest.mark.slow
def test_api_pod_settings_serve_probes_and_reach_token_ray(prod_objects, tmp_path):
    token = secrets.token_hex(32)
    token_file = tmp_path / "auth_token"
    token_file.write_text(token)
    ray_port, api_port = free_port(), free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TOPK_", "RAY_"))}
    # Ray's unix sockets live under its temp dir: keep the path short (108-byte limit).
    ray_dir = tempfile.mkdtemp(prefix="topk-ray-")
    head_log = tmp_path / "ray-head.log"
    head = subprocess.Popen(
        [sys.executable, "-c", RAY_HEAD, str(ray_port), ray_dir],
        env={**base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=head_log.open("w"),
        text=True,
    )
    server = None
    try:
        assert head.stdout.readline().strip() == "ready", head_log.read_text()[-3000:]
        # Token auth is on: without the token the Jobs API refuses.
        assert http_status(f"http://127.0.0.1:{ray_port}/api/version")[0] == 401
        assert http_status(f"http://127.0.0.1:{ray_port}/api/version", token)[0] == 200

        container, env = api_environment(prod_objects, tmp_path, token_file, ray_port, api_port)
        server = subprocess.Popen(
            [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]
            + container["args"],
            cwd=tmp_path,
            env={**base_env, **env, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        api = f"http://127.0.0.1:{api_port}"
        wait_for(api + container["startupProbe"]["httpGet"]["path"], 200, 120)
        assert http_status(api + container["livenessProbe"]["httpGet"]["path"])[0] == 200
        ready = wait_for(api + container["readinessProbe"]["httpGet"]["path"], 200, 60)
        assert ready["ray"] == "ok" and ready["database"] == "ok"

        # The API image's HEALTHCHECK command, as Docker runs it, with the container's env.
        dockerfile = (REPO / "docker" / "api.Dockerfile").read_text().replace("\\\n", " ")
        (check,) = re.findall(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", dockerfile, flags=re.M)
        command = json.loads(check)
        assert command[0] == "python"
        healthcheck = subprocess.run(
            [sys.executable, *command[1:]], env={**base_env, **env}, timeout=30
        )
        assert healthcheck.returncode == 0
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)
