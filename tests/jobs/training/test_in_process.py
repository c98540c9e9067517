"""In-process training (the experiment runner's path) runs the Ray Train worker's loop: the
same seeded spec gives the same per-epoch metrics both ways; its checkpoints keep the best and
the latest, and an interrupted run resumes from the latest."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.contract.run_files import read_metrics
from jobs.contract.train import SpecError, TrainSpec, reported_metrics
from jobs.training.run import run_training, run_training_in_process
from jobs.training.session import LocalSession


def _small_spec(omniglot_spec, dataset_url, **overrides) -> TrainSpec:
    spec = omniglot_spec(
        dataset_url,
        epochs=2,
        scaling={"num_workers": 1},
        model={"arch": "convnet_small"},
        **overrides,
    )
    return TrainSpec.model_validate(spec)


def _with_gpu(spec: TrainSpec) -> TrainSpec:
    return spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"use_gpu": True})})


METRIC_KEYS = ("train_loss", "val_top1", "val_top5", "val_macro_top5", "samples", "lr")


def test_in_process_run_matches_the_ray_train_run(
    ray_cluster, omniglot_dataset, omniglot_spec, tmp_path
):
    spec = _small_spec(omniglot_spec, omniglot_dataset)
    torch.set_num_threads(1)  # Ray's worker runs with 1 thread; the sums then agree exactly
    via_ray = run_training(spec, "ray-run", storage=str(tmp_path))
    local = run_training_in_process(spec, "local-run", storage=str(tmp_path))

    ray_history = read_metrics(str(tmp_path / "ray-run" / "metrics.jsonl"))
    local_history = read_metrics(str(tmp_path / "local-run" / "metrics.jsonl"))
    assert [e["epoch"] for e in local_history] == [1, 2]
    for ray_epoch, local_epoch in zip(ray_history, local_history, strict=True):
        for key in METRIC_KEYS:
            assert local_epoch[key] == pytest.approx(ray_epoch[key], rel=1e-4, abs=1e-6), key
    assert local["status"] == via_ray["status"] == "succeeded"
    assert local["best_epoch"] == via_ray["best_epoch"]
    result = json.loads((tmp_path / "local-run" / "result.json").read_text())
    assert result["best"]["val_top5"] == local_history[local["best_epoch"] - 1]["val_top5"]
    # the names the spec's validation lets metrics.select choose from are the ones reported
    assert set(reported_metrics(spec.metrics.ks, has_val=True)) <= set(local_history[0])


def test_in_process_run_resumes_and_keeps_best_and_latest(
    omniglot_dataset, omniglot_spec, tmp_path
):
    first = _small_spec(omniglot_spec, omniglot_dataset)
    run_training_in_process(first, "run", storage=str(tmp_path))
    longer = first.model_copy(update={"epochs": 4})
    result = run_training_in_process(longer, "run", storage=str(tmp_path))

    history = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]
    assert [e["resumed_from_epoch"] for e in history] == [None, None, 2, 2]
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint_epoch_*"))
    best = max(history, key=lambda e: e["val_top5"])["epoch"]  # earliest on a tie
    assert result["best_epoch"] == best
    assert kept == sorted({f"checkpoint_epoch_{best:04d}", "checkpoint_epoch_0004"})


def test_local_session_ranks_ties_by_the_earliest_epoch(tmp_path):
    session = LocalSession(str(tmp_path), select="val_top5", mode="max", keep=1)
    for epoch, score in [(1, 0.2), (2, 0.5), (3, 0.5), (4, 0.4)]:
        staged = tmp_path / f"stage{epoch}"
        staged.mkdir()
        (staged / "state.pt").write_bytes(b"x")
        with (tmp_path / "metrics.jsonl").open("a") as log:  # the loop logs before it reports
            log.write(json.dumps({"epoch": epoch, "val_top5": score}) + "\n")
        session.report({"val_top5": score}, str(staged), epoch)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint_epoch_*"))
    assert names == ["checkpoint_epoch_0002", "checkpoint_epoch_0004"]
    with session.resume_directory() as directory:
        assert directory.endswith("checkpoint_epoch_0004")


def test_local_session_without_a_metric_keeps_the_latest(tmp_path):
    session = LocalSession(str(tmp_path), select=None, mode="max", keep=2)
    for epoch in range(1, 5):
        staged = tmp_path / f"stage{epoch}"
        staged.mkdir()
        (staged / "state.pt").write_bytes(b"x")
        session.report({"train_loss": 1.0 / epoch}, str(staged), epoch)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint_epoch_*"))
    assert names == ["checkpoint_epoch_0003", "checkpoint_epoch_0004"]


def test_in_process_training_refuses_what_it_cannot_run(omniglot_dataset, omniglot_spec, tmp_path):
    spec = TrainSpec.model_validate(omniglot_spec(omniglot_dataset, scaling={"num_workers": 2}))
    with pytest.raises(ValueError, match="one worker: set scaling.num_workers 1, got 2"):
        run_training_in_process(spec, "run", storage=str(tmp_path))
    single = _small_spec(omniglot_spec, omniglot_dataset)
    with pytest.raises(ValueError, match="local storage root"):
        run_training_in_process(single, "run", storage="s3://bucket/runs")
    on_gpu = _with_gpu(single)
    with pytest.raises(
        ValueError, match="^scaling.use_gpu: in-process training would run on the CPU"
    ):
        run_training_in_process(on_gpu, "run", storage=str(tmp_path), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^scaling.use_gpu"):
            run_training_in_process(on_gpu, "run", storage=str(tmp_path))  # auto finds no GPU
        with pytest.raises(ValueError, match="^device=cuda asks for a GPU"):
            run_training_in_process(single, "run", storage=str(tmp_path), device="cuda")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_spec_with_unresolved_class_counts_is_refused_before_anything_is_written(
    omniglot_spec, tmp_path
):
    """The process that starts a run resolves its spec once (jobs.cli.load_spec, the experiment
    runner); the launchers take it as it is and refuse one left unresolved."""
    raw = omniglot_spec(str(tmp_path / "data" / "dataset.json"), scaling={"num_workers": 1})
    raw["loss"] = {"name": "ldam"}
    spec = TrainSpec.model_validate(raw)
    with pytest.raises(SpecError, match="^loss.class_counts: loss 'ldam' needs class counts"):
        run_training_in_process(spec, "run", storage=str(tmp_path / "runs"))
    with pytest.raises(SpecError, match="^loss.class_counts"):
        run_training(spec, "run", storage=str(tmp_path / "runs"))
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_in_process_run_trains_on_the_gpu_when_there_is_one(
    omniglot_dataset, omniglot_spec, tmp_path
):
    spec = _with_gpu(_small_spec(omniglot_spec, omniglot_dataset))
    result = run_training_in_process(spec, "gpu-run", storage=str(tmp_path))
    assert result["status"] == "succeeded" and result["epochs"] == 2
    assert torch.cuda.max_memory_allocated() > 0  # the model and batches were on the GPU
