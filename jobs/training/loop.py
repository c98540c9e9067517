"""The training loop in plain PyTorch: one epoch of training, an exact evaluation, and the
optimiser and learning-rate schedule builders. Testable without Ray; when a
`torch.distributed` process group is initialised, losses and metric counts are summed across
ranks so every rank returns the same figures.

On a GPU the steady-state step never waits for the host: the next batch is copied (or, with
data.decode "device", decoded) on a side stream while the current one computes
(`DevicePrefetcher`, from pinned memory), a non-finite loss is counted on the device and read
every `check_every` steps and at the end of the epoch, the epoch's loss is summed on the
device, and evaluation counts top-k hits on the device, read once per evaluation.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from topk.metrics import TopKCounts


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's trainable parameters.

    Weight decay skips biases and normalisation weights (1-D tensors): decaying them only hurts.
    Raises ValueError for an unknown name.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: adamw, sgd")


def lr_factor(
    epoch_progress: float,
    *,
    name: str,
    epochs: int,
    step_size: int = 30,
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """The multiplier of the base learning rate after `epoch_progress` epochs (a float >= 0).

    A linear warmup over `warmup_epochs`, then "constant", "step" (times `gamma` every
    `step_size` epochs) or "cosine" (half a cosine from 1 to 0 over the remaining epochs).
    """
    if warmup_epochs > 0 and epoch_progress < warmup_epochs:
        return (epoch_progress + 1e-3) / (warmup_epochs + 1e-3)
    if name == "constant":
        return 1.0
    if name == "step":
        return gamma ** math.floor(epoch_progress / step_size)
    if name == "cosine":
        span = max(epochs - warmup_epochs, 1e-9)
        progress = min(max((epoch_progress - warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {name!r}; valid choices: constant, cosine, step")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    epochs: int,
    steps_per_epoch: int,
    step_size: int = 30,
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following `lr_factor`; call `.step()` after every optimiser step."""
    lr_factor(0.0, name=name, epochs=epochs)  # raises early for an unknown name
    steps = max(int(steps_per_epoch), 1)

    def factor(step: int) -> float:
        return lr_factor(
            step / steps,
            name=name,
            epochs=epochs,
            step_size=step_size,
            gamma=gamma,
            warmup_epochs=warmup_epochs,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochStats:
    """What one training epoch measured: mean loss per sample (all ranks), samples seen on all
    ranks, wall seconds, and samples per second (all ranks)."""

    train_loss: float
    samples: int
    seconds: float
    samples_per_second: float


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when asked; a no-op on CPU (CPU autocast is slower here)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


DEFAULT_CHECK_EVERY = 100
"""Steps between two reads of the device-side non-finite-loss count (and at the epoch's end)."""


def use_channels_last(device: torch.device | str, model: nn.Module) -> bool:
    """Whether to train `model` in channels_last memory format on `device`: on CUDA, for a
    model with 2-D convolutions (cuDNN's NHWC kernels are faster there, with or without AMP);
    never on the CPU, where it gains nothing for these models."""
    return torch.device(device).type == "cuda" and any(
        isinstance(module, nn.Conv2d) for module in model.modules()
    )


class EncodedImages(Protocol):
    """A batch whose images are not yet model input: uint8 pixels of a GPU run (the data
    layer's `PixelBatch`) or JPEGs (data.decode "device": `JpegBatch`). `decode` returns
    (images [B, C, S, S] float, normalised, labels [B]) on `device`, with no read back to the
    host."""

    def decode(
        self, device: torch.device, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class DevicePrefetcher:
    """Batches of `loader` on `device`, one batch ahead.

    On CUDA the next batch's copy is issued on a side stream as soon as the current batch is
    handed out, so the host-to-device copy overlaps the current step (the copy is asynchronous
    only from pinned memory: build the loader with `pin_memory=True`); images are converted to
    `channels_last` when asked. Encoded images (`EncodedImages`) are decoded here, on the side
    stream too, so a GPU decodes the next batch while it trains on this one. On the CPU it is
    the loader itself (plus the decoding and the format change).
    """

    def __init__(
        self,
        loader: Iterable[tuple[torch.Tensor | EncodedImages, torch.Tensor]],
        device: torch.device | str,
        *,
        channels_last: bool = False,
    ):
        self.loader = loader
        self.device = torch.device(device)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _to_device(self, images: torch.Tensor | EncodedImages, labels: torch.Tensor):
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        else:  # data.decode "device": decoded here, on the side stream on CUDA
            images, labels = images.decode(self.device, labels)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for images, labels in self.loader:
                yield self._to_device(images, labels)
            return
        stream = torch.cuda.Stream(device=self.device)
        batches = iter(self.loader)

        def issue():
            try:
                images, labels = next(batches)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return self._to_device(images, labels)

        upcoming = issue()
        while upcoming is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            images, labels = upcoming
            # The tensors were made on the side stream: tell the allocator the main stream uses
            # them, so their memory is not reused before the step is done.
            images.record_stream(torch.cuda.current_stream(self.device))
            labels.record_stream(torch.cuda.current_stream(self.device))
            upcoming = issue()
            yield images, labels


def _raise_if_nonfinite(nonfinite: torch.Tensor, step: int) -> None:
    """Read the device-side count of non-finite losses (one host sync); raise if any."""
    bad = int(nonfinite.item())
    if bad:
        raise FloatingPointError(
            f"the training loss became non-finite (nan or inf) in {bad} step(s) up to step "
            f"{step} of this epoch; lower optim.lr or check the data"
        )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    amp: bool = False,
    max_grad_norm: float | None = None,
    channels_last: bool = False,
    check_every: int = DEFAULT_CHECK_EVERY,
) -> EpochStats:
    """Train `model` for one pass over `loader` (images [B, C, S, S], labels [B] long).

    `loss_fn(scores, labels, generator=generator)` gets float32 scores even under AMP (the
    stochastic losses draw and select in float32). The scheduler steps once per batch. Under DDP
    every rank must see the same number of batches (the data pipeline guarantees it).

    No step reads a value back from the device: a non-finite loss is counted on the device and
    the count is read every `check_every` steps and at the end, raising FloatingPointError (the
    run stops at most `check_every` steps after the loss went bad).
    """
    device = torch.device(device)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    start = time.perf_counter()
    step = 0
    for step, (images, labels) in enumerate(
        DevicePrefetcher(loader, device, channels_last=channels_last), start=1
    ):
        with _autocast(device, amp):
            scores = model(images)
        loss = loss_fn(scores.float(), labels, generator=generator)
        nonfinite += (~torch.isfinite(loss.detach())).to(torch.int64)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().double() * labels.numel()
        samples += labels.numel()
        if step % check_every == 0:
            _raise_if_nonfinite(nonfinite, step)
    _raise_if_nonfinite(nonfinite, step)
    seconds = time.perf_counter() - start
    totals = torch.stack([loss_sum, samples])
    if _is_distributed():
        dist.all_reduce(totals)
    loss_total, sample_total = totals.tolist()
    return EpochStats(
        train_loss=loss_total / max(sample_total, 1.0),
        samples=int(sample_total),
        seconds=seconds,
        samples_per_second=sample_total / max(seconds, 1e-9),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ks: list[int],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
) -> TopKCounts:
    """Per-class top-k hit counts over every sample of `loader`, summed across DDP ranks.

    Each rank passes its own disjoint part of the validation split (the eval loader splits it),
    so the sum counts every sample exactly once. Ranks that get no batch still take part in the
    all_reduce. The counts accumulate on `device` and come back to the host once; on a GPU a
    sample whose scores are not finite counts as a miss (on the CPU it is a ValueError).
    """
    from topk.metrics import TopKCounts, topk_counts

    device = torch.device(device)
    model.eval()
    counts = TopKCounts.zeros(num_classes, ks).to(device)
    # The CPU checks every batch's values (an out-of-range label or a non-finite score is a
    # ValueError); on a GPU that would wait for the host per batch, and the data pipeline has
    # already dropped out-of-range labels.
    check_values = device.type != "cuda"
    for images, labels in DevicePrefetcher(loader, device, channels_last=channels_last):
        with _autocast(device, amp):
            scores = model(images)
        counts = counts + topk_counts(scores.float(), labels, ks, check_values=check_values)
    if _is_distributed():
        packed = counts.to_tensor()
        dist.all_reduce(packed)
        counts = TopKCounts.from_tensor(packed, ks)
    return counts.to("cpu")
