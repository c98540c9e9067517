"""The function every Ray Train worker runs (`TorchTrainer(train_loop_per_worker, ...)`).

Per epoch: train, evaluate exactly across ranks, append the epoch to ROOT/RUN/metrics.jsonl
(rank 0), and call `ray.train.report(metrics, checkpoint=...)` from every rank (a barrier).
Rank 0 writes the model/optimiser/scheduler state into the checkpoint, every rank its RNG state;
Ray Train merges them into one checkpoint directory. A (re)started worker group resumes from
`ray.train.get_checkpoint()`, so a failure loses at most the epoch in progress.

The loop talks to its runner through a `WorkerSession` (session.py): `RayTrainSession` for
every job, `LocalSession` for `jobs.training.run.run_training_in_process`, which the experiment
runner uses to train hundreds of small runs in reused processes.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jobs.contract.run_files import MetricsLog, join
from jobs.contract.selection import best_by_metric
from jobs.contract.train import TrainSpec
from jobs.data.pipeline import ShardLoader, TrainLoader, build_eval_loader, build_train_loader
from jobs.models import build_model
from jobs.training.checkpoint import (
    TrainingState,
    load_training_state,
    save_rng_state,
    save_training_state,
)
from jobs.training.collapse import collapse_metrics, print_warning
from jobs.training.loop import (
    build_optimizer,
    build_scheduler,
    evaluate,
    train_one_epoch,
    use_channels_last,
)
from jobs.training.objective import Objective, build_objective
from jobs.training.session import RayTrainSession, WorkerSession

# Test hook for the fault-tolerance test: "RANK:EPOCH:MARKER_PATH" makes that rank's process
# SIGKILL itself during that epoch if the marker file exists (the file is removed first, so it
# happens once). run.py forwards it from the driver's environment to the workers.
FAULT_INJECTION_ENV = "TOPK_TEST_KILL_WORKER"
# Ray Train's controller picks reported checkpoints up on its poll (every 2 s by default); a
# worker lost before that poll loses its last report. The hook dies this long into the epoch,
# as a crash in the middle of a real epoch would.
_FAULT_DELAY_S = 6.0

VAL_PREFIX = "val_"
"""The validation metrics are `TopKCounts.to_metrics(VAL_PREFIX)`: val_top{k} and
val_macro_top{k}, the names `jobs.contract.train.reported_metrics` lists for the spec."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _noise_seed(seed: int, rank: int, epoch: int) -> int:
    """The loss-noise seed of one rank in one epoch: reproducible, and different per rank so
    that DDP ranks do not draw the same noise."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


def _maybe_inject_fault(rank: int, epoch: int) -> None:
    setting = os.environ.get(FAULT_INJECTION_ENV)
    if not setting:
        return
    kill_rank, kill_epoch, marker = setting.split(":", 2)
    if rank == int(kill_rank) and epoch == int(kill_epoch) and os.path.exists(marker):
        os.remove(marker)
        time.sleep(_FAULT_DELAY_S)
        os.kill(os.getpid(), signal.SIGKILL)


def _sum_across_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)  # NCCL reduces GPU tensors
    dist.all_reduce(total)
    return int(total.item())


def build_model_for(spec: TrainSpec, *, load_pretrained: bool = True) -> torch.nn.Module:
    """The spec's model, on the CPU: its arch, classes, input channels, head (validation
    settles `model.cosine_head` for the loss) and, unless `load_pretrained` is False (the
    weights come from a checkpoint next), its pretrained backbone."""
    return build_model(
        spec.model.arch,
        spec.data.num_classes,
        in_channels=spec.data.channels,
        cosine_head=spec.model.cosine_head,  # type: ignore[arg-type]  # a bool once validated
        pretrained=spec.model.pretrained if load_pretrained else None,
    )


@dataclass
class _Training:
    """What one rank trains with, built once per run: one loader per split for the whole run
    (shards and dataset.json resolved once, loader workers kept across epochs, batches pinned
    for the GPU), and the state restored from the checkpoint it resumes from."""

    model: torch.nn.Module
    loss_fn: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: TrainLoader
    val_loader: ShardLoader | None
    channels_last: bool
    amp: bool
    state: TrainingState
    resumed_from: int | None


def _build_loaders(
    spec: TrainSpec, session: WorkerSession
) -> tuple[TrainLoader, ShardLoader | None]:
    """This rank's train loader and, when the spec has a validation split, its eval loader."""
    rank, world_size = session.rank, session.world_size
    pin_memory = session.device.type == "cuda"
    loader = build_train_loader(
        spec.data,
        batch_size=spec.batch_size,
        rank=rank,
        world_size=world_size,
        epoch=1,
        seed=spec.seed,
        pin_memory=pin_memory,
    )
    val_loader = None
    if spec.data.val is not None:
        val_loader = build_eval_loader(
            spec.data,
            batch_size=spec.batch_size,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
        )
    return loader, val_loader


def _set_up(spec: TrainSpec, session: WorkerSession) -> _Training:
    """Model, loss, optimiser, loaders and schedule of this rank, resumed from the session's
    checkpoint when there is one, the model prepared by the session (and compiled if asked)."""
    device = session.device
    loss_fn = build_objective(spec.loss).to(device)
    model = build_model_for(spec)
    channels_last = use_channels_last(device, model)
    model = model.to(device, memory_format=torch.channels_last if channels_last else None)
    optimizer = build_optimizer(model, **spec.optim.model_dump())
    loader, val_loader = _build_loaders(spec, session)
    schedule = spec.schedule.model_dump()
    scheduler = build_scheduler(
        optimizer,
        name=schedule.pop("name"),
        epochs=spec.epochs,
        steps_per_epoch=loader.steps_per_epoch,  # the one formula: the data pipeline's
        **schedule,
    )
    state = TrainingState(epoch=0, best_metric=None, best_epoch=None)
    resumed_from: int | None = None
    with session.resume_directory() as directory:
        if directory is not None:
            state = load_training_state(
                directory, model=model, optimizer=optimizer, scheduler=scheduler, rank=session.rank
            )
            resumed_from = state.epoch
    model = session.prepare_model(model)
    if spec.model.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return _Training(
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        val_loader=val_loader,
        channels_last=channels_last,
        amp=spec.amp and device.type == "cuda",
        state=state,
        resumed_from=resumed_from,
    )


def _run_epoch(spec: TrainSpec, session: WorkerSession, run: _Training, epoch: int) -> dict:
    """Train and evaluate epoch `epoch`; returns its metrics.jsonl record."""
    device = session.device
    run.loader.set_epoch(epoch)
    generator = torch.Generator(device=device).manual_seed(
        _noise_seed(spec.seed, session.rank, epoch)
    )
    stats = train_one_epoch(
        run.model,
        run.loader,
        run.loss_fn.for_epoch(epoch),  # cross-entropy in the loss's warm-up epochs
        run.optimizer,
        run.scheduler,
        device=device,
        generator=generator,
        amp=run.amp,
        channels_last=run.channels_last,
    )
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": stats.train_loss,
        "samples": stats.samples,
        "skipped": _sum_across_ranks(run.loader.stats.skipped_total, device),
        "samples_per_second": stats.samples_per_second,
        "epoch_seconds": stats.seconds,
        "lr": run.optimizer.param_groups[0]["lr"],
        "resumed_from_epoch": run.resumed_from,
    }
    if run.val_loader is not None:
        counts = evaluate(
            run.model,
            run.val_loader,
            sorted(set(spec.metrics.ks)),
            spec.data.num_classes,
            device=device,
            amp=run.amp,
            channels_last=run.channels_last,
        )
        metrics.update(counts.to_metrics(VAL_PREFIX))
        metrics.update(collapse_metrics(counts, spec.metrics.collapse_share))
        if session.rank == 0:
            print_warning(metrics, spec.metrics.collapse_share)
    metrics["time"] = time.time()
    return metrics


def _record_best(state: TrainingState, metrics: dict[str, Any], spec: TrainSpec) -> None:
    """Move the state's best epoch to this one when its selection metric is better."""
    select = spec.metrics.select
    candidates = [metrics]
    if state.best_epoch is not None:  # the best so far comes first: it wins a tie
        candidates.insert(0, {"epoch": state.best_epoch, select: state.best_metric})
    best = best_by_metric(candidates, select, spec.metrics.mode)
    if best is not None:
        state.best_metric, state.best_epoch = float(best[select]), best["epoch"]


def _checkpoint_and_report(session: WorkerSession, run: _Training, metrics: dict) -> None:
    """Write this rank's part of the epoch's checkpoint (rank 0: the training state; every
    rank: its RNG state) and report it with the epoch's metrics."""
    with tempfile.TemporaryDirectory(prefix="topk-ckpt-") as directory:
        if session.rank == 0:
            save_training_state(
                directory,
                model=run.model,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                state=run.state,
            )
        save_rng_state(directory, session.rank)
        # Ray keeps None out of checkpoint scoring; report only numbers.
        reported = {key: value for key, value in metrics.items() if value is not None}
        session.report(reported, directory, metrics["epoch"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"spec": TrainSpec as a JSON dict, "run_dir": URL of
    ROOT/RUN}. The spec is validated again here: the worker trusts nothing it is sent."""
    run_loop(config, RayTrainSession())


def run_loop(config: dict[str, Any], session: WorkerSession) -> None:
    """The training loop of one rank, whatever runs it (see the module docstring). `config` as
    for `train_loop_per_worker`, or with the TrainSpec itself when the caller's process
    validated it (an in-process run: the spec is validated once per process); the spec's class
    counts are already resolved (the driver resolved them once, at start-up)."""
    given = config["spec"]
    spec = given if isinstance(given, TrainSpec) else TrainSpec.model_validate(given)
    _seed_everything(spec.seed * 1000 + session.rank)
    run = _set_up(spec, session)
    metrics_log = None
    if session.rank == 0:  # the only writer of metrics.jsonl
        metrics_log = MetricsLog(
            join(config["run_dir"], "metrics.jsonl"), keep_through_epoch=run.state.epoch
        )
    for epoch in range(run.state.epoch + 1, spec.epochs + 1):
        _maybe_inject_fault(session.rank, epoch)
        metrics = _run_epoch(spec, session, run, epoch)
        _record_best(run.state, metrics, spec)
        run.state.epoch = epoch
        if metrics_log is not None:
            metrics_log.append(metrics)
        _checkpoint_and_report(session, run, metrics)
