"""The smoothed k-th largest operator against slow float64 references written from the math."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy.special import ndtr

from topk.smoothing import smoothed_kth_largest


def reference_kth_largest(scores: torch.Tensor, k: int, epsilon: float, noise: torch.Tensor):
    """Plain loops and a full sort, float64: (mean value [rows], mean one-hot [rows, classes]).

    scores: [rows, classes]; noise: [n_samples, rows, classes].
    """
    n_samples, rows, classes = noise.shape
    values = torch.zeros(rows, dtype=torch.float64)
    grad = torch.zeros(rows, classes, dtype=torch.float64)
    for row in range(rows):
        for draw in range(n_samples):
            noised = [
                float(scores[row, c]) + epsilon * float(noise[draw, row, c]) for c in range(classes)
            ]
            order = sorted(range(classes), key=lambda c: noised[c], reverse=True)
            values[row] += noised[order[k - 1]] / n_samples
            grad[row, order[k - 1]] += 1.0 / n_samples
    return values, grad


def exact_expected_kth_largest(scores: np.ndarray, k: int, epsilon: float) -> float:
    """E[top_k(s + eps Z)] for one row by quadrature of the order statistic's distribution.

    P(top_k <= x) = P(fewer than k entries exceed x), a Poisson-binomial count computed by
    dynamic programming; E[X] = a + integral_a^b P(X > x) dx for a below all the mass.
    """
    lo = scores.min() - 12 * epsilon
    hi = scores.max() + 12 * epsilon
    grid = np.linspace(lo, hi, 40001)
    exceed = 1.0 - ndtr((grid[:, None] - scores[None, :]) / epsilon)  # [points, classes]
    count = np.zeros((grid.size, scores.size + 1))
    count[:, 0] = 1.0
    for c in range(scores.size):
        p = exceed[:, c : c + 1]
        shifted = np.concatenate([np.zeros((grid.size, 1)), count[:, :-1]], axis=1)
        count = count * (1.0 - p) + shifted * p
    cdf = count[:, :k].sum(axis=1)
    return float(lo + np.trapezoid(1.0 - cdf, grid))


def test_same_noise_gives_reference_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, dtype=torch.float64, generator=gen).requires_grad_()
    noise = torch.randn(6, 4, 9, dtype=torch.float64, generator=gen)
    for k in (1, 3, 9):
        value = smoothed_kth_largest(scores, k, epsilon=0.7, n_samples=6, noise=noise)
        (grad,) = torch.autograd.grad(value.sum(), scores)
        ref_value, ref_grad = reference_kth_largest(scores.detach(), k, 0.7, noise)
        torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_generator_noise_is_standard_normal_in_draw_order():
    """For a small input the draws are torch.randn(n_samples, rows, classes) from the generator."""
    scores = torch.randn(3, 8, dtype=torch.float64)
    value = smoothed_kth_largest(
        scores, 2, epsilon=0.5, n_samples=4, generator=torch.Generator().manual_seed(11)
    )
    noise = torch.randn(4, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    ref_value, _ = reference_kth_largest(scores, 2, 0.5, noise)
    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-12)


def test_large_input_drawn_slice_by_slice_matches_reference_distribution():
    """Inputs too big for one buffer are drawn a slice at a time; the mean still converges."""
    row = [0.0, 0.2, 0.5, 1.0]
    scores = torch.tensor(row).repeat(20000, 1)  # 20000 * 4 * 5 elements > one small buffer
    value = smoothed_kth_largest(
        scores, 2, epsilon=0.3, n_samples=5, generator=torch.Generator().manual_seed(0)
    )
    expected = exact_expected_kth_largest(np.array(row), 2, 0.3)
    # 100000 draws with standard deviation < 0.3: 5 standard errors is 0.005
    assert abs(value.mean().item() - expected) < 0.005
    assert value.std() > 0  # rows got different draws


@pytest.mark.parametrize("k", [1, 2, 4])
def test_value_and_gradient_match_exact_expectation(k):
    """Mean estimate vs quadrature; mean gradient vs a finite difference of the quadrature."""
    row = np.array([0.3, -0.2, 0.9, 0.1, 0.5])
    epsilon, draws = 0.6, 40000
    scores = torch.tensor(row).repeat(draws // 8, 1).requires_grad_()
    value = smoothed_kth_largest(
        scores, k, epsilon=epsilon, n_samples=8, generator=torch.Generator().manual_seed(k)
    )
    (grad,) = torch.autograd.grad(value.sum(), scores)
    mean_value = value.mean().item()
    mean_grad = grad.mean(dim=0).numpy()

    expected = exact_expected_kth_largest(row, k, epsilon)
    assert abs(mean_value - expected) < 4 * epsilon / math.sqrt(draws)
    step = 1e-4
    for c in range(row.size):
        up, down = row.copy(), row.copy()
        up[c] += step
        down[c] -= step
        fd = (
            exact_expected_kth_largest(up, k, epsilon)
            - exact_expected_kth_largest(down, k, epsilon)
        ) / (2 * step)
        # mean_grad[c] is a frequency over `draws` draws: 4 binomial standard errors
        tolerance = 4 * math.sqrt(max(fd * (1 - fd), 1e-3) / draws) + 1e-4
        assert abs(mean_grad[c] - fd) < tolerance, (c, mean_grad[c], fd)


def test_gradient_matches_common_random_numbers_finite_difference():
    """d/ds_c of the draw average, by finite differences with the same noise, is the estimate."""
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 7, dtype=torch.float64, generator=gen).requires_grad_()
    noise = torch.randn(500, 3, 7, dtype=torch.float64, generator=gen)
    value = smoothed_kth_largest(scores, 3, epsilon=0.4, n_samples=500, noise=noise)
    (grad,) = torch.autograd.grad(value.sum(), scores)
    step = 1e-7
    with torch.no_grad():
        for c in range(7):
            shift = torch.zeros(3, 7, dtype=torch.float64)
            shift[:, c] = step
            up = smoothed_kth_largest(scores + shift, 3, epsilon=0.4, n_samples=500, noise=noise)
            down = smoothed_kth_largest(scores - shift, 3, epsilon=0.4, n_samples=500, noise=noise)
            torch.testing.assert_close((up - down) / (2 * step), grad[:, c], rtol=0, atol=1e-5)


def test_gradient_rows_sum_to_one_for_any_batch_shape_and_dim():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 11, generator=gen).requires_grad_()
    value = smoothed_kth_largest(scores, 4, epsilon=1.0, n_samples=5, generator=gen)
    assert value.shape == (2, 3)
    (grad,) = torch.autograd.grad(value.sum(), scores)
    torch.testing.assert_close(grad.sum(dim=-1), torch.ones(2, 3))
    assert (grad >= 0).all()

    value = smoothed_kth_largest(scores, 2, epsilon=1.0, n_samples=5, generator=gen, dim=1)
    assert value.shape == (2, 11)
    (grad,) = torch.autograd.grad(value.sum(), scores)
    torch.testing.assert_close(grad.sum(dim=1), torch.ones(2, 11))


def test_dim_argument_matches_moving_the_axis():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    noise = torch.randn(3, 6, 4, dtype=torch.float64, generator=gen)
    along_rows = smoothed_kth_largest(scores, 2, epsilon=0.5, n_samples=3, noise=noise, dim=0)
    moved = smoothed_kth_largest(
        scores.T, 2, epsilon=0.5, n_samples=3, noise=noise.transpose(1, 2), dim=-1
    )
    torch.testing.assert_close(along_rows, moved, rtol=0, atol=0)


def test_batch_size_one_and_single_row():
    scores = torch.tensor([[0.1, 2.0, -1.0, 0.5]], requires_grad=True)
    value = smoothed_kth_largest(
        scores, 2, epsilon=0.1, n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    assert value.shape == (1,)
    value.sum().backward()
    torch.testing.assert_close(scores.grad.sum(), torch.tensor(1.0))
    vector = smoothed_kth_largest(scores.detach()[0], 1, epsilon=0.0)
    assert vector.shape == () and vector.item() == pytest.approx(2.0)


def test_epsilon_zero_and_tiny_epsilon_give_the_hard_operator():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 12, dtype=torch.float64, generator=gen).requires_grad_()
    hard = torch.topk(scores, 3, dim=1)
    for epsilon, atol in ((0.0, 0.0), (1e-10, 1e-8)):
        value = smoothed_kth_largest(scores, 3, epsilon=epsilon, n_samples=4, generator=gen)
        (grad,) = torch.autograd.grad(value.sum(), scores)
        torch.testing.assert_close(value, hard.values[:, 2], rtol=0, atol=atol)
        one_hot = torch.zeros_like(grad).scatter_(1, hard.indices[:, 2:3], 1.0)
        torch.testing.assert_close(grad, one_hot, rtol=0, atol=0)


def test_generator_reproducibility():
    scores = torch.randn(8, 30)
    first = smoothed_kth_largest(
        scores, 5, epsilon=1.0, n_samples=5, generator=torch.Generator().manual_seed(7)
    )
    again = smoothed_kth_largest(
        scores, 5, epsilon=1.0, n_samples=5, generator=torch.Generator().manual_seed(7)
    )
    other = smoothed_kth_largest(
        scores, 5, epsilon=1.0, n_samples=5, generator=torch.Generator().manual_seed(8)
    )
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_default_generator_follows_the_global_seed():
    scores = torch.randn(4, 10)
    torch.manual_seed(123)
    first = smoothed_kth_largest(scores, 2, epsilon=1.0)
    torch.manual_seed(123)
    again = smoothed_kth_largest(scores, 2, epsilon=1.0)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_selects_in_float32_and_returns_input_dtype(dtype):
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(6, 20, generator=gen).to(dtype).requires_grad_()
    noise = torch.randn(5, 6, 20, generator=gen)
    value = smoothed_kth_largest(scores, 3, epsilon=0.05, n_samples=5, noise=noise)
    assert value.dtype == dtype
    ref_value, ref_grad = reference_kth_largest(scores.detach().double(), 3, 0.05, noise.double())
    # The selection is made on float32 values: same indices as the float64 reference.
    torch.testing.assert_close(value, ref_value.to(dtype), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(value.sum(), scores)
    assert grad.dtype == dtype
    # 1/n_samples summed in the input dtype: off by at most a few half-precision ulps
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=0, atol=1e-2)


def test_autocast_forward_and_backward():
    gen = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(16, 10)
    features = torch.randn(4, 16, generator=gen)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scores = layer(features)
        assert scores.dtype == torch.bfloat16
        value = smoothed_kth_largest(scores, 2, epsilon=1.0, n_samples=3, generator=gen)
    assert value.dtype == torch.bfloat16
    value.float().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 2.0}, "k must be a positive integer"),
        ({"k": 6}, "k = 6 exceeds the number of classes"),
        ({"epsilon": -0.1}, "epsilon must be finite and >= 0"),
        ({"epsilon": float("nan")}, "epsilon must be finite"),
        ({"n_samples": 0}, "n_samples must be a positive integer"),
        ({"sampler": "fast"}, "sampler must be one of full, lazy"),
        ({"noise": torch.zeros(2, 3, 5)}, "noise must have shape"),
        ({"noise": torch.full((5, 3, 5), float("nan"))}, "noise contains NaN"),
        ({"generator": 3}, "generator must be a torch.Generator"),
        ({"dim": 2}, "dim 2 is out of range"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    arguments = {"k": 2, "epsilon": 1.0, "n_samples": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        smoothed_kth_largest(torch.zeros(3, 5), **arguments)


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (torch.tensor([[0.0, float("nan"), 1.0]]), "NaN or infinite"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), "NaN or infinite"),
        (torch.tensor([[1, 2, 3]]), "floating-point"),
        (torch.tensor(1.0), "at least one dimension"),
        (torch.zeros(0, 3), "empty"),
    ],
)
def test_bad_scores_raise_value_error(scores, message):
    with pytest.raises(ValueError, match=message):
        smoothed_kth_largest(scores, 1, epsilon=1.0)


PEAK_MEMORY_SCRIPT = """
import torch
import torch.nn.functional as F
from topk.losses.hinge import NoisedTopKLoss

def peak_kib():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

torch.set_num_threads(1)
# [128, 100000] float32 buffers are 51 MB, above glibc's largest mmap threshold (32 MB): each is
# returned to the system when freed, so the peak of a later step is not hidden by a free list.
batch, classes = 128, 100_000
trained = (5.0 * torch.randn(batch, classes)).requires_grad_()  # a trained model's spread
untrained = torch.randn(batch, classes).requires_grad_()  # lazy sampling falls back here
labels = torch.randint(0, classes, (batch,))
for scores in (trained, untrained):
    scores.grad = torch.zeros_like(scores)  # the .grad buffer is not the loss's extra memory
cases = [
    (F.cross_entropy, trained),
    (NoisedTopKLoss(k=5, sampler="full"), trained),
    (NoisedTopKLoss(k=5, sampler="lazy"), trained),
    (NoisedTopKLoss(k=5, sampler="lazy"), untrained),
]
for loss, _ in cases:  # warm up every code path on a small input
    loss(torch.randn(4, 300, requires_grad=True), torch.zeros(4, dtype=torch.long)).backward()
base = peak_kib()
for loss, scores in cases:
    loss(scores, labels).backward()
    print(peak_kib() - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's VmHWM")
def test_peak_memory_stays_within_twice_cross_entropy():
    """Peak extra resident memory at B=128, C=100000, n_samples=5 (the (B, C, n_samples) noise
    of a materialising implementation alone would be 5x the scores).

    One fresh process runs cross-entropy first, then each sampler: the peak after a sampler is
    base + max(cross-entropy's extra, the sampler's extra), so it staying under base + twice
    cross-entropy's extra proves the sampler's extra is under twice cross-entropy's.
    """
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    cross_entropy, *after_samplers = map(int, result.stdout.split())
    scores_kib = 128 * 100_000 * 4 // 1024
    assert cross_entropy >= scores_kib  # it measured something: at least the softmax output
    for after in after_samplers:  # full, lazy on trained-like and on untrained-like scores
        assert after < 2 * cross_entropy, (cross_entropy, after_samplers)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_matches_cpu_with_the_same_noise():
    gen = torch.Generator().manual_seed(12)
    scores = torch.randn(16, 300, generator=gen)
    noise = torch.randn(5, 16, 300, generator=gen)
    values, grads = [], []
    for device in ("cpu", "cuda"):
        on_device = scores.to(device).requires_grad_()
        value = smoothed_kth_largest(on_device, 6, epsilon=1.0, n_samples=5, noise=noise.to(device))
        (grad,) = torch.autograd.grad(value.sum(), on_device)
        values.append(value.cpu())
        grads.append(grad.cpu())
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(grads[1], grads[0])


@needs_cuda
@pytest.mark.parametrize("sampler", ["full", "lazy"])
def test_cuda_generator_default_device_and_errors(sampler):
    scores = 5.0 * torch.randn(64, 2000, device="cuda")

    def draw(seed):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        return smoothed_kth_largest(
            scores, 6, epsilon=1.0, n_samples=5, generator=generator, sampler=sampler
        )

    first, again, other = draw(1), draw(1), draw(2)
    assert first.device.type == "cuda"
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    torch.cuda.manual_seed(3)
    default = smoothed_kth_largest(scores, 6, epsilon=1.0, sampler=sampler)
    torch.cuda.manual_seed(3)
    torch.testing.assert_close(
        default, smoothed_kth_largest(scores, 6, epsilon=1.0, sampler=sampler), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="generator is on cpu but the scores are on cuda"):
        smoothed_kth_largest(scores, 6, epsilon=1.0, generator=torch.Generator(), sampler=sampler)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_forward_and_backward(dtype):
    layer = torch.nn.Linear(32, 500).cuda()
    features = torch.randn(8, 32, device="cuda")
    with torch.autocast(device_type="cuda", dtype=dtype):
        scores = layer(features)
        assert scores.dtype == dtype
        value = smoothed_kth_largest(scores, 3, epsilon=1.0, n_samples=5, sampler="lazy")
    assert value.dtype == dtype
    value.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=needs_cuda)], ids=["cpu", "cuda"]
)
def test_backward_runs_under_deterministic_algorithms(device):
    scores = torch.randn(32, 500, device=device).requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            value = smoothed_kth_largest(
                scores,
                6,
                epsilon=1.0,
                n_samples=5,
                generator=torch.Generator(device=device).manual_seed(0),
            )
            grads.append(torch.autograd.grad(value.sum(), scores)[0])
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0].sum(dim=1), torch.ones(32, device=device))
