"""Input checks shared by every loss: clear ValueErrors instead of index errors or silent NaN."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


def check_class_counts(name: str, counts: object) -> torch.Tensor:
    """A 1-D float64 tensor of non-negative, finite per-class training counts."""
    if counts is None:
        raise ValueError(f"{name} is required (the per-class training counts)")
    t = torch.as_tensor(counts, dtype=torch.float64)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(
            f"{name} must be a list of at least 2 per-class counts, got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative counts")
    if (t == 0).all():
        raise ValueError(f"{name} must hold at least one positive count")
    return t


CHECK_MODES = ("first", "always", "never")
"""When a loss reads its inputs' values on the host (see InputChecks)."""


def check_shapes(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """The host-only checks of scores [batch, num_classes] and labels [batch]: types, shapes, k.

    Reads no tensor value, so it never synchronises a GPU. `k` (when given) requires
    k + 1 <= num_classes; `num_classes` (when given, e.g. the length of class_counts) must match
    the scores. Returns the labels as int64 (any integer dtype is accepted; bool and floating
    labels are refused).
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError("scores must be a floating-point tensor of shape [batch, num_classes]")
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [batch, num_classes], got {tuple(scores.shape)}")
    batch, classes = scores.shape
    if batch == 0:
        raise ValueError("scores has an empty batch")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
    ):
        raise ValueError("labels must be an integer tensor of shape [batch]")
    if labels.shape != (batch,):
        raise ValueError(
            f"labels must have shape [{batch}] to match scores, got {tuple(labels.shape)}"
        )
    if labels.device != scores.device:
        raise ValueError(f"labels are on {labels.device} but the scores are on {scores.device}")
    if num_classes is not None and classes != num_classes:
        raise ValueError(f"scores have {classes} classes but the loss was built for {num_classes}")
    if k is not None and k + 1 > classes:
        raise ValueError(f"k + 1 = {k + 1} exceeds the number of classes ({classes})")
    return labels.long()


def check_values(scores: torch.Tensor, labels: torch.Tensor) -> None:
    """The value checks: labels in [0, num_classes) and finite scores. Reads values on the host
    (one synchronisation on a GPU). Raises ValueError naming the bad label or the NaN/inf."""
    classes = scores.shape[1]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is out of range [0, {classes - 1}]")
    # One reduction first: any NaN or infinity makes the sum non-finite, and the sum costs a
    # fraction of an elementwise isfinite over [batch, classes]. Only a non-finite sum (which can
    # also be a harmless overflow of large finite scores) pays for the exact check.
    if not torch.isfinite(scores.detach().sum()) and not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")


def check_scores_labels(
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """check_shapes then check_values: every check, eagerly. Returns the labels as int64.

    Non-finite scores are an error, not a silent NaN loss.
    """
    labels = check_shapes(scores, labels, k=k, num_classes=num_classes)
    check_values(scores, labels)
    return labels


def flag_bad_values(
    scores: torch.Tensor, labels: torch.Tensor, *, scan_scores: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value checks on the device, without a host synchronisation.

    Returns (labels clamped into [0, num_classes), a 0-d bool tensor: some label was out of range
    or, with scan_scores, some score is NaN or infinite). The clamped labels make every later
    gather or index safe: an out-of-range index on a GPU is a device-side assert that kills the
    CUDA context, not an error anyone can catch.
    """
    classes = scores.shape[1]
    safe = labels.clamp(0, classes - 1)
    bad = (safe != labels).any()
    if scan_scores:
        # A float64 sum of finite float32/half scores cannot overflow, so it is non-finite
        # exactly when some score is NaN or infinite (one read of the scores, one scalar out).
        bad = bad | ~torch.isfinite(scores.detach().sum(dtype=torch.float64))
    return safe, bad


def poison(loss: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """The loss, or NaN where `bad` (a 0-d bool tensor from the device checks) is set."""
    if bad is None:
        return loss
    return loss.masked_fill(bad, float("nan"))


def host_reads_allowed(tensor: torch.Tensor) -> bool:
    """False while torch.compile traces or a CUDA graph is being captured: reading a value on
    the host then is a graph break or an error, so the checks stay on the device."""
    if torch.compiler.is_compiling():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


class InputChecks:
    """Whether a loss checks its inputs' values on the host (a clear ValueError at once) or on
    the device (no synchronisation: a bad input turns the loss into NaN).

    Shapes, dtypes and k are always checked on the host: that reads no value. For the values
    (labels in range, finite scores) the mode says:
    - "first" (the default): on a GPU, the first call of each loss object checks on the host,
      later calls on the device; on a CPU, every call checks on the host (there is nothing to
      synchronise);
    - "always": every call checks on the host (one synchronisation per call on a GPU);
    - "never": every call checks on the device, on a CPU too.
    Under torch.compile or CUDA-graph capture the checks always stay on the device. A NaN loss
    from a device check is what a training loop's finite-loss check catches; run the same batch
    with mode "always" to get the ValueError that names the bad label or score.
    """

    def __init__(self, mode: str = "first") -> None:
        if mode not in CHECK_MODES:
            raise ValueError(f"check_inputs must be one of {', '.join(CHECK_MODES)}, got {mode!r}")
        self.mode = mode
        self._host_checked = False

    def on_host(self, scores: torch.Tensor) -> bool:
        """Whether this call checks the values on the host (and records that it did)."""
        if self.mode == "never" or not host_reads_allowed(scores):
            return False
        if self.mode == "always" or scores.device.type == "cpu":
            return True
        if self._host_checked:
            return False
        self._host_checked = True
        return True


def checked_labels(
    checks: InputChecks,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int | None = None,
    num_classes: int | None = None,
    scan_scores: bool = True,
    device_checks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every check a loss makes before its math, as `checks` says.

    Returns (int64 labels, None when the values were checked on the host or device_checks is
    False, else the device flag for `poison`). With the flag the labels come back clamped, safe
    to index with. scan_scores=False leaves the non-finite scan to the caller (cross-entropy
    turns a non-finite score into a non-finite loss itself); device_checks=False leaves every
    device check to the caller (a fused kernel that flags bad rows and labels itself).
    """
    labels = check_shapes(scores, labels, k=k, num_classes=num_classes)
    if checks.on_host(scores):
        check_values(scores, labels)
        return labels, None
    if not device_checks:
        return labels, None
    return flag_bad_values(scores, labels, scan_scores=scan_scores)


class CheckedLoss(nn.Module):
    """A loss whose forward checks its inputs before its math, as `check_inputs` says
    (InputChecks): "first" (default), "always" or "never". Set it on the object:
    `loss.check_inputs = "always"`.

    Subclasses implement `batch_loss`, and `shape_requirements` where the shapes depend on
    their arguments. A subclass sets `scan_scores = False` when a non-finite score already makes
    its loss non-finite, and overrides `flags_bad_values` when a fused kernel makes the device
    checks itself. `repr_fields` names the attributes that `extra_repr` shows.
    """

    scan_scores: ClassVar[bool] = True
    repr_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self._checks = InputChecks()

    @property
    def check_inputs(self) -> str:
        return self._checks.mode

    @check_inputs.setter
    def check_inputs(self, mode: str) -> None:
        self._checks = InputChecks(mode)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.repr_fields)

    def forward(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The mean loss over the batch: a scalar in the scores' dtype.

        scores: [batch, num_classes], any floating dtype; labels: [batch], any integer dtype.
        generator: where the stochastic losses draw their noise (a torch.Generator on the
        scores' device; None: the device's default generator); the others ignore it.
        Raises ValueError for bad shapes or k + 1 > num_classes, and for labels out of range
        or non-finite scores where the values are checked on the host; checked on the device,
        such a batch makes the loss NaN.
        """
        k, num_classes = self.shape_requirements()
        labels, bad = checked_labels(
            self._checks,
            scores,
            labels,
            k=k,
            num_classes=num_classes,
            scan_scores=self.scan_scores,
            device_checks=not self.flags_bad_values(scores),
        )
        return poison(self.batch_loss(scores, labels, generator), bad).to(scores.dtype)

    def shape_requirements(self) -> tuple[int | None, int | None]:
        """(k, num_classes): forward requires k + 1 <= the scores' classes where k is set, and
        exactly num_classes classes (those the loss was built for) where that is set."""
        return None, None

    def flags_bad_values(self, scores: torch.Tensor) -> bool:
        """Whether batch_loss flags labels out of range and non-finite scores of these scores
        on the device itself (a fused kernel); forward then makes no device checks."""
        return False

    def batch_loss(
        self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The mean loss over the batch, in any dtype (forward casts it to the scores').

        scores as forward's; labels int64, checked or clamped into range (unless
        flags_bad_values said that the loss checks them itself).
        """
        raise NotImplementedError
