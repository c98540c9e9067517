"""Run storage on S3 (a real moto server): the service writes spec.json and reads the runtime's
metrics.jsonl / result.json through fsspec, as it does against object storage in production."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from service_harness import ServerProcess, client_for, tiny_spec

from jobs.contract import run_files
from service.local_ray import free_port
from service.store import Store


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {key: os.environ.get(key) for key in aws}
    os.environ.update(aws)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("topk-runs")
    try:
        yield aws
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
        process.terminate()
        process.wait(10)


def test_spec_metrics_and_result_round_trip_through_s3(s3_endpoint):
    import s3fs

    root = "s3://topk-runs/prod"
    url = run_files.write_spec(root, "job-abc", {"epochs": 3})
    assert url == "s3://topk-runs/prod/job-abc/spec.json"
    fs = s3fs.S3FileSystem()
    assert json.loads(fs.cat("topk-runs/prod/job-abc/spec.json")) == {"epochs": 3}
    assert run_files.read_run_metrics(root, "job-abc") == []
    assert run_files.read_run_json(root, "job-abc", "result.json") is None
    fs.pipe("topk-runs/prod/job-abc/metrics.jsonl", b'{"epoch": 1, "val_top5": 0.5}\n{"epo')
    fs.pipe("topk-runs/prod/job-abc/result.json", b'{"status": "succeeded", "epochs": 1}')
    assert run_files.read_run_metrics(root, "job-abc") == [{"epoch": 1, "val_top5": 0.5}]
    assert run_files.read_run_json(root, "job-abc", "result.json")["status"] == "succeeded"


def test_the_api_serves_metrics_from_s3_storage(s3_endpoint, tmp_path):
    import s3fs

    store = Store.from_url(f"sqlite:///{tmp_path / 'topk.db'}")
    store.migrate()
    token = store.create_token("sam")
    env = {"TOPK_DATA_DIR": str(tmp_path), "TOPK_LAUNCH_MODE": "hold",
           "TOPK_STORAGE_URL": "s3://topk-runs/api", **s3_endpoint}  # fmt: skip
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        with client_for(server, token) as http:
            job = http.post("/v1/jobs", json=tiny_spec("s3")).json()
            assert job["storage"] == f"s3://topk-runs/api/{job['id']}/"
            s3fs.S3FileSystem().pipe(
                f"topk-runs/api/{job['id']}/metrics.jsonl", b'{"epoch": 1, "train_loss": 0.7}\n'
            )
            epochs = http.get(f"/v1/jobs/{job['id']}/metrics").json()["epochs"]
            assert epochs == [{"epoch": 1, "train_loss": 0.7}]
            refused = http.post("/v1/jobs", json=tiny_spec(storage="ftp://elsewhere/runs"))
            assert refused.status_code == 422
            assert refused.json()["errors"][0]["field"] == "storage"
    finally:
        server.stop()
        store.close()
