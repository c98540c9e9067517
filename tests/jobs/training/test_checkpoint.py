"""Checkpoint state round trips (weights_only loading) and the run's storage files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jobs.contract.run_files import MetricsLog, check_run_name, normalize_root, ray_storage
from jobs.training.checkpoint import (
    TrainingState,
    load_training_state,
    save_rng_state,
    save_training_state,
)
from jobs.training.loop import build_optimizer, build_scheduler


def _setup(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    optimizer = build_optimizer(model, name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, name="cosine", epochs=5, steps_per_epoch=3)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    loss = model(torch.randn(6, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_a_restored_state_continues_exactly_like_the_original(tmp_path):
    model, optimizer, scheduler = _setup(0)
    for _ in range(4):
        _step(model, optimizer, scheduler)
    save_training_state(
        tmp_path,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=TrainingState(epoch=3, best_metric=0.75, best_epoch=2),
    )
    save_rng_state(tmp_path, rank=0)
    expected_draws = (torch.rand(3), np.random.rand(), random.random())
    _step(model, optimizer, scheduler)
    expected_weights = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    other, other_optimizer, other_scheduler = _setup(1)
    state = load_training_state(
        tmp_path, model=other, optimizer=other_optimizer, scheduler=other_scheduler, rank=0
    )
    assert state == TrainingState(epoch=3, best_metric=0.75, best_epoch=2)
    draws = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    assert other_scheduler.last_epoch == scheduler.last_epoch - 1
    _step(other, other_optimizer, other_scheduler)  # same RNG -> same batch as the original
    for mine, theirs in zip(other.parameters(), expected_weights, strict=True):
        assert torch.allclose(mine, theirs)


def test_a_checkpoint_without_state_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no state.pt"):
        load_training_state(tmp_path, model=nn.Linear(2, 2))


class _Gadget:
    pass


def test_state_files_holding_objects_are_refused(tmp_path):
    torch.save({"format_version": 1, "model": _Gadget()}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_training_state(tmp_path, model=nn.Linear(2, 2))


def test_metrics_log_drops_epochs_after_the_resumed_checkpoint(tmp_path):
    url = str(tmp_path / "run" / "metrics.jsonl")
    log = MetricsLog(url, keep_through_epoch=0)
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "train_loss": 1.0 / epoch})
    resumed = MetricsLog(url, keep_through_epoch=2)  # epoch 3's checkpoint was lost
    resumed.append({"epoch": 3, "train_loss": 0.25})
    lines = [json.loads(line) for line in Path(url).read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] == 0.25


def test_run_names_are_single_safe_path_segments():
    assert check_run_name("job-0001_a.b") == "job-0001_a.b"
    for bad in ["", "../up", "a/b", ".hidden", "x" * 129, "sp ace"]:
        with pytest.raises(ValueError, match="run name"):
            check_run_name(bad)


def test_storage_roots_for_ray(tmp_path):
    assert normalize_root(str(tmp_path)) == str(tmp_path)
    assert normalize_root(f"file://{tmp_path}") == str(tmp_path)
    assert ray_storage(str(tmp_path)) == (str(tmp_path), None)
    assert ray_storage("s3://bucket/runs") == ("s3://bucket/runs", None)
    path, filesystem = ray_storage("memory://runs/root")
    assert path.endswith("runs/root") and filesystem is not None
    with pytest.raises(ValueError):
        normalize_root("ftp://host/runs")
