"""The training loop's GPU path, tested on the CPU: what decides the device, the memory format,
the process-group backend and the batch placement, and the loop's promise not to read a value
back from the device in the steady state (counted here as `aten._local_scalar_dense` calls, the
op behind `.item()`, `bool(tensor)` and `float(tensor)`: on CUDA each is a host sync)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from jobs.contract.run_files import read_metrics
from jobs.contract.train import TrainSpec
from jobs.training.checkpoint import unwrap
from jobs.training.loop import (
    DevicePrefetcher,
    evaluate,
    train_one_epoch,
    use_channels_last,
)
from jobs.training.run import run_training_in_process, scaling_config, torch_backend
from jobs.training.session import LocalSession
from topk.metrics import topk_counts


class HostReads(TorchDispatchMode):
    """Counts the ops that copy one tensor value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class CrossEntropy(nn.Module):
    """A loss with the loop's calling convention that reads nothing back itself."""

    def forward(self, scores, labels, generator=None):
        return F.cross_entropy(scores, labels)


class NaNFrom(nn.Module):
    """Cross-entropy until call `bad_call` (1-based), NaN from then on."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, scores, labels, generator=None):
        self.calls += 1
        loss = F.cross_entropy(scores, labels)
        return loss * float("nan") if self.calls >= self.bad_call else loss


def _batches(steps: int, batch: int = 8, classes: int = 5, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 1, 8, 8, generator=rng),
            torch.randint(0, classes, (batch,), generator=rng),
        )
        for _ in range(steps)
    ]


def _model(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, classes))


def _host_reads(steps: int, check_every: int) -> int:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with HostReads() as reads:
        train_one_epoch(model, _batches(steps), CrossEntropy(), optimizer, check_every=check_every)
    return reads.count


def test_the_steady_state_step_reads_nothing_back_from_the_device():
    few, many = _host_reads(5, check_every=1000), _host_reads(40, check_every=1000)
    assert few == many  # a constant per epoch (the end-of-epoch check and totals), not per step
    assert many <= 3
    # The non-finite check is read every `check_every` steps: 40 steps, every 10 -> 4 more.
    assert _host_reads(40, check_every=10) == many + 4


@pytest.mark.parametrize(
    ("bad_call", "check_every", "up_to"), [(3, 4, 4), (9, 4, 10), (2, 100, 10)]
)
def test_a_non_finite_loss_stops_the_epoch_within_check_every_steps(bad_call, check_every, up_to):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = NaNFrom(bad_call)
    with pytest.raises(FloatingPointError, match=f"non-finite .* up to step {up_to} of"):
        train_one_epoch(model, _batches(10), loss, optimizer, check_every=check_every)
    assert loss.calls == up_to  # no step beyond the check that caught it


def test_the_prefetcher_yields_the_loaders_batches_in_order_on_the_cpu():
    batches = _batches(4)
    seen = list(DevicePrefetcher(batches, "cpu"))
    assert len(seen) == 4
    for (images, labels), (expected_images, expected_labels) in zip(seen, batches, strict=True):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    (images, _), *_ = DevicePrefetcher(batches, "cpu", channels_last=True)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, batches[0][0])
    assert len(DevicePrefetcher(batches, "cpu")) == 4


def test_channels_last_only_for_convolutions_on_cuda():
    conv, mlp = _model(), nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    assert use_channels_last(torch.device("cuda"), conv)  # decided without a GPU present
    assert use_channels_last("cuda:1", conv)
    assert not use_channels_last("cpu", conv)
    assert not use_channels_last("cuda", mlp)


def _reference_counts(scores: np.ndarray, labels: np.ndarray, k: int, classes: int):
    """Per-class top-k hits written from the definition: a hit when fewer than k other classes
    score at least as high as the label; a row with a non-finite score is a miss."""
    hits = np.zeros(classes, dtype=np.int64)
    for row, label in zip(scores, labels, strict=True):
        if not np.all(np.isfinite(row)):
            continue
        higher = sum(1 for c in range(classes) if c != label and row[c] >= row[label])
        hits[label] += int(higher < k)
    return hits


def test_device_counts_match_the_definition_and_never_count_a_nan_row_as_a_hit():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(64, 7)).astype(np.float32)
    scores[5, :] = np.nan  # a NaN row: every comparison is false, so a naive count calls it a hit
    scores[9, 2] = np.inf
    labels = rng.integers(0, 7, size=64)
    counts = topk_counts(
        torch.from_numpy(scores), torch.from_numpy(labels), [1, 3], check_values=False
    )
    for row, k in enumerate((1, 3)):
        assert counts.hits[row].tolist() == _reference_counts(scores, labels, k, 7).tolist()
    assert counts.support.tolist() == np.bincount(labels, minlength=7).tolist()
    with pytest.raises(ValueError):  # the checked path still refuses them
        topk_counts(torch.from_numpy(scores), torch.from_numpy(labels), [1])


def test_evaluate_counts_every_sample_once_and_returns_host_counts():
    model = _model(5).eval()
    batches = _batches(3, batch=16)
    counts = evaluate(model, batches, [1, 2], 5, device="cpu", channels_last=True)
    with torch.no_grad():
        scores = torch.cat([model(images) for images, _ in batches]).numpy()
    labels = torch.cat([labels for _, labels in batches]).numpy()
    assert counts.hits.device.type == "cpu"
    for row, k in enumerate((1, 2)):
        assert counts.hits[row].tolist() == _reference_counts(scores, labels, k, 5).tolist()


def _spec(**scaling) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "data": {
                "train": "s3://bucket/d/train-{0..1}.tar",
                "val": "s3://bucket/d/val-0.tar",
                "num_classes": 10,
            },
            "scaling": scaling,
        }
    )


def test_gpu_workers_use_nccl_one_gpu_each_and_the_accelerator_type_asked():
    gpu = _spec(num_workers=8, use_gpu=True, accelerator_type="H100")
    assert torch_backend(gpu) == "nccl"
    config = scaling_config(gpu)
    assert config.num_workers == 8 and config.use_gpu
    assert config.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert config.accelerator_type == "H100"
    cpu = _spec(num_workers=2, accelerator_type="H100")
    assert torch_backend(cpu) == "gloo"
    assert scaling_config(cpu).accelerator_type is None  # only with use_gpu
    assert scaling_config(cpu).resources_per_worker == {"CPU": 1.0}
    with pytest.raises(ValueError, match="accelerator_type"):
        _spec(use_gpu=True, accelerator_type="H100; rm -rf /")


def test_local_sessions_take_the_gpu_when_there_is_one():
    session = LocalSession("/tmp/unused", select=None, mode="max", keep=1)
    assert session.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    forced = LocalSession("/tmp/unused", select=None, mode="max", keep=1, device="cpu")
    assert forced.device == torch.device("cpu")


def test_unwrap_sees_through_compile_and_ddp_style_wrappers():
    model = _model()
    compiled = torch.compile(model)  # wrapping only: nothing compiles until the first call
    assert unwrap(compiled) is model
    assert set(unwrap(compiled).state_dict()) == set(model.state_dict())


def test_a_compiled_model_trains_checkpoints_and_resumes(omniglot_dataset, omniglot_spec, tmp_path):
    spec = TrainSpec.model_validate(
        omniglot_spec(
            omniglot_dataset,
            epochs=1,
            scaling={"num_workers": 1},
            model={"arch": "convnet_small", "compile": True},
        )
    )
    first = run_training_in_process(spec, "run", storage=str(tmp_path))
    assert first["status"] == "succeeded"
    longer = spec.model_copy(update={"epochs": 2})
    second = run_training_in_process(longer, "run", storage=str(tmp_path))
    history = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [e["epoch"] for e in history] == [1, 2]
    assert history[1]["resumed_from_epoch"] == 1
    assert second["status"] == "succeeded"
