"""The plain-PyTorch loop: schedules, optimisers, a learning epoch, exact (distributed) eval."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from jobs.training.loop import (
    build_optimizer,
    build_scheduler,
    evaluate,
    lr_factor,
    train_one_epoch,
)
from topk import create_loss


def test_lr_factor_schedules():
    assert lr_factor(7.3, name="constant", epochs=10) == 1.0
    assert lr_factor(0.0, name="step", epochs=90, step_size=30, gamma=0.1) == 1.0
    assert lr_factor(29.9, name="step", epochs=90, step_size=30, gamma=0.1) == 1.0
    assert lr_factor(30.0, name="step", epochs=90, step_size=30, gamma=0.1) == pytest.approx(0.1)
    assert lr_factor(65.0, name="step", epochs=90, step_size=30, gamma=0.1) == pytest.approx(0.01)
    assert lr_factor(0.0, name="cosine", epochs=10) == pytest.approx(1.0)
    assert lr_factor(5.0, name="cosine", epochs=10) == pytest.approx(0.5)
    assert lr_factor(10.0, name="cosine", epochs=10) == pytest.approx(0.0, abs=1e-12)
    # warmup: linear up to 1 over 2 epochs, then a cosine over the 8 that remain
    assert lr_factor(1.0, name="cosine", epochs=10, warmup_epochs=2) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(6.0, name="cosine", epochs=10, warmup_epochs=2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0.0, name="linear", epochs=10)


def test_scheduler_steps_per_batch():
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, name="sgd", lr=1.0)
    scheduler = build_scheduler(optimizer, name="cosine", epochs=2, steps_per_epoch=4)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * (1 + math.cos(math.pi * step / 8)) for step in range(8)]
    assert seen == pytest.approx(expected)


def test_optimizers_and_weight_decay_groups():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    sgd = build_optimizer(model, name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    decayed, plain = sgd.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and decayed["weight_decay"] == 5e-4
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, name="adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, name="rmsprop", lr=0.1)


def _blobs(num_classes: int, per_class: int, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centers[labels] + torch.randn(len(labels), dim, generator=generator)
    return points, labels


def _batches(points, labels, batch_size):
    return [
        (points[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


@pytest.mark.parametrize(
    "loss_name, params",
    [("cross_entropy", {}), ("noised_topk", {"k": 2, "epsilon": 0.5, "n_samples": 3})],
)
def test_an_epoch_learns_and_reports_the_mean_loss(loss_name, params):
    torch.manual_seed(0)
    points, labels = _blobs(num_classes=6, per_class=40)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    batches = _batches(points[order], labels[order], 16)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 6))
    loss_fn = create_loss(loss_name, **params)
    optimizer = build_optimizer(model, name="sgd", lr=0.05)
    generator = torch.Generator().manual_seed(3)
    first = train_one_epoch(model, batches, loss_fn, optimizer, generator=generator)
    for _ in range(5):
        last = train_one_epoch(model, batches, loss_fn, optimizer, generator=generator)
    assert first.samples == last.samples == len(labels)
    assert last.train_loss < 0.5 * first.train_loss
    assert last.samples_per_second > 0
    counts = evaluate(model, batches, [1, 2], 6)
    assert counts.accuracy(2) > 0.9  # the top-2 loss only asks for the label among 2 guesses


def test_the_noise_generator_makes_epochs_reproducible():
    points, labels = _blobs(num_classes=6, per_class=10)
    batches = _batches(points, labels, 20)
    loss_fn = create_loss("noised_topk", k=2, epsilon=1.0, n_samples=2)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Linear(8, 6)
        optimizer = build_optimizer(model, name="sgd", lr=0.1)
        generator = torch.Generator().manual_seed(42)
        train_one_epoch(model, batches, loss_fn, optimizer, generator=generator)
        weights.append(model.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_a_non_finite_loss_stops_the_epoch():
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    optimizer = build_optimizer(model, name="sgd", lr=0.1)
    batches = [(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))]
    with pytest.raises((FloatingPointError, ValueError)):
        train_one_epoch(model, batches, create_loss("cross_entropy"), optimizer)


def _reference_accuracies(scores, labels, k):
    """Top-k accuracy and macro top-k recall, straight from the definition."""
    hits = [
        int(labels[i]) in scores[i].argsort(descending=True)[:k].tolist()
        for i in range(len(labels))
    ]
    per_class = {}
    for hit, label in zip(hits, labels.tolist(), strict=True):
        per_class.setdefault(label, []).append(hit)
    macro = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    return sum(hits) / len(hits), macro


class _FixedScores(nn.Module):
    """A 'model' whose scores are a lookup table indexed by the input id."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return self.table[ids.long().squeeze(-1)]


def test_evaluate_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 7, generator=generator)
    labels = torch.randint(0, 6, (50,), generator=generator)  # class 6 has no support
    ids = torch.arange(50).unsqueeze(-1)
    counts = evaluate(_FixedScores(scores), _batches(ids, labels, 8), [1, 3], 7)
    for k in (1, 3):
        accuracy, macro = _reference_accuracies(scores, labels, k)
        assert counts.accuracy(k) == pytest.approx(accuracy)
        assert counts.macro_accuracy(k) == pytest.approx(macro)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _eval_on_rank(rank, world_size, port, scores, labels, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        ids = torch.arange(len(labels)).unsqueeze(-1)
        mine = slice(rank, None, world_size)  # disjoint parts of unequal size per rank
        batches = _batches(ids[mine], labels[mine], 5)
        counts = evaluate(_FixedScores(scores), batches, [1, 3], scores.shape[1])
        figures = [counts.accuracy(1), counts.accuracy(3), counts.macro_accuracy(3)]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


def test_evaluate_sums_counts_exactly_across_ranks(tmp_path):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(23, 5, generator=generator)
    labels = torch.randint(0, 5, (23,), generator=generator)
    # spawned (never forked) processes: a fork would break a Ray driver in this test session
    mp.spawn(_eval_on_rank, args=(2, _free_port(), scores, labels, str(tmp_path)), nprocs=2)
    top1, _ = _reference_accuracies(scores, labels, 1)
    top3, macro3 = _reference_accuracies(scores, labels, 3)
    for rank in (0, 1):
        figures = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert figures == pytest.approx([top1, top3, macro3])
