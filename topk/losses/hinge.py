"""Top-K calibrated hinge losses: hard (Yang & Koyejo 2020) and stochastically smoothed
(Garcin et al., ICML 2022), balanced and imbalanced.

For scores s: [batch, classes] and labels y: [batch], with top_j the j-th largest entry of s
(over all of s, s_y included):
- TopKHingeLoss:            mean (1 + top_{k+1}(s) - s_y)_+
- NoisedTopKLoss:           mean (1 + top_{k+1,eps}(s) - s_y)_+
- NoisedTopKImbalancedLoss: mean scale * (m_y + top_{k+1,eps}(s) - s_y)_+ on cosine scores,
  with LDAM margins m_y = max_m * (n_min / n_y)^(1/4).
"""

from __future__ import annotations

import torch

from topk.fused_selection import noised_hinge_rows, uses_triton
from topk.losses.imbalance import ldam_margins
from topk.sampling import check_generator, check_sampler, working_dtype
from topk.smoothing import smoothed_kth_largest_rows
from topk.validation import (
    CheckedLoss,
    check_class_counts,
    check_positive_float,
    check_positive_int,
    poison,
)


def _label_scores(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s_y: [batch] from scores [batch, classes] and int64 labels [batch] in range."""
    return scores.gather(1, labels.unsqueeze(1)).squeeze(1)


class TopKHingeLoss(CheckedLoss):
    """The hard top-K calibrated hinge: mean over the batch of (1 + top_{k+1}(s) - s_y)_+.

    forward(scores [batch, classes], labels [batch] int) -> scalar in the scores' dtype.
    The generator argument is accepted for a uniform interface and ignored. Raises ValueError
    for bad shapes, k + 1 > classes, labels out of range or non-finite scores (values are checked
    as `check_inputs` says: on a GPU after the first call, a bad value makes the loss NaN).
    """

    needs_cosine_head = False
    needs_class_counts = False
    repr_fields = ("k",)

    def __init__(self, *, k: int = 5) -> None:
        super().__init__()
        self.k = check_positive_int("k", k)

    def shape_requirements(self) -> tuple[int | None, int | None]:
        return self.k, None

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        work = scores.to(working_dtype(scores.dtype))
        kth = torch.topk(work, self.k + 1, dim=1).values[:, self.k]
        hinge = (1.0 + kth - _label_scores(work, labels)).clamp_min(0.0)
        return hinge.mean()


class _SmoothedHingeLoss(CheckedLoss):
    """What the balanced and the imbalanced smoothed hinge share: mean over the batch of
    scale * (m_y + top_{k+1,eps}(s) - s_y)_+ in the working dtype, m_y = 1 or per-class margins.

    k, epsilon, n_samples and sampler as in NoisedTopKLoss.
    """

    k: int
    epsilon: float
    n_samples: int
    sampler: str

    def _set_smoothing(self, k: int, epsilon: float, n_samples: int) -> None:
        """Check and set k, epsilon and n_samples (a ValueError names a bad one)."""
        self.k = check_positive_int("k", k)
        self.epsilon = check_positive_float("epsilon", epsilon)
        self.n_samples = check_positive_int("n_samples", n_samples)

    def shape_requirements(self) -> tuple[int | None, int | None]:
        return self.k, None

    def flags_bad_values(self, scores: torch.Tensor) -> bool:
        # The fused kernel flags non-finite rows and labels out of range itself, so the device
        # checks cost nothing more there.
        return self.sampler == "full" and uses_triton(scores)

    def hinge_mean(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        margins: torch.Tensor | None,
        scale: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The batch loss with per-class `margins` [num_classes] (None: m_y = 1)."""
        check_generator(generator, scores.device)
        if self.flags_bad_values(scores):
            # One kernel reads the scores in their own dtype, noises, selects and finishes each
            # row's hinge (label score, margin, scale).
            hinge, bad = noised_hinge_rows(
                scores,
                labels.contiguous(),
                1.0 if margins is None else margins,
                self.k + 1,
                self.epsilon,
                self.n_samples,
                scale=scale,
                generator=generator,
            )
            return poison(hinge.mean(), bad)
        work = scores.to(working_dtype(scores.dtype))
        kth = smoothed_kth_largest_rows(
            work,
            self.k + 1,
            epsilon=self.epsilon,
            n_samples=self.n_samples,
            generator=generator,
            sampler=self.sampler,
        )
        margin = (
            1.0 if margins is None else margins.to(device=work.device, dtype=work.dtype)[labels]
        )
        hinge = (margin + kth - _label_scores(work, labels)).clamp_min(0.0)
        return scale * hinge.mean()


class NoisedTopKLoss(_SmoothedHingeLoss):
    """The balanced smoothed top-K hinge: mean over the batch of (1 + top_{k+1,eps}(s) - s_y)_+.

    top_{k+1,eps} is the Monte-Carlo smoothed (k+1)-th largest score over `n_samples` Gaussian
    draws of scale `epsilon` (topk.smoothing). forward(scores [batch, classes], labels [batch]
    int, generator=None) -> scalar in the scores' dtype; the noise comes from `generator` (a
    torch.Generator on the scores' device) or the device's default generator. sampler: "full"
    or "lazy" (exact lazy sampling, same distribution). Raises ValueError for bad arguments,
    bad shapes, k + 1 > classes, labels out of range or non-finite scores (values are checked
    as `check_inputs` says: on a GPU after the first call, a bad value makes the loss NaN).
    """

    needs_cosine_head = False
    needs_class_counts = False
    repr_fields = ("k", "epsilon", "n_samples", "sampler")

    def __init__(
        self,
        *,
        k: int = 5,
        epsilon: float = 1.0,
        n_samples: int = 5,
        sampler: str = "full",
    ) -> None:
        super().__init__()
        self._set_smoothing(k, epsilon, n_samples)
        self.sampler = check_sampler(sampler)

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return self.hinge_mean(scores, labels, None, 1.0, generator)


class NoisedTopKImbalancedLoss(_SmoothedHingeLoss):
    """The imbalanced smoothed top-K hinge on cosine scores:
    mean over the batch of scale * (m_y + top_{k+1,eps}(s) - s_y)_+.

    scores are cosine similarities in [-1, 1] (a normalized head); `scale` is applied here.
    class_counts: the per-class training counts (required), giving the LDAM margins
    m_y = max_m * (n_min / n_y)^(1/4); a class with zero count gets max_m. forward as in
    NoisedTopKLoss; scores must have len(class_counts) classes. Raises ValueError for bad
    arguments or input.
    """

    needs_cosine_head = True
    needs_class_counts = True
    repr_fields = ("k", "epsilon", "n_samples", "max_m", "scale", "num_classes", "sampler")

    margins: torch.Tensor
    margins32: torch.Tensor

    def __init__(
        self,
        *,
        k: int = 5,
        epsilon: float = 0.01,
        n_samples: int = 5,
        max_m: float = 0.2,
        scale: float = 60.0,
        class_counts: list[int] | None = None,
        sampler: str = "full",
    ) -> None:
        super().__init__()
        self._set_smoothing(k, epsilon, n_samples)
        self.max_m = check_positive_float("max_m", max_m, allow_zero=True)
        self.scale = check_positive_float("scale", scale)
        self.sampler = check_sampler(sampler)
        counts = check_class_counts("class_counts", class_counts)
        if self.k + 1 > counts.numel():
            raise ValueError(
                f"k + 1 = {self.k + 1} exceeds the number of classes ({counts.numel()})"
            )
        self.num_classes = counts.numel()
        # float64 so that float64 scores get exact margins (cast to the scores' dtype in
        # forward); not persistent: the margins follow from the constructor arguments.
        self.register_buffer("margins", ldam_margins(counts, self.max_m), persistent=False)
        # The same in float32, for float32 and half-precision scores: no cast per call.
        self.register_buffer("margins32", self.margins.float(), persistent=False)

    def shape_requirements(self) -> tuple[int | None, int | None]:
        return self.k, self.num_classes

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        margins = self.margins if scores.dtype == torch.float64 else self.margins32
        return self.hinge_mean(scores, labels, margins, self.scale, generator)
