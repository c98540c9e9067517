"""`topk sweeps status ID` against a real server and Ray head (the sweep runs
tests/service/fake_job.py as a "live" sweep: it rewrites sweep.json each epoch, as the runtime
does): the trial table shows while the sweep runs, with the best trial so far, and once it has
ended the best trial is one readable line, not a Python dict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service_harness import FAKE_JOB, client_for, tiny_spec, wait_for

TOPK = Path(sys.executable).with_name("topk")


def test_the_trial_table_shows_while_the_sweep_runs_and_the_best_trial_reads_well(
    make_server, ray_head
):
    server, store = make_server(
        env=ray_head.auth_env,
        ray_address=ray_head.dashboard_url,
        job_python=f"{sys.executable} {FAKE_JOB}",
    )
    server.start()
    token = store.create_token("alice")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_")}
    env.update(TOPK_URL=server.url, TOPK_TOKEN=token)

    def status(sweep_id: str) -> str:
        done = subprocess.run(
            [str(TOPK), "sweeps", "status", sweep_id], env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    sweep = {"train": tiny_spec("livesleep8"), "search": {"optim.lr": {"grid": [0.1, 0.01]}}}
    with client_for(server, token) as http:
        created = http.post("/v1/sweeps", json=sweep)
        assert created.status_code == 201, created.text
        sweep_id = created.json()["id"]

        def running_with_trials() -> str | None:
            out = status(sweep_id)
            running = any(line.split() == ["status:", "running"] for line in out.splitlines())
            return out if running and "trials:" in out.splitlines() else None

        out = wait_for(running_with_trials, 90, interval=0.5, message="a live trial table")
        lines = out.splitlines()
        assert lines[lines.index("trials:") + 1].split() == [
            "TRIAL", "STATUS", "EPOCH", "optim.lr", "val_top5",
        ]  # fmt: skip
        rows = {line.split()[0]: line.split() for line in lines if line.startswith("  t")}
        assert rows["t0"][1] == "running" and rows["t1"][1:] == ["pending", "-", "0.01", "-"]
        assert lines[-1].startswith("best so far: optim.lr=0.1 (val_top5 ")
        assert lines[-1].endswith(", trial t0)")

        def finished():
            job = http.get(f"/v1/sweeps/{sweep_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        assert wait_for(finished, 120, message="the sweep to end")["status"] == "succeeded"
    out = status(sweep_id)
    assert out.splitlines()[-1] == "best: optim.lr=0.01 (val_top5 0.6000, trial t1)"
    assert "{" not in out.splitlines()[-1]
