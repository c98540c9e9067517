"""The device a run trains on in this process: `resolve_device(requested)`.

`requested` is "auto", "cpu" or "cuda"; None reads TOPK_DEVICE, and "auto" (its default) takes
CUDA when torch finds it and the CPU otherwise, so a GPU is used when present and never
required. Used by in-process training (`jobs.training.run.run_training_in_process`) and the
experiment runner; Ray Train jobs get their device from Ray (`scaling.use_gpu`).
"""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "TOPK_DEVICE"
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(
    requested: str | None = None, *, cuda_available: bool | None = None
) -> torch.device:
    """cpu or cuda (the current CUDA device) for `requested` (else TOPK_DEVICE, else "auto").

    `cuda_available` overrides `torch.cuda.is_available()` (tests). Raises ValueError, naming
    where the request came from, for an unknown value or for "cuda" on a machine without CUDA.
    """
    source = "device"
    if requested is None:
        requested, source = os.environ.get(DEVICE_ENV) or "auto", DEVICE_ENV
    choice = requested.strip().lower()
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"{source}={requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if choice == "cuda" and not cuda_available:
        raise ValueError(
            f"{source}=cuda asks for a GPU, but torch finds no CUDA device on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            f"use {source}=auto or cpu"
        )
    if choice == "cpu" or not cuda_available:
        return torch.device("cpu")
    return torch.device("cuda")
