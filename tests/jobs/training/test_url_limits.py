"""The URL limits (TOPK_ALLOWED_PROTOCOLS, TOPK_ALLOWED_ROOTS) bind a job's every read, not only
the spec it was submitted with: shards that a dataset.json inside the allowed roots names
outside them (`../outside/...`, an https URL) and pretrained weights outside them are refused,
by `python -m jobs train` before anything starts (exit 3, an invalid spec) and by the worker's
own loaders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from jobs.contract.train import TrainSpec
from jobs.models import build_model
from jobs.training.run import run_training_in_process

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """ROOT/allowed/data: real shards and dataset.json; ROOT/outside: copies of the training
    shards; ROOT/allowed/escape and ROOT/allowed/remote: dataset.json files inside the allowed
    root naming the training shards as ../../outside/<shard> and as https URLs."""
    from jobs.data.sources import ImageSource
    from jobs.data.writer import build_shards

    root = tmp_path_factory.mktemp("limits")
    labels = np.arange(48) % NUM_CLASSES
    source = ImageSource(
        "synthetic",
        [f"c{i}" for i in range(NUM_CLASSES)],
        labels,
        [f"img{i}" for i in range(len(labels))],
        lambda i: np.full((8, 8), 40 * int(labels[i]) + i % 7, dtype=np.uint8),
    )
    data = root / "allowed" / "data"
    build_shards(source, str(data), seed=0, val_fraction=0.25, shard_max_samples=20, progress=None)
    info = json.loads((data / "dataset.json").read_text())
    outside = root / "outside"
    outside.mkdir()
    for shard in info["splits"]["train"]["shards"]:
        (outside / shard["path"]).write_bytes((data / shard["path"]).read_bytes())
    for name, prefix in (("escape", "../../outside/"), ("remote", "https://example.com/shards/")):
        folder = root / "allowed" / name
        folder.mkdir()
        named = json.loads(json.dumps(info))
        for shard in named["splits"]["train"]["shards"]:
            shard["path"] = prefix + shard["path"]
        (folder / "dataset.json").write_text(json.dumps(named))
    return root


def _spec(root, train: str, **overrides) -> dict:
    spec = {
        "data": {
            "train": str(root / "allowed" / train),
            "val": str(root / "allowed" / "data"),
            "num_classes": NUM_CLASSES,
            "image_size": 8,
            "channels": 1,
            "augment": {"random_resized_crop": False, "hflip": False},
            "shuffle_buffer": 0,
            "loader_workers": 0,
        },
        "model": {"arch": "convnet_small"},
        "loss": {"name": "cross_entropy"},
        "epochs": 1,
        "batch_size": 8,
        "metrics": {"ks": [1, 2], "select": "val_top2"},
        "scaling": {"num_workers": 1},
    }
    spec.update(overrides)
    return spec


def _limits(root, protocols: str = "") -> dict[str, str]:
    env = {"TOPK_ALLOWED_ROOTS": str(root / "allowed")}
    if protocols:
        env["TOPK_ALLOWED_PROTOCOLS"] = protocols
    return env


def _python_m_jobs_train(root, spec: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    spec_file = root / "allowed" / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    return subprocess.run(
        [sys.executable, "-m", "jobs", "train", "--spec", str(spec_file), "--run-name", "run",
         "--storage", str(root / "allowed" / "runs")],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("train", "protocols", "reason"),
    [
        ("escape", "", "outside the allowed roots"),
        ("remote", "file", "protocol 'https' is not allowed"),
    ],
)
def test_python_m_jobs_refuses_shards_named_outside_the_limits_and_exits_3(
    datasets, train, protocols, reason
):
    done = _python_m_jobs_train(datasets, _spec(datasets, train), _limits(datasets, protocols))
    assert done.returncode == 3, done.stdout + done.stderr  # an invalid spec
    assert "Traceback" not in done.stderr
    assert "data.train: refused URL" in done.stderr and reason in done.stderr
    run = datasets / "allowed" / "runs" / "run"
    # nothing started; the refusal is the run's recorded failure, for the service to report
    assert sorted(path.name for path in run.iterdir()) == ["result.json"]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "failed" and "data.train: refused URL" in result["error"]
    (run / "result.json").unlink()
    run.rmdir()


def test_python_m_jobs_trains_on_ray_inside_the_limits_a_service_hands_it(datasets, tmp_path):
    """The limits as the service hands them: the data root plus the runs folder (elsewhere).
    The driver, the Ray Train worker and the run's files all stay inside them."""
    runs = tmp_path / "runs"
    env = {"TOPK_ALLOWED_ROOTS": f"{datasets / 'allowed'},{runs}", "TOPK_ALLOWED_PROTOCOLS": "file"}
    spec = _spec(datasets, "data")
    spec_file = runs / "run" / "spec.json"
    spec_file.parent.mkdir(parents=True)
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "jobs", "train", "--spec", str(spec_file), "--run-name", "run",
         "--storage", str(runs)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((runs / "run" / "result.json").read_text())
    assert result["status"] == "succeeded" and result["epochs"] == 1


@pytest.mark.parametrize(
    ("train", "protocols", "reason"),
    [
        ("escape", "", "outside the allowed roots"),
        ("remote", "file", "protocol 'https' is not allowed"),
    ],
)
def test_the_workers_loader_refuses_shards_named_outside_the_limits(
    datasets, tmp_path, monkeypatch, train, protocols, reason
):
    """The loop a Ray Train worker runs, here in process: the run fails with the reason and
    trains nothing."""
    for name, value in _limits(datasets, protocols).items():
        monkeypatch.setenv(name, value)
    spec = TrainSpec.model_validate(_spec(datasets, train))
    storage = datasets / "allowed" / f"runs-{train}"
    with pytest.raises(RuntimeError, match="refused URL") as caught:
        run_training_in_process(spec, "run", storage=str(storage))
    assert reason in str(caught.value)
    result = json.loads((storage / "run" / "result.json").read_text())
    assert result["status"] == "failed" and reason in result["error"]
    assert not (storage / "run" / "metrics.jsonl").exists()


def test_a_run_inside_the_limits_trains(datasets, monkeypatch):
    for name, value in _limits(datasets, "file").items():
        monkeypatch.setenv(name, value)
    spec = TrainSpec.model_validate(_spec(datasets, "data"))
    result = run_training_in_process(spec, "run", storage=str(datasets / "allowed" / "runs-ok"))
    assert result["status"] == "succeeded" and result["epochs"] == 1


def test_pretrained_weights_outside_the_roots_are_refused(datasets, tmp_path, monkeypatch):
    weights = tmp_path / "weights.pt"  # tmp_path is outside ROOT/allowed
    torch.save(build_model("convnet_small", NUM_CLASSES, in_channels=1).state_dict(), weights)
    inside = datasets / "allowed" / "weights.pt"
    inside.write_bytes(weights.read_bytes())
    monkeypatch.setenv("TOPK_ALLOWED_ROOTS", str(datasets / "allowed"))
    with pytest.raises(ValueError, match="outside the allowed roots"):
        build_model("convnet_small", NUM_CLASSES, in_channels=1, pretrained=str(weights))
    model = build_model("convnet_small", NUM_CLASSES, in_channels=1, pretrained=str(inside))
    assert isinstance(model, torch.nn.Module)
