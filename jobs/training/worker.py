"""The function every Ray Train worker runs (`TorchTrainer(train_loop_per_worker, ...)`).

Per epoch: train, evaluate exactly across ranks, append the epoch to ROOT/RUN/metrics.jsonl
(rank 0), and call `ray.train.report(metrics, checkpoint=...)` from every rank (a barrier).
Rank 0 writes the model/optimiser/scheduler state into the checkpoint, every rank its RNG state;
Ray Train merges them into one checkpoint directory. A (re)started worker group resumes from
`ray.train.get_checkpoint()`, so a failure loses at most the epoch in progress.

The loop talks to its runner through a small session object: `RayTrainSession` (Ray Train's
context, checkpoints and report) for every job, and `LocalSession` (one process, checkpoints in
ROOT/RUN/checkpoints) for `jobs.training.run.run_training_in_process`, which the experiment
runner uses to train hundreds of small runs in reused Ray task processes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jobs.contract.run_files import MetricsLog, join, read_metrics
from jobs.contract.train import TrainSpec
from jobs.data.pipeline import build_eval_loader, build_train_loader
from jobs.models import build_model
from jobs.training.checkpoint import (
    STATE_FILE,
    TrainingState,
    load_training_state,
    save_rng_state,
    save_training_state,
)
from jobs.training.loop import (
    build_optimizer,
    build_scheduler,
    evaluate,
    train_one_epoch,
    use_channels_last,
)
from topk import create_loss

# Test hook for the fault-tolerance test: "RANK:EPOCH:MARKER_PATH" makes that rank's process
# SIGKILL itself during that epoch if the marker file exists (the file is removed first, so it
# happens once). run.py forwards it from the driver's environment to the workers.
FAULT_INJECTION_ENV = "TOPK_TEST_KILL_WORKER"
# Ray Train's controller picks reported checkpoints up on its poll (every 2 s by default); a
# worker lost before that poll loses its last report. The hook dies this long into the epoch,
# as a crash in the middle of a real epoch would.
_FAULT_DELAY_S = 6.0


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


def _skipped_samples(loader: Any) -> int:
    stats = getattr(loader, "stats", None)
    if stats is None:
        return 0
    skipped = getattr(stats, "skipped", None)
    if skipped is None and isinstance(stats, dict):
        skipped = stats.get("skipped")
    if isinstance(skipped, dict):
        return int(sum(skipped.values()))
    return int(skipped or 0)


def _sum_across_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)  # NCCL reduces GPU tensors
    dist.all_reduce(total)
    return int(total.item())


class RayTrainSession:
    """The loop's view of Ray Train: rank, device, the checkpoint to resume, report."""

    def __init__(self) -> None:
        import ray.train  # Ray only where Ray Train runs: LocalSession needs no Ray at all
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        # With use_gpu Ray Train gives each worker one GPU (CUDA_VISIBLE_DEVICES) and this is it.
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def resume_directory(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # The model is already on self.device (and in its memory format): DDP wrapping only.
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict[str, Any], directory: str, epoch: int) -> None:
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}",
        )


def local_checkpoints(folder: Path) -> dict[int, Path]:
    """epoch -> checkpoint directory, for the complete checkpoints in a local `checkpoints`
    folder (Ray Train's and LocalSession's `checkpoint_epoch_NNNN` names)."""
    found = {}
    for path in Path(folder).glob("checkpoint_epoch_*"):
        if (path / STATE_FILE).is_file():
            found[int(path.name.rsplit("_", 1)[1])] = path
    return found


class LocalSession:
    """One process, no Ray Train: checkpoints go to `checkpoints/checkpoint_epoch_NNNN` under a
    local run folder, keeping the `keep` best by `select` (in `mode`; the scores are read from
    the run's metrics.jsonl) and the latest, as Ray Train's CheckpointConfig does (the `keep`
    latest when `select` is None); a new session resumes from the latest."""

    def __init__(
        self,
        run_dir: str,
        *,
        select: str | None,
        mode: str,
        keep: int,
        device: torch.device | str | None = None,
    ) -> None:
        self.rank, self.world_size = 0, 1
        # The GPU when there is one (several runs may share it, each in its own process).
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.select, self.mode, self.keep = select, mode, keep

    @contextlib.contextmanager
    def resume_directory(self) -> Iterator[str | None]:
        checkpoints = local_checkpoints(self.folder)
        yield str(checkpoints[max(checkpoints)]) if checkpoints else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict[str, Any], directory: str, epoch: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"checkpoint_epoch_{epoch:04d}"
        staging = self.folder / f".staging_{epoch:04d}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(directory, staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # a checkpoint is visible only once complete
        checkpoints = local_checkpoints(self.folder)
        keep = {max(checkpoints)} | set(sorted(checkpoints)[-self.keep :])
        if self.select is not None:
            scores = {
                record["epoch"]: float(record[self.select])
                for record in read_metrics(str(self.run_dir / "metrics.jsonl"))
                if isinstance(record.get(self.select), (int, float))
            }
            scores[epoch] = float(metrics[self.select])
            sign = -1.0 if self.mode == "max" else 1.0  # ties go to the earliest epoch, as in
            ranked = sorted(  # summarize_run's choice of the best epoch
                (e for e in checkpoints if e in scores), key=lambda e: (sign * scores[e], e)
            )
            keep = {max(checkpoints)} | set(ranked[: self.keep])
        for stale in set(checkpoints) - keep:
            shutil.rmtree(checkpoints[stale], ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: {"spec": TrainSpec as a JSON dict, "run_dir": URL of
    ROOT/RUN}. The spec is validated again here: the worker trusts nothing it is sent."""
    run_loop(config, RayTrainSession())


def run_loop(config: dict[str, Any], session: RayTrainSession | LocalSession) -> None:
    """The training loop of one rank, whatever runs it (see the module docstring)."""
    spec = TrainSpec.model_validate(config["spec"])
    run_dir: str = config["run_dir"]
    rank, world_size = session.rank, session.world_size
    device = session.device
    _seed_everything(spec.seed * 1000 + rank)

    loss_kwargs = spec.loss.to_kwargs()
    loss_fn = create_loss(spec.loss.name, **loss_kwargs).to(device)
    model = build_model(
        spec.model.arch,
        spec.data.num_classes,
        in_channels=spec.data.channels,
        cosine_head=bool(spec.model.cosine_head),  # the spec resolved it for the loss
        pretrained=spec.model.pretrained,
    )
    channels_last = use_channels_last(device, model)
    model = model.to(device, memory_format=torch.channels_last if channels_last else None)
    optimizer = build_optimizer(model, **spec.optim.model_dump())

    # One loader per split for the whole run: shards and dataset.json are resolved once, the
    # loader workers persist across epochs, and batches are pinned for the GPU.
    pin_memory = device.type == "cuda"
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
    steps_per_epoch = loader.steps_per_epoch
    schedule = spec.schedule.model_dump()
    scheduler = build_scheduler(
        optimizer,
        name=schedule.pop("name"),
        epochs=spec.epochs,
        steps_per_epoch=steps_per_epoch,
        **schedule,
    )

    state = TrainingState(epoch=0, best_metric=None, best_epoch=None)
    resumed_from: int | None = None
    with session.resume_directory() as directory:
        if directory is not None:
            state = load_training_state(
                directory, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank
            )
            resumed_from = state.epoch
    model = session.prepare_model(model)
    if spec.model.compile:
        model = torch.compile(model)
    metrics_log = None
    if rank == 0:  # the only writer of metrics.jsonl
        metrics_log = MetricsLog(join(run_dir, "metrics.jsonl"), keep_through_epoch=state.epoch)
    select, mode = spec.metrics.select, spec.metrics.mode
    ks = sorted(set(spec.metrics.ks))
    amp = spec.amp and device.type == "cuda"

    for epoch in range(state.epoch + 1, spec.epochs + 1):
        _maybe_inject_fault(rank, epoch)
        loader.set_epoch(epoch)
        generator = torch.Generator(device=device).manual_seed(_noise_seed(spec.seed, rank, epoch))
        stats = train_one_epoch(
            model,
            loader,
            loss_fn,
            optimizer,
            scheduler,
            device=device,
            generator=generator,
            amp=amp,
            channels_last=channels_last,
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": stats.train_loss,
            "samples": stats.samples,
            "skipped": _sum_across_ranks(_skipped_samples(loader), device),
            "samples_per_second": stats.samples_per_second,
            "epoch_seconds": stats.seconds,
            "lr": optimizer.param_groups[0]["lr"],
            "resumed_from_epoch": resumed_from,
        }
        if val_loader is not None:
            counts = evaluate(
                model,
                val_loader,
                ks,
                spec.data.num_classes,
                device=device,
                amp=amp,
                channels_last=channels_last,
            )
            for k in ks:
                metrics[f"val_top{k}"] = counts.accuracy(k)
                metrics[f"val_macro_top{k}"] = counts.macro_accuracy(k)
        metrics["time"] = time.time()

        value = metrics.get(select)
        if isinstance(value, (int, float)):
            improved = state.best_metric is None or (
                value > state.best_metric if mode == "max" else value < state.best_metric
            )
            if improved:
                state.best_metric, state.best_epoch = float(value), epoch
        state.epoch = epoch
        if metrics_log is not None:
            metrics_log.append(metrics)

        with tempfile.TemporaryDirectory(prefix="topk-ckpt-") as directory:
            if rank == 0:
                save_training_state(
                    directory, model=model, optimizer=optimizer, scheduler=scheduler, state=state
                )
            save_rng_state(directory, rank)
            # Ray keeps None out of checkpoint scoring; report only numbers.
            reported = {key: val for key, val in metrics.items() if val is not None}
            session.report(reported, directory, epoch)
