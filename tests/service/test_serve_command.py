"""`topk serve` as a new user meets it: the Ray dashboard on the port asked for, and the login
the README describes (the token file's contents, then a cookie); `topk status` names the
dashboard; a second `topk serve` on a taken port stops at once with a clear message and exit
code 1, and starts (or adopts, and so stops) no Ray head."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
from service_harness import REPO, token_for

from service.local_ray import free_port

TOPK = Path(sys.executable).with_name("topk")
BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"}


def second_serve(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done, time.monotonic() - started


def test_dashboard_port_login_and_a_second_server_on_a_taken_port(serve, tmp_path):
    dashboard_port = free_port()
    server = serve(args=("--dashboard-port", str(dashboard_port))).start()
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    token_file = server.data_dir / "ray-auth-token"
    output = server.output()
    assert f"Ray dashboard: {dashboard}  (log in with the token in {token_file})" in output
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    # The login a browser does: the page loads, the API wants the token, the dialog posts it to
    # /api/authenticate, and the cookie it sets opens the API.
    assert httpx.get(f"{dashboard}/", headers=BROWSER).status_code == 200
    assert httpx.get(f"{dashboard}/api/version", headers=BROWSER).status_code == 401
    token = token_file.read_text().strip()
    wrong = httpx.post(
        f"{dashboard}/api/authenticate", headers={**BROWSER, "Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 403
    login = httpx.post(
        f"{dashboard}/api/authenticate", headers={**BROWSER, "Authorization": f"Bearer {token}"}
    )
    assert login.status_code == 200, login.text
    cookie = login.cookies.get("ray-authentication-token")
    assert cookie == token
    with httpx.Client(cookies={"ray-authentication-token": cookie}, headers=BROWSER) as browser:
        assert browser.get(f"{dashboard}/api/version").status_code == 200
    # `ray get-auth-token` prints this head's token only when pointed at its file
    ray = Path(sys.executable).with_name("ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TOPK_"))}
    printed = subprocess.run(
        [str(ray), "get-auth-token"], env={**env, "RAY_AUTH_TOKEN_PATH": str(token_file)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert printed.returncode == 0 and printed.stdout.strip() == token

    # `topk status` (the list view) names the dashboard
    client_env = {**env, "TOPK_URL": server.url, "TOPK_TOKEN": token_for(server)}
    listed = subprocess.run(
        [str(TOPK), "status"], env=client_env, capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1] == f"Ray dashboard: {dashboard}"

    # A second server on the same data dir and the taken API port: refused before any Ray.
    head_before = server.head_state()
    done, took = second_serve(
        "--port", str(server.port), "--data-dir", str(server.data_dir), env=server.env
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot serve on 127.0.0.1:{server.port}" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr
    assert "API:" not in done.stdout and "Ray head" not in done.stdout, done.stdout
    assert took < 30
    # ... so the first server's head is untouched (adopting it would have stopped it on exit)
    assert server.head_state() == head_before
    assert httpx.get(f"{server.url}/readyz", timeout=10).json()["ray"] == "ok"

    # A new server whose --dashboard-port is taken: refused before its head starts.
    other = tmp_path / "other-data"
    done, _ = second_serve(
        "--port", str(free_port()), "--data-dir", str(other),
        "--dashboard-port", str(dashboard_port), env=server.env,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot put the Ray dashboard on 127.0.0.1:{dashboard_port}" in done.stderr
    assert "API:" not in done.stdout and not (other / "ray-head.json").exists()
