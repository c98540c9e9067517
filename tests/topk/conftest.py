"""Where the fused Triton kernels (topk.fused_selection) run in these tests.

With CUDA they are compiled for the GPU and the fused tests use device "cuda". Without it they
run through Triton's interpreter on the CPU: TRITON_INTERPRET=1 is set by tests/conftest.py,
before anything imports triton.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()

FUSED_DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def fused_device() -> torch.device:
    """The device the fused kernels run on here ("cuda", else "cpu" through the interpreter);
    skips the test when triton is not installed or cannot run on that device."""
    from topk.fused_selection import triton_importable

    if not triton_importable():
        pytest.skip("triton is not installed")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device, and TRITON_INTERPRET was set to something other than 1")
    return FUSED_DEVICE


@pytest.fixture
def triton_backend(monkeypatch, fused_device) -> torch.device:
    """Forces the losses and topk.smoothing onto the kernels (BACKEND "triton") for one test;
    returns the device to put their inputs on."""
    import topk.fused_selection

    monkeypatch.setattr(topk.fused_selection, "BACKEND", "triton")
    return fused_device
