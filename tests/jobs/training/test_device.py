"""The device choice of in-process runs (jobs.training.device): CUDA when present, the CPU
otherwise, TOPK_DEVICE to override, and a clear error for "cuda" without a GPU."""

from __future__ import annotations

import pytest
import torch

from jobs.training.device import DEVICE_ENV, resolve_device


@pytest.mark.parametrize(
    ("requested", "cuda_available", "expected"),
    [
        ("auto", False, "cpu"),
        ("auto", True, "cuda"),
        ("cpu", True, "cpu"),
        ("cpu", False, "cpu"),
        ("cuda", True, "cuda"),
        (" CUDA ", True, "cuda"),
    ],
)
def test_the_choice_follows_the_request_and_the_machine(requested, cuda_available, expected):
    chosen = resolve_device(requested, cuda_available=cuda_available)
    assert chosen == torch.device(expected)


def test_the_default_is_auto_and_reads_the_environment(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device(cuda_available=True).type == "cuda"
    assert resolve_device(cuda_available=False).type == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device(cuda_available=True).type == "cpu"
    assert resolve_device("cuda", cuda_available=True).type == "cuda"  # an argument wins
    monkeypatch.setenv(DEVICE_ENV, "")  # set but empty: the default
    assert resolve_device(cuda_available=True).type == "cuda"


def test_this_machine_auto_is_cuda_exactly_when_torch_finds_it(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match=r"^device=cuda asks for a GPU, but torch finds no CUDA"):
        resolve_device("cuda", cuda_available=False)
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match=r"^TOPK_DEVICE=cuda asks for a GPU.*use TOPK_DEVICE=auto"):
        resolve_device(cuda_available=False)


def test_an_unknown_device_names_the_choices(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match=r"TOPK_DEVICE='gpu' is not one of auto, cpu, cuda"):
        resolve_device()
