"""Shared fixtures: real shards written once per session from Omniglot, Fashion-MNIST, and a
synthetic set whose images encode their own sample id (for exact coverage checks)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reference_data import ID_CLASSES, id_image, require_fashion_mnist, require_omniglot


@pytest.fixture(scope="session")
def omniglot_dataset(tmp_path_factory) -> Path:
    """All of the Omniglot zip (136 classes x 20), original PNG bytes, uneven 300-sample shards."""
    from jobs.data.writer import build_shards

    out = tmp_path_factory.mktemp("omniglot")
    build_shards(str(require_omniglot()), str(out), seed=1, shard_max_samples=300, progress=None)
    return out


@pytest.fixture(scope="session")
def fashion_dataset(tmp_path_factory) -> Path:
    """Fashion-MNIST, 60 per class, long-tailed train (ratio 10, exp), balanced val and test."""
    from jobs.data.writer import build_shards

    out = tmp_path_factory.mktemp("fashion")
    build_shards(
        str(require_fashion_mnist()),
        str(out),
        seed=3,
        max_per_class=60,
        val_fraction=0.2,
        test_fraction=0.1,
        imbalance_ratio=10.0,
        imbalance_profile="exp",
        shard_max_samples=37,
        progress=None,
    )
    return out


@pytest.fixture(scope="session")
def id_dataset(tmp_path_factory) -> Path:
    """300 synthetic 8x8 samples whose pixels encode their id; label = id % 5; val = half;
    shards of 7 samples (the last one shorter)."""
    from jobs.data.sources import ImageSource
    from jobs.data.writer import build_shards

    count = 300
    labels = np.arange(count) % ID_CLASSES
    source = ImageSource(
        "ids",
        [f"c{i}" for i in range(ID_CLASSES)],
        labels,
        [str(i) for i in range(count)],
        id_image,
    )
    out = tmp_path_factory.mktemp("ids")
    build_shards(
        source,
        str(out),
        seed=0,
        val_fraction=0.5,
        image_format="png",
        shard_max_samples=7,
        progress=None,
    )
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """A real S3-compatible server process (moto) on a free port; yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("moto server did not start")
    try:
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """Point botocore (s3fs) at the moto server; DataLoader workers inherit the environment."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3fs.S3FileSystem()
    s3fs.S3FileSystem.clear_instance_cache()
