"""Another Ray cluster on the machine: a real training job (`python -m jobs train`, two Ray Train
workers, real shards) submitted to a server on one of two local Ray heads runs on that head, and
nothing of it looks for "the" cluster on the machine (Ray Train's own actors failed with
"ConnectionError: Found multiple active Ray instances"). Its logs through `topk logs`, piped,
are plain text, and the workers' lines come before the run's result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from service_harness import client_for

from service.local_ray import LocalRayHead

TOPK = Path(sys.executable).with_name("topk")
NUM_CLASSES = 4


def synthetic_shards(out: Path) -> Path:
    """48 8x8 grey images of 4 classes, as shards with dataset.json (no download, no source
    data needed)."""
    from jobs.data.sources import ImageSource
    from jobs.data.writer import build_shards

    labels = np.arange(48) % NUM_CLASSES
    source = ImageSource(
        "synthetic",
        [f"c{i}" for i in range(NUM_CLASSES)],
        labels,
        [f"img{i}" for i in range(len(labels))],
        lambda i: np.full((8, 8), 40 * int(labels[i]) + i % 7, dtype=np.uint8),
    )
    build_shards(source, str(out), seed=0, val_fraction=0.25, progress=None)
    return out / "dataset.json"


@pytest.mark.slow
def test_a_job_runs_on_its_own_cluster_while_another_ray_runs(make_server, ray_head, tmp_path):
    assert ray_head.answers()  # the other cluster: the session's head, up for the whole test
    ours = LocalRayHead(4, log_path=tmp_path / "ours.log")
    ours.start()
    try:
        dataset = synthetic_shards(tmp_path / "shards")
        spec = {
            "name": "two-clusters",
            "data": {"train": str(dataset), "val": str(dataset), "num_classes": NUM_CLASSES,
                     "image_size": 8, "channels": 1, "loader_workers": 0, "shuffle_buffer": 0,
                     "augment": {"random_resized_crop": False, "hflip": False}},
            "model": {"arch": "convnet_small"},
            "loss": {"name": "cross_entropy"},
            "epochs": 1,
            "batch_size": 8,
            "metrics": {"ks": [1, 2], "select": "val_top2"},
            "scaling": {"num_workers": 2},
        }  # fmt: skip
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        server, store = make_server(
            env=ours.auth_env, ray_address=ours.dashboard_url, job_python=sys.executable
        )
        server.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOPK_", "RAY_"))}
        env.update(TOPK_URL=server.url, TOPK_TOKEN=store.create_token("alice"))

        def topk(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [str(TOPK), *args], env=env, capture_output=True, text=True, timeout=600
            )

        submitted = topk("submit", str(spec_file), "--wait")
        job_id = submitted.stdout.split()[1]
        with client_for(server, env["TOPK_TOKEN"]) as http:
            raw = http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 0}).text
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr + raw[-4000:]
        assert "multiple active Ray instances" not in raw, raw[-4000:]

        # it ran on our head, and only there
        from ray.job_submission import JobSubmissionClient

        def submissions(head: LocalRayHead) -> set[str]:
            client = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)
            return {job.submission_id for job in client.list_jobs()}

        assert f"{job_id}-1" in submissions(ours)
        assert f"{job_id}-1" not in submissions(ray_head)

        # `topk logs`, piped: no colour codes (Ray's worker prefixes carry them in the raw log)
        assert "\x1b[" in raw
        logs = topk("logs", job_id, "--tail", "0")
        assert logs.returncode == 0, logs.stderr
        assert "\x1b" not in logs.stdout
        lines = logs.stdout.splitlines()
        workers = [i for i, line in enumerate(lines) if line.startswith("(RayTrainWorker")]
        assert workers, logs.stdout[-4000:]
        # the run's result is the driver's last word: every worker line comes before it
        result_start = max(i for i, line in enumerate(lines) if line == "{")
        assert max(workers) < result_start, "\n".join(lines[max(workers) - 5 :])
        result = json.loads("\n".join(lines[result_start : lines.index("}", result_start) + 1]))
        assert result["run"] == job_id and result["status"] == "succeeded"

        # the list view names the cluster's dashboard (GET /v1/info)
        listed = topk("status")
        assert listed.returncode == 0, listed.stderr
        assert f"Ray dashboard: {ours.dashboard_url}" in listed.stdout
    finally:
        ours.stop()
