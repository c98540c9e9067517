"""The worker's session: what the training loop (worker.py's `run_loop`) needs from whatever
runs it, declared as the `WorkerSession` protocol, and its two implementations.

- `RayTrainSession`: Ray Train's context (rank, world size, the worker's device), the
  checkpoint to resume from (`ray.train.get_checkpoint`), DDP wrapping and `ray.train.report`.
  Every `topk train` run and every service job.
- `LocalSession`: one process without Ray; checkpoints in ROOT/RUN/checkpoints, kept as Ray
  Train's CheckpointConfig keeps them. `jobs.training.run.run_training_in_process` (the
  experiment runner) uses it.

Ray Train v2 declares its own contexts the same way: one interface (`TrainContext`) with a
distributed and a local implementation. Ray is imported only inside `RayTrainSession`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from jobs.contract.run_files import read_metrics
from jobs.contract.selection import Mode, rank_by_metric
from jobs.training.checkpoint import STATE_FILE


@runtime_checkable
class WorkerSession(Protocol):
    """One rank's view of its runner. The loop reads `rank`, `world_size` and `device`, resumes
    from `resume_directory()`, wraps the model with `prepare_model` and hands every epoch's
    checkpoint directory to `report` (on every rank: a barrier under Ray Train)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def resume_directory(self) -> AbstractContextManager[str | None]:
        """A local directory holding the checkpoint to resume from (None: start afresh),
        valid inside the `with` block."""
        ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as the loop trains it (DDP-wrapped under Ray Train); already on `device`."""
        ...

    def report(self, metrics: dict[str, Any], directory: str, epoch: int) -> None:
        """Record epoch `epoch`: its metrics (numbers only) and the checkpoint in `directory`,
        which the caller deletes afterwards."""
        ...


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
    the run's metrics.jsonl, ranked by `jobs.contract.selection`) and the latest, as Ray
    Train's CheckpointConfig does (the `keep` latest when `select` is None); a new session
    resumes from the latest."""

    def __init__(
        self,
        run_dir: str,
        *,
        select: str | None,
        mode: Mode,
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
        for stale in set(checkpoints) - self._kept(checkpoints, metrics, epoch):
            shutil.rmtree(checkpoints[stale], ignore_errors=True)

    def _kept(self, checkpoints: dict[int, Path], metrics: dict[str, Any], epoch: int) -> set[int]:
        """The epochs whose checkpoints stay: the latest, and the `keep` best (or latest)."""
        latest = max(checkpoints)
        if self.select is None:
            return {latest} | set(sorted(checkpoints)[-self.keep :])
        scores = {
            record["epoch"]: record.get(self.select)
            for record in read_metrics(str(self.run_dir / "metrics.jsonl"))
            if "epoch" in record
        }
        scores[epoch] = metrics.get(self.select)
        records: list[dict[str, Any]] = [
            {"epoch": e, self.select: scores[e]} for e in sorted(checkpoints) if e in scores
        ]
        ranked = rank_by_metric(records, self.select, self.mode)
        return {latest} | {record["epoch"] for record in ranked[: self.keep]}
