"""Training state in a checkpoint directory, loadable with `torch.load(weights_only=True)`.

A checkpoint directory holds `state.pt` (model, optimiser, scheduler, epoch, best metric;
written by rank 0) and `rng_rank{R}.pt` (each rank's RNG state). Ray Train merges the
directories that the ranks report into one checkpoint on the run's storage; see worker.py.
Everything stored is tensors and plain Python values, so loading never unpickles code.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and torch.compile wrappers (state_dict
    keys without 'module.' or '_orig_mod.')."""
    while True:  # torch.compile's wrapper (_orig_mod) around DDP's (module), in any order
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module"):
            model = model.module
        else:
            return model


@dataclass
class TrainingState:
    """What a resumed run needs besides the weights: the last finished epoch (1-based) and the
    best value so far of the selection metric (None before the first evaluation)."""

    epoch: int
    best_metric: float | None
    best_epoch: int | None


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and Python RNG states as tensors and plain values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainingState,
) -> Path:
    """Write state.pt (model, optimiser, scheduler, epoch, best) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": state.epoch,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
    }
    path = directory / STATE_FILE
    torch.save(payload, path)
    return path


def save_rng_state(directory: str | Path, rank: int) -> Path:
    """Write this process's RNG state as rng_rank{rank}.pt into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rng_rank{rank}.pt"
    torch.save(capture_rng_state(), path)
    return path


def _load_plain(path: Path) -> Any:
    """torch.load restricted to tensors and plain values; anything else is a ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"checkpoint file {path} cannot be loaded safely: {exc}") from None


def load_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    rank: int | None = None,
) -> TrainingState:
    """Restore the weights (and optimiser, scheduler, this rank's RNG state when given) from a
    checkpoint directory; returns the epoch and best metric. Raises ValueError when the
    directory holds no state.pt or an unknown format."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise ValueError(f"checkpoint {directory} has no {STATE_FILE}")
    payload = _load_plain(path)
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory}: not a training state of format {FORMAT_VERSION}")
    unwrap(model).load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if rank is not None:
        rng_path = directory / f"rng_rank{rank}.pt"
        if rng_path.is_file():  # a world size change leaves new ranks with their seeded state
            restore_rng_state(_load_plain(rng_path))
    return TrainingState(
        epoch=int(payload["epoch"]),
        best_metric=payload["best_metric"],
        best_epoch=payload["best_epoch"],
    )
