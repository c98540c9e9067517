"""The fused noise-and-select Triton kernels (topk.fused_selection) against the PyTorch reference
(topk.smoothing) and float64 references written from the math.

On a machine without CUDA the kernels run through Triton's interpreter (tests/topk/conftest.py
sets TRITON_INTERPRET=1), about 20-70 ms per program (one row and four draws): the shapes are
small there, and the Monte-Carlo tests draw fewer samples (their tolerances follow from the
standard error of what they draw, so they are only looser, not wrong).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import ndtr
from test_smoothing import exact_expected_kth_largest

from topk.full_sampling import sample_kth_largest_full
from topk.fused_selection import noised_hinge_rows, noised_kth_largest
from topk.selection_launch import draw_seed, hinge_gradient, select_noised, selection_gradient
from topk.smoothing import _MeanOneHotSelection

CUDA = torch.cuda.is_available()


def mc_size(cpu: int, cuda: int) -> int:
    """How many draws (or rows) a Monte-Carlo test makes: few through the interpreter."""
    return cuda if CUDA else cpu


# ---------------------------------------------------------------------------------------------
# float64 references from the math
# ---------------------------------------------------------------------------------------------


def _quadrature_grid(scores: np.ndarray, epsilon: float) -> np.ndarray:
    return np.linspace(scores.min() - 12 * epsilon, scores.max() + 12 * epsilon, 40001)


def _count_exceeding(exceed: np.ndarray) -> np.ndarray:
    """Poisson-binomial: [points, m + 1], column j = P(exactly j of the m entries exceed x),
    from exceed [points, m] = P(entry > x)."""
    points, m = exceed.shape
    count = np.zeros((points, m + 1))
    count[:, 0] = 1.0
    for c in range(m):
        p = exceed[:, c : c + 1]
        shifted = np.concatenate([np.zeros((points, 1)), count[:, :-1]], axis=1)
        count = count * (1.0 - p) + shifted * p
    return count


def exact_second_moment_kth_largest(scores: np.ndarray, k: int, epsilon: float) -> float:
    """E[top_k(s + eps Z)^2] for one row: lo^2 + integral_lo^hi 2 x P(X > x) dx, X >= lo a.s."""
    grid = _quadrature_grid(scores, epsilon)
    exceed = 1.0 - ndtr((grid[:, None] - scores[None, :]) / epsilon)
    cdf = _count_exceeding(exceed)[:, :k].sum(axis=1)  # P(fewer than k exceed x)
    return float(grid[0] ** 2 + np.trapezoid(2.0 * grid * (1.0 - cdf), grid))


def exact_selection_probabilities(scores: np.ndarray, k: int, epsilon: float) -> np.ndarray:
    """P(class c holds the k-th largest of s + eps Z) for one row, by quadrature:
    integral of the density of s_c + eps Z_c at x times P(exactly k - 1 others exceed x)."""
    grid = _quadrature_grid(scores, epsilon)
    exceed = 1.0 - ndtr((grid[:, None] - scores[None, :]) / epsilon)
    probabilities = np.zeros(scores.size)
    for c in range(scores.size):
        others = np.delete(exceed, c, axis=1)
        exactly = _count_exceeding(others)[:, k - 1]
        density = stats.norm.pdf((grid - scores[c]) / epsilon) / epsilon
        probabilities[c] = np.trapezoid(density * exactly, grid)
    return probabilities


def draw_counts(indices: torch.Tensor, classes: int) -> torch.Tensor:
    """count[r, c]: how many of row r's draws selected class c, by a plain loop (float64)."""
    rows, n = indices.shape
    counts = torch.zeros(rows, classes, dtype=torch.float64)
    for r in range(rows):
        for d in range(n):
            counts[r, int(indices[r, d])] += 1
    return counts


def reference_noised_hinge(scores, labels, margin, rank, epsilon, noise, grad_hinge, scale=1.0):
    """float64, from the definition: hinge_r = scale * max(0, m_r + mean_d top_rank(s_r +
    eps z_dr) - s_{r,y_r}); its gradient (of sum_r g_r hinge_r) is scale * g_r * (counts_r / n
    - onehot(y_r)) on active rows, 0 on the others. margin: [rows] float64, m_r = m_{y_r}."""
    n, rows, classes = noise.shape
    scores, noise = scores.detach().double().cpu(), noise.double().cpu()
    hinge = torch.zeros(rows, dtype=torch.float64)
    grad = torch.zeros(rows, classes, dtype=torch.float64)
    for r in range(rows):
        y = int(labels[r])
        total, counts = 0.0, torch.zeros(classes, dtype=torch.float64)
        for d in range(n):
            noised = scores[r] + epsilon * noise[d, r]
            order = torch.argsort(noised, descending=True)
            total += float(noised[order[rank - 1]])
            counts[order[rank - 1]] += 1
        hinge[r] = scale * max(0.0, float(margin[r]) + total / n - float(scores[r, y]))
        if hinge[r] > 0:
            grad[r] = scale * float(grad_hinge[r]) * counts / n
            grad[r, y] -= scale * float(grad_hinge[r])
    return hinge, grad


def bfloat16_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 by dropping the low 16 bits (round toward zero)."""
    bits = x.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


class _Saved:
    """A stand-in autograd context: _MeanOneHotSelection.backward of float32 scores."""

    def __init__(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        self.saved_tensors = (indices,)
        self.scores_shape = scores.shape
        self.scores_dtype = torch.float32


# ---------------------------------------------------------------------------------------------
# Same noise: the kernel against topk.smoothing.sample_kth_largest_full
# ---------------------------------------------------------------------------------------------

# (rank, n_draws, classes): classes smaller than a block, not a power of two, and 2500, above
# any forward block (at most 1024 classes), so several blocks are streamed; n_draws 1, 5, 8 (one
# group with 3 dead draws, two groups with 3 dead, two full groups); every rank with every n.
SAME_NOISE_CASES = [
    (1, 1, 7),
    (1, 8, 2500),
    (2, 5, 7),
    (2, 1, 2500),
    (6, 8, 300),
    (6, 5, 2500),
    (6, 1, 6),  # rank = classes: the smallest entry
]


@pytest.mark.parametrize(("rank", "n_draws", "classes"), SAME_NOISE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_noise_gives_the_reference_values_and_indices(
    fused_device, rank, n_draws, classes, dtype
):
    gen = torch.Generator().manual_seed(rank * 100 + n_draws * 10 + classes)
    rows = 3
    scores = (2.0 * torch.randn(rows, classes, generator=gen)).to(dtype).to(fused_device)
    noise = torch.randn(n_draws, rows, classes, generator=gen).to(fused_device)
    work = scores.float()  # what the kernel reads: bf16 read as float32

    # epsilon = 1: scores + 1 * z rounds once, the same everywhere: exactly equal.
    values, indices, label_scores, bad = select_noised(scores, rank, 1.0, n_draws, noise=noise)
    ref_values, ref_indices = sample_kth_largest_full(work, rank, 1.0, n_draws, noise=noise)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (rows, n_draws)
    assert torch.equal(values, ref_values)
    assert torch.equal(indices, ref_indices)
    assert label_scores.numel() == 0
    assert not bad.any()

    # Another epsilon: eps * z + s may be fused (one rounding) or not (two): at most an ulp or
    # two of the noised values apart, and the same selection.
    epsilon = 0.37
    values, indices, _, _ = select_noised(scores, rank, epsilon, n_draws, noise=noise)
    ref_values, ref_indices = sample_kth_largest_full(work, rank, epsilon, n_draws, noise=noise)
    ulp = torch.finfo(torch.float32).eps * float(work.abs().max() + epsilon * noise.abs().max())
    torch.testing.assert_close(values, ref_values, rtol=0, atol=2 * ulp)
    assert torch.equal(indices, ref_indices)


def test_same_noise_with_strided_scores_noise_and_float64_noise(fused_device):
    """Rows that are a slice of a wider tensor, noise that is a slice too, in float64."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 40, generator=gen).to(fused_device)
    noise_wide = torch.randn(5, 4, 50, dtype=torch.float64, generator=gen).to(fused_device)
    scores, noise = wide[:, 3:33], noise_wide[:, :, 10:40]
    assert scores.stride(0) == 40 and noise.stride(1) == 50
    values, indices, _, _ = select_noised(scores, 2, 1.0, 5, noise=noise)
    ref_values, ref_indices = sample_kth_largest_full(scores, 2, 1.0, 5, noise=noise)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)

    # Transposed scores (column stride != 1) are copied first: same result.
    transposed = scores.T.contiguous().T
    assert transposed.stride(1) != 1
    values_t, indices_t, _, _ = select_noised(transposed, 2, 1.0, 5, noise=noise)
    assert torch.equal(values_t, values) and torch.equal(indices_t, indices)


@pytest.mark.parametrize(
    ("rank", "n_draws", "classes", "dtype"),
    [
        (1, 5, 7, torch.float32),
        (3, 8, 1100, torch.float32),  # two backward blocks
        (2, 5, 300, torch.bfloat16),
        (2, 70, 30, torch.float32),  # more than 64 draws: counted with PyTorch
        (4, 70, 30, torch.bfloat16),
    ],
)
def test_fused_backward_equals_the_mean_one_hot_gradient(
    fused_device, rank, n_draws, classes, dtype
):
    gen = torch.Generator().manual_seed(n_draws + classes)
    rows = 3
    scores = torch.randn(rows, classes, generator=gen).to(dtype).to(fused_device)
    noise = torch.randn(n_draws, rows, classes, generator=gen).to(fused_device)
    # Upstream gradients exactly representable in bfloat16: both paths scale the same numbers.
    grad_value = torch.tensor([1.0, -0.75, 2.5], device=fused_device)

    fused_scores = scores.clone().requires_grad_()
    value, bad = noised_kth_largest(fused_scores, rank, 0.8, n_draws, noise=noise)
    assert value.dtype == torch.float32 and not bad.any()
    (fused_grad,) = torch.autograd.grad(value, fused_scores, grad_value)

    ref_values, ref_indices = sample_kth_largest_full(
        scores.float(), rank, 0.8, n_draws, noise=noise
    )
    ref_scores = scores.clone().requires_grad_()
    ref_value = _MeanOneHotSelection.apply(ref_scores, ref_values, ref_indices)
    (ref_grad,) = torch.autograd.grad(ref_value, ref_scores, grad_value.to(dtype))

    assert fused_grad.dtype == dtype and fused_grad.shape == scores.shape
    if dtype == torch.float32 or CUDA:
        assert torch.equal(fused_grad, ref_grad)
    else:
        # The same float32 gradient, but Triton's interpreter casts float32 to bfloat16 by
        # truncation where torch (and a GPU) round to nearest: either rounding, nothing else.
        ref_float = _MeanOneHotSelection.backward(_Saved(ref_indices, scores), grad_value)[0]
        assert torch.equal(ref_grad, ref_float.to(dtype))
        truncated = bfloat16_toward_zero(ref_float)
        assert ((fused_grad == ref_grad) | (fused_grad == truncated)).all()
    torch.testing.assert_close(value, ref_values.mean(dim=1), rtol=1e-6, atol=1e-6)
    # and from the math: g_r * counts_r / n, to the resolution of the gradient's dtype
    counts = draw_counts(ref_indices.cpu(), classes)
    expected = grad_value.double().cpu()[:, None] * counts / n_draws
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(fused_grad.double().cpu(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("n", [64, 65])  # counted in the kernel / with PyTorch
def test_selection_and_hinge_gradients_count_exactly(fused_device, n):
    gen = torch.Generator().manual_seed(0)
    rows, classes = 6, 9
    indices = torch.randint(0, classes, (rows, n), generator=gen)
    row_grad = torch.tensor([1.0, 0.5, -2.0, 0.0, 1.5, 3.0])
    counts = draw_counts(indices, classes)
    shape = torch.Size((rows, classes))

    grad = selection_gradient(
        shape, torch.float32, indices.to(fused_device), row_grad.to(fused_device)
    )
    expected = row_grad.double()[:, None] * counts / n
    torch.testing.assert_close(grad.double().cpu(), expected, rtol=1e-6, atol=0)

    # The hinge: w_r (counts / n - onehot(y_r)), w_r = scale * g_r where the hinge is active.
    # Rows 4 and 5 have labels out of range (flagged by the forward pass): no one-hot, no index.
    labels = torch.tensor([0, 8, 3, 3, -1, classes])
    hinge_rows = torch.tensor([0.5, 0.0, 2.0, 1.0, 1.0, 1.0])  # row 1 inactive
    scale = 2.5
    grad = hinge_gradient(
        shape,
        torch.float32,
        indices.to(fused_device),
        labels.to(fused_device),
        hinge_rows.to(fused_device),
        row_grad.to(fused_device),
        scale,
    )
    weight = torch.where(hinge_rows > 0, scale * row_grad.double(), 0.0)
    expected = weight[:, None] * counts / n
    expected[torch.arange(4), labels[:4]] -= weight[:4]
    torch.testing.assert_close(grad.double().cpu(), expected, rtol=1e-6, atol=1e-7)
    assert (grad[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# The noised hinge against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rank", "n_draws", "classes"), [(3, 5, 300), (2, 9, 1500)])
def test_noised_hinge_rows_matches_the_math(fused_device, dtype, rank, n_draws, classes):
    gen = torch.Generator().manual_seed(rank + classes)
    rows, epsilon, scale = 6, 0.5, 1.5
    scores = torch.randn(rows, classes, generator=gen).to(dtype)
    labels = torch.tensor([0, 1, 2, 3, 4, 2]) * (classes // 5)  # row 5 shares row 2's label
    noise = torch.randn(n_draws, rows, classes, generator=gen)
    # Per-class margins m_y: rows 0 and 3 can never be active; row 1's label leads by far with
    # margin 0, inactive too.
    margins = torch.full((classes,), 0.25)
    margins[labels] = torch.tensor([-100.0, 0.0, 1.0, -100.0, 2.0, 1.0])
    scores[1, labels[1]] = 50.0
    grad_hinge = torch.tensor([1.0, 2.0, 0.5, 1.0, -1.5, 3.0])

    on_device = scores.to(fused_device, copy=True).requires_grad_()
    hinge, bad = noised_hinge_rows(
        on_device,
        labels.to(fused_device),
        margins.to(fused_device),
        rank,
        epsilon,
        n_draws,
        scale=scale,
        noise=noise.to(fused_device),
    )
    assert hinge.dtype == torch.float32 and hinge.shape == (rows,)
    assert bad.shape == () and not bad
    (grad,) = torch.autograd.grad(hinge, on_device, grad_hinge.to(fused_device))

    ref_hinge, ref_grad = reference_noised_hinge(
        scores.float(), labels, margins.double()[labels], rank, epsilon, noise, grad_hinge, scale
    )
    assert (ref_hinge[[0, 1, 3]] == 0).all() and (ref_hinge[[2, 4, 5]] > 0).all()
    torch.testing.assert_close(hinge.double().cpu(), ref_hinge, rtol=1e-6, atol=1e-5)
    assert grad.dtype == dtype
    resolution = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=resolution, atol=1e-6)
    assert (grad[[0, 1, 3]] == 0).all()

    # A float margin, and the default scale 1.
    hinge_float, _ = noised_hinge_rows(
        scores.to(fused_device),
        labels.to(fused_device),
        1.0,
        rank,
        epsilon,
        n_draws,
        noise=noise.to(fused_device),
    )
    ref_float, _ = reference_noised_hinge(
        scores.float(),
        labels,
        torch.ones(rows, dtype=torch.float64),
        rank,
        epsilon,
        noise,
        grad_hinge,
    )
    torch.testing.assert_close(hinge_float.double().cpu(), ref_float, rtol=1e-6, atol=1e-5)


def test_noised_hinge_rows_gradient_with_more_than_64_draws(fused_device):
    gen = torch.Generator().manual_seed(1)
    rows, classes, n_draws, rank = 3, 20, 66, 2
    scores = torch.randn(rows, classes, generator=gen)
    labels = torch.tensor([4, 0, 19])
    noise = torch.randn(n_draws, rows, classes, generator=gen)
    margins = torch.ones(classes)
    margins[0] = -100.0  # row 1: inactive
    grad_hinge = torch.tensor([0.5, 1.0, 2.0])
    on_device = scores.to(fused_device, copy=True).requires_grad_()
    hinge, _ = noised_hinge_rows(
        on_device,
        labels.to(fused_device),
        margins.to(fused_device),
        rank,
        0.7,
        n_draws,
        scale=3.0,
        noise=noise.to(fused_device),
    )
    (grad,) = torch.autograd.grad(hinge, on_device, grad_hinge.to(fused_device))
    ref_hinge, ref_grad = reference_noised_hinge(
        scores, labels, margins.double()[labels], rank, 0.7, noise, grad_hinge, 3.0
    )
    assert ref_hinge[1] == 0 and (ref_hinge[[0, 2]] > 0).all()
    torch.testing.assert_close(hinge.double().cpu(), ref_hinge, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-6, atol=1e-6)


def test_noised_hinge_rows_with_many_programs_per_row(fused_device):
    """Many draws (many programs per row, the last to arrive finishing the row's hinge) and
    many rows, against the same math in vectorised float64."""
    rows, n_draws, classes = mc_size(4, 512), mc_size(20, 200), mc_size(50, 1000)
    rank, epsilon, scale = 4, 0.8, 2.0
    gen = torch.Generator().manual_seed(8)
    scores = torch.randn(rows, classes, generator=gen)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    noise = torch.randn(n_draws, rows, classes, generator=gen)
    margins = torch.rand(classes, generator=gen) * 2 - 0.5
    scores[::3][torch.arange(len(scores[::3])), labels[::3]] += 20.0  # these rows: inactive
    grad_hinge = torch.rand(rows, generator=gen) + 0.5
    on_device = scores.to(fused_device, copy=True).requires_grad_()
    hinge, bad = noised_hinge_rows(
        on_device,
        labels.to(fused_device),
        margins.to(fused_device),
        rank,
        epsilon,
        n_draws,
        scale=scale,
        noise=noise.to(fused_device),
    )
    assert not bad
    (grad,) = torch.autograd.grad(hinge, on_device, grad_hinge.to(fused_device))

    noised = scores.double()[None] + epsilon * noise.double()  # [n, rows, classes]
    top = noised.topk(rank, dim=2)
    kth, chosen = top.values[..., rank - 1], top.indices[..., rank - 1]  # [n, rows]
    label_scores = scores.double()[torch.arange(rows), labels]
    ref_hinge = scale * (margins.double()[labels] + kth.mean(dim=0) - label_scores).clamp_min(0)
    counts = torch.zeros(rows, classes, dtype=torch.float64)
    counts.scatter_add_(1, chosen.T, torch.ones(rows, n_draws, dtype=torch.float64))
    weight = torch.where(ref_hinge > 0, scale * grad_hinge.double(), 0.0)
    ref_grad = weight[:, None] * counts / n_draws
    ref_grad[torch.arange(rows), labels] -= weight
    assert (ref_hinge[::3] == 0).all() and (ref_hinge > 0).any()
    torch.testing.assert_close(hinge.double().cpu(), ref_hinge, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Drawing its own noise: in distribution, and reproducible
# ---------------------------------------------------------------------------------------------


def test_drawn_noise_is_standard_normal_and_independent(fused_device):
    """With one class and rank 1 the kept value is the noise itself: z ~ N(0, 1), iid over
    draws (within a Philox call and across programs) and rows."""
    rows, n_draws = mc_size(8, 1024), mc_size(64, 1024)
    scores = torch.zeros(rows, 1, device=fused_device)
    gen = torch.Generator(device=fused_device).manual_seed(0)
    values, indices, _, bad = select_noised(
        scores, 1, 1.0, n_draws, seed=draw_seed(fused_device, gen)
    )
    assert (indices == 0).all() and not bad.any()
    z = values.double().cpu()
    count = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(count)
    assert abs(z.var().item() - 1.0) < 5 * math.sqrt(2 / count)
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-6

    def correlation(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    # draws 4j and 4j + 1 (same Box-Muller pair), 4j + 1 and 4j + 2 (same Philox call), 4j and
    # 4j + 4 (another program), and neighbouring rows.
    pairs = [
        (z[:, 0::4], z[:, 1::4]),
        (z[:, 1::4], z[:, 2::4]),
        (z[:, 0::4][:, :-1], z[:, 4::4]),
        (z[:-1], z[1:]),
    ]
    for a, b in pairs:
        assert abs(correlation(a, b)) < 5 / math.sqrt(a.numel())


def test_drawn_selection_matches_the_exact_distribution(fused_device):
    """Mean value vs the quadrature expectation, selection frequencies vs the exact
    probabilities, with a Generator on the device; 5 standard errors."""
    row = np.array([0.3, -0.2, 0.9, 0.1, 0.5])
    rank, epsilon = 2, 0.6
    rows, n_draws = mc_size(16, 1024), mc_size(128, 1024)
    scores = torch.tensor(row, dtype=torch.float32).repeat(rows, 1).to(fused_device)
    scores.requires_grad_()
    gen = torch.Generator(device=fused_device).manual_seed(1)
    value, bad = noised_kth_largest(scores, rank, epsilon, n_draws, generator=gen)
    assert not bad.any()
    (grad,) = torch.autograd.grad(value.sum(), scores)
    draws = rows * n_draws

    mean = exact_expected_kth_largest(row, rank, epsilon)
    variance = exact_second_moment_kth_largest(row, rank, epsilon) - mean**2
    assert 0 < variance < epsilon**2 + np.var(row) * 2
    assert abs(value.double().mean().item() - mean) < 5 * math.sqrt(variance / draws)
    # The rows are independent: their means spread as the order statistic says.
    spread = value.double().var().item() * n_draws
    assert abs(spread / variance - 1) < 5 * math.sqrt(2 / (rows - 1))

    probabilities = exact_selection_probabilities(row, rank, epsilon)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-6)
    frequencies = grad.double().mean(dim=0).cpu().numpy()  # counts / n, averaged over rows
    torch.testing.assert_close(grad.sum(dim=1), torch.ones(rows, device=fused_device))
    for c in range(row.size):
        p = probabilities[c]
        tolerance = 5 * math.sqrt(p * (1 - p) / draws) + 1e-5
        assert abs(frequencies[c] - p) < tolerance, (c, frequencies[c], p)

    # The reference path's frequencies agree with the same exact probabilities.
    _, ref_indices = sample_kth_largest_full(
        scores.detach().cpu().double()[:1],
        rank,
        epsilon,
        20000,
        generator=torch.Generator().manual_seed(2),
    )
    ref_frequencies = torch.bincount(ref_indices.flatten(), minlength=row.size).double() / 20000
    for c in range(row.size):
        p = probabilities[c]
        assert abs(ref_frequencies[c].item() - p) < 5 * math.sqrt(p * (1 - p) / 20000) + 1e-5


def test_same_seed_same_draws_other_seed_other_draws(fused_device):
    scores = torch.randn(4, 37, generator=torch.Generator().manual_seed(0)).to(fused_device)
    labels = torch.tensor([0, 5, 36, 2], device=fused_device)

    def draw(seed):
        gen = torch.Generator(device=fused_device).manual_seed(seed)
        value, _ = noised_kth_largest(scores, 3, 1.0, 6, generator=gen)
        gen = torch.Generator(device=fused_device).manual_seed(seed)
        hinge, _ = noised_hinge_rows(scores, labels, 5.0, 3, 1.0, 6, generator=gen)
        gen = torch.Generator(device=fused_device).manual_seed(seed)
        values, indices, _, _ = select_noised(scores, 3, 1.0, 6, seed=draw_seed(fused_device, gen))
        return value, hinge, values, indices

    first, again, other = draw(7), draw(7), draw(8)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, other, strict=True):
        assert not torch.equal(a, b)
    value, hinge, values, indices = first
    torch.testing.assert_close(value, values.mean(dim=1), rtol=0, atol=0)
    label_scores = scores[torch.arange(4), labels]
    torch.testing.assert_close(hinge, 5.0 + values.mean(dim=1) - label_scores)
    assert len({tuple(v.tolist()) for v in values}) == 4  # every row has its own noise

    # No generator: the device's default one, which follows the global seed.
    torch.manual_seed(11)
    default = noised_kth_largest(scores, 3, 1.0, 6)[0]
    torch.manual_seed(11)
    assert torch.equal(default, noised_kth_largest(scores, 3, 1.0, 6)[0])


# ---------------------------------------------------------------------------------------------
# Per-row flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int8])
def test_bad_scores_and_labels_flag_exactly_their_rows(fused_device, label_dtype):
    gen = torch.Generator().manual_seed(4)
    rows, classes, n_draws = 8, 1100, 5
    scores = torch.randn(rows, classes, generator=gen)
    scores[1, 3] = float("nan")
    scores[3, 1099] = float("inf")  # in the second block
    scores[4, 0] = -float("inf")
    # int8 cannot hold 1100: there row 5's label is 127, in range.
    too_large = 127 if label_dtype == torch.int8 else classes
    labels = torch.tensor([0, 1, -1, 2, 3, too_large, 7, 9])
    noise = torch.randn(n_draws, rows, classes, generator=gen)
    scores_d, noise_d = scores.to(fused_device), noise.to(fused_device)
    labels_d = labels.to(label_dtype).to(fused_device)

    values, indices, label_scores, bad = select_noised(
        scores_d, 2, 1.0, n_draws, noise=noise_d, labels=labels_d
    )
    expected = torch.zeros(rows, dtype=torch.bool)
    expected[[1, 2, 3, 4]] = True
    if label_dtype != torch.int8:
        expected[5] = True
    assert bad.dtype == torch.bool and torch.equal(bad.cpu(), expected)
    good = ~expected
    assert ((indices >= 0) & (indices < classes)).all()  # even on the flagged rows
    ref_values, ref_indices = sample_kth_largest_full(
        scores[good], 2, 1.0, n_draws, noise=noise[:, good]
    )
    assert torch.equal(values.cpu()[good], ref_values)
    assert torch.equal(indices.cpu()[good], ref_indices)
    torch.testing.assert_close(
        label_scores.cpu()[good], scores[good, labels[good].long()], rtol=0, atol=0
    )

    # Without labels only the scores flag a row; the drawn-noise path flags the same rows.
    _, _, _, bad = select_noised(scores_d, 2, 1.0, n_draws, noise=noise_d)
    assert torch.equal(bad.cpu(), torch.isin(torch.arange(rows), torch.tensor([1, 3, 4])))
    value, bad = noised_kth_largest(
        scores_d, 2, 1.0, n_draws, generator=torch.Generator(device=fused_device).manual_seed(0)
    )
    assert torch.equal(bad.cpu(), torch.isin(torch.arange(rows), torch.tensor([1, 3, 4])))
    assert torch.isfinite(value).all()  # the flag, not the value, marks them

    hinge, any_bad = noised_hinge_rows(scores_d, labels_d, 1.0, 2, 1.0, n_draws, noise=noise_d)
    assert any_bad.shape == () and bool(any_bad)
    clean, clean_bad = noised_hinge_rows(
        scores_d[good.to(fused_device)],
        labels_d[good.to(fused_device)],
        1.0,
        2,
        1.0,
        n_draws,
        noise=noise_d[:, good.to(fused_device)],
    )
    assert not clean_bad and torch.isfinite(clean).all()
    assert torch.equal(hinge[good.to(fused_device)], clean)


def test_strided_labels_are_read_as_their_values(fused_device):
    """select_noised and noised_hinge_rows take any [rows] integer labels: a column of a wider
    tensor (stride 2) gives what its contiguous copy gives."""
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(3, 10, generator=gen).to(fused_device)
    noise = torch.randn(2, 3, 10, generator=gen).to(fused_device)
    wide_labels = torch.tensor([[1, 100], [2, 100], [3, 100]], device=fused_device)
    labels = wide_labels[:, 0]
    _, _, label_scores, bad = select_noised(scores, 1, 1.0, 2, noise=noise, labels=labels)
    assert not bad.any()
    torch.testing.assert_close(label_scores, scores[torch.arange(3), labels], rtol=0, atol=0)
    hinge, any_bad = noised_hinge_rows(scores, labels, 1.0, 1, 1.0, 2, noise=noise)
    expected, _ = noised_hinge_rows(scores, labels.contiguous(), 1.0, 1, 1.0, 2, noise=noise)
    assert not any_bad and torch.equal(hinge, expected)


def test_strided_indices_are_read_as_their_values(fused_device):
    """selection_gradient of a slice of the draws' indices is that of its contiguous copy."""
    gen = torch.Generator().manual_seed(7)
    indices = torch.randint(0, 10, (3, 8), generator=gen).to(fused_device)
    row_grad = torch.ones(3, device=fused_device)
    strided = selection_gradient((3, 10), torch.float32, indices[:, :4], row_grad)
    packed = selection_gradient((3, 10), torch.float32, indices[:, :4].contiguous(), row_grad)
    assert torch.equal(strided, packed)
