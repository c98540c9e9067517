"""End to end with the real training runtime: POST a tiny Fashion-MNIST job and a 2-trial sweep
over HTTP, Ray runs `python -m jobs train|sweep`, the service follows them to `succeeded` and
serves their metrics; and the `topk` command line against the same server."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import REPO, client_for, wait_for

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    if not FASHION_MNIST.exists():
        pytest.skip("apt-get install dataset-fashion-mnist for the end-to-end tests")
    from jobs.data.writer import build_shards

    out = tmp_path_factory.mktemp("fmnist-shards")
    build_shards(str(FASHION_MNIST), str(out), seed=0, val_fraction=0.3, max_per_class=40,
                 imbalance_ratio=4, progress=None)  # fmt: skip
    return out


def small_spec(shards: Path, name: str, loss: dict) -> dict:
    return {
        "name": name,
        "data": {"train": str(shards / "dataset.json"), "val": str(shards / "dataset.json"),
                 "num_classes": 10, "image_size": 28, "channels": 1, "loader_workers": 0,
                 "samples_per_epoch": 96, "augment": {"random_resized_crop": False}},
        "model": {"arch": "cifar_resnet20"},
        "loss": loss,
        "optim": {"lr": 0.05},
        "epochs": 2,
        "batch_size": 32,
        "metrics": {"ks": [1, 3], "select": "val_top3"},
    }  # fmt: skip


def wait_terminal(http, collection: str, job_id: str, timeout: float) -> dict:
    def current():
        job = http.get(f"/v1/{collection}/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(current, timeout, interval=1.0, message=f"{job_id} to finish")


@pytest.mark.slow
def test_real_training_job_and_sweep_through_the_api(make_server, ray_head, shards):
    server, store = make_server(
        env=ray_head.auth_env, ray_address=ray_head.dashboard_url, job_python=sys.executable
    )
    server.start()
    token = store.create_token("alice")
    job_spec = small_spec(shards, "e2e-imbalanced", {"name": "noised_topk_imbalanced", "k": 3})
    sweep_spec = {
        "train": small_spec(shards, "e2e-sweep", {"name": "noised_topk", "k": 3}),
        "search": {"loss.epsilon": {"grid": [0.5, 1.0]}},
        "metric": "val_top3",
        "scheduler": {"name": "fifo"},
        "max_concurrent_trials": 1,
    }
    with client_for(server, token) as http:
        job = http.post("/v1/jobs", json=job_spec)
        assert job.status_code == 201, job.text
        sweep = http.post("/v1/sweeps", json=sweep_spec)
        assert sweep.status_code == 201, sweep.text
        done = wait_terminal(http, "jobs", job.json()["id"], 400)
        logs = http.get(f"/v1/jobs/{done['id']}/logs").text
        assert done["status"] == "succeeded", (done["status_reason"], logs[-3000:])
        epochs = http.get(f"/v1/jobs/{done['id']}/metrics").json()["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        for epoch in epochs:
            for key in ("val_top1", "val_top3", "val_macro_top3"):
                assert 0.0 <= epoch[key] <= 1.0
            assert epoch["val_top1"] <= epoch["val_top3"]
            assert math.isfinite(epoch["train_loss"])
        assert done["latest_metrics"] == epochs[-1]
        assert done["result"]["status"] == "succeeded"

        swept = wait_terminal(http, "sweeps", sweep.json()["id"], 400)
        assert swept["status"] == "succeeded", swept["status_reason"]
        assert len(swept["trials"]) == 2
        assert sorted(t["params"]["loss.epsilon"] for t in swept["trials"]) == [0.5, 1.0]
        assert swept["best_params"]["loss.epsilon"] in (0.5, 1.0)
        assert swept["best_config"]["loss"]["epsilon"] == swept["best_params"]["loss.epsilon"]

    # the command line against the same server
    env = {"TOPK_URL": server.url, "TOPK_TOKEN": token, "PATH": str(Path(sys.executable).parent)}
    topk = [sys.executable, "-m", "service.cli"]
    listing = subprocess.run([*topk, "status"], env=env, cwd=REPO, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert done["id"] in listing.stdout and "succeeded" in listing.stdout
    shown = subprocess.run([*topk, "sweeps", "status", swept["id"]], env=env, cwd=REPO,
                           capture_output=True, text=True)  # fmt: skip
    assert shown.returncode == 0 and "loss.epsilon" in shown.stdout, shown.stderr
