"""The losses on a CUDA device: no host synchronisation, clear errors without a device-side
assert, torch.compile(fullgraph=True) and CUDA-graph capture. Skipped without a GPU; the same
code paths are covered on the CPU by test_fused_selection.py (Triton's interpreter) and
test_input_checks.py."""

from __future__ import annotations

import pytest
import torch

import topk
from topk import fused_selection

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CLASSES = 1000


def build(name: str, classes: int = CLASSES) -> torch.nn.Module:
    cls = topk.get_loss_class(name)
    params: dict[str, object] = {}
    if cls.needs_class_counts:
        params["class_counts"] = [1 + (7 * c) % 50 for c in range(classes)]
    return topk.create_loss(name, **params).cuda()


def batch(name: str, rows: int = 64, classes: int = CLASSES, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.randn(rows, classes, device="cuda", generator=gen)
    if topk.get_loss_class(name).needs_cosine_head:
        scores = torch.tanh(0.3 * scores)
    labels = torch.randint(0, classes, (rows,), device="cuda", generator=gen)
    return scores.to(dtype).requires_grad_(), labels


def forward_backward(loss_fn, scores, labels):
    scores.grad = None
    loss = loss_fn(scores, labels)
    loss.backward()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", topk.list_losses())
def test_no_host_sync_after_the_first_call(name, dtype):
    loss_fn = build(name)
    scores, labels = batch(name, dtype=dtype)
    forward_backward(loss_fn, scores, labels)  # the first call checks the values on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = forward_backward(loss_fn, scores, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and torch.isfinite(scores.grad).all().item()


@pytest.mark.parametrize("name", topk.list_losses())
def test_bad_values_error_first_then_nan_without_killing_the_context(name):
    loss_fn = build(name)
    scores, labels = batch(name)
    bad_labels = labels.clone()
    bad_labels[3] = CLASSES  # out of range: a gather with it would be a device-side assert
    with pytest.raises(ValueError, match="label 1000 is out of range"):
        loss_fn(scores, bad_labels)
    forward_backward(loss_fn, scores, labels)  # host-checked once; now checks on the device
    assert torch.isnan(loss_fn(scores, bad_labels)).item()
    nan_scores = scores.detach().clone()
    nan_scores[5, 7] = float("nan")
    assert torch.isnan(loss_fn(nan_scores, labels)).item()
    # The context is alive: a normal call still works and the mode switch gives the ValueError.
    assert torch.isfinite(forward_backward(loss_fn, scores, labels)).item()
    loss_fn.check_inputs = "always"
    with pytest.raises(ValueError, match="NaN or infinite"):
        loss_fn(nan_scores, labels)


@pytest.mark.parametrize("name", ["noised_topk", "noised_topk_imbalanced"])
def test_noised_losses_take_the_triton_path_and_match_the_torch_path_in_mean(name, monkeypatch):
    loss_fn = build(name)
    scores, labels = batch(name, rows=256)
    assert fused_selection.uses_triton(scores)
    values = {}
    for backend in ("triton", "torch"):
        monkeypatch.setattr(fused_selection, "BACKEND", backend)
        draws = torch.stack([loss_fn(scores, labels) for _ in range(200)]).double()
        values[backend] = (draws.mean().item(), draws.std().item() / 200**0.5)
    (mean_t, se_t), (mean_r, se_r) = values["triton"], values["torch"]
    assert abs(mean_t - mean_r) <= 5 * (se_t**2 + se_r**2) ** 0.5 + 1e-6


def test_kernel_matches_the_reference_with_the_same_noise_on_the_gpu():
    gen = torch.Generator(device="cuda").manual_seed(3)
    scores = torch.randn(128, 5000, device="cuda", generator=gen)
    noise = torch.randn(7, 128, 5000, device="cuda", generator=gen)
    from topk.full_sampling import sample_kth_largest_full
    from topk.selection_launch import select_noised

    values, indices, _, bad = select_noised(scores, 6, 1.0, 7, noise=noise)
    ref_values, ref_indices = sample_kth_largest_full(scores, 6, 1.0, 7, noise=noise)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    assert torch.equal(indices, ref_indices) and not bad.any().item()


@pytest.mark.parametrize("name", topk.list_losses())
def test_compiles_with_fullgraph(name):
    loss_fn = build(name)
    scores, labels = batch(name)
    forward_backward(loss_fn, scores, labels)
    eager_grad = scores.grad.clone()
    eager = loss_fn(scores, labels).detach()
    compiled = torch.compile(loss_fn, fullgraph=True)
    scores.grad = None
    value = compiled(scores, labels)
    value.backward()
    assert torch.isfinite(value).item() and torch.isfinite(scores.grad).all().item()
    if not name.startswith("noised"):  # deterministic: the same value and gradient
        torch.testing.assert_close(value.detach(), eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores.grad, eager_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", topk.list_losses())
def test_forward_and_backward_capture_in_a_cuda_graph(name):
    loss_fn = build(name)
    scores, labels = batch(name)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the capture, as torch.cuda.graphs asks
            forward_backward(loss_fn, scores, labels)
    torch.cuda.current_stream().wait_stream(side)
    eager = loss_fn(scores, labels).detach().clone()
    graph = torch.cuda.CUDAGraph()
    scores.grad = None
    with torch.cuda.graph(graph):
        loss = loss_fn(scores, labels)
        loss.backward()
    values = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        values.append(loss.detach().clone())
        assert torch.isfinite(scores.grad).all().item()
    if name.startswith("noised"):
        assert not torch.equal(values[0], values[1])  # every replay draws fresh noise
    else:
        torch.testing.assert_close(values[0], eager, rtol=1e-5, atol=1e-6)
