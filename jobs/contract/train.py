"""The training spec: what one training job runs, validated once, everywhere.

The same model is the HTTP request body, the CLI's YAML/JSON file and the config each Ray worker
re-validates. Unknown keys are errors. Cross-field rules are checked after the fields and report
the field path the user typed (`loss.k: k + 1 = 137 exceeds data.num_classes = 136`).

URL checks use the protocol allow-list of jobs.contract.urls; a caller with other settings (the
service) passes them as validation context:
`TrainSpec.model_validate(body, context={"allowed_protocols": [...], "allowed_roots": [...]})`.

This module must not import torch: the service validates specs without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobs.contract.checkpoint import CheckpointSpec
from jobs.contract.data import DataSpec
from jobs.contract.loss import LOSS_SPECS, LossSpec, NoisedTopKLossSpec

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Run names become storage folder names and Ray run names: no slashes, no leading dot."""

ARCHITECTURES = (
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet18",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "convnet_small",
)
"""Model names the runtime builds: small CIFAR-style ResNets for small images, and torchvision's
ImageNet ResNets by name, and a small plain conv net (3 conv layers, 0.09M parameters) for CPU
experiments."""


class SpecError(ValueError):
    """A spec problem found outside pydantic's field checks, with the field path it concerns.

    `problems` is a list of (field path, message); str() gives one "path: message" per line.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{path}: {message}" for path, message in self.problems))

    def __reduce__(self) -> tuple[type[SpecError], tuple[list[tuple[str, str]]]]:
        # Built again from the problems, not from the message: Ray pickles (and Tune copies) a
        # trial's error, and SpecError(message) would split the message into characters.
        return type(self), (self.problems,)


def format_path(loc: Iterable[str | int]) -> str:
    """("data", "train", 1) -> "data.train[1]"; the path the user typed."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def reported_metrics(ks: Iterable[int], *, has_val: bool) -> list[str]:
    """The per-epoch metric keys a run with these `metrics.ks` writes (and can select on)."""
    keys = ["train_loss"]
    if has_val:
        for k in ks:
            keys += [f"val_top{k}", f"val_macro_top{k}"]
    return keys


def check_metric_choice(
    metric: str, mode: str, *, ks: Iterable[int], has_val: bool, metric_path: str
) -> list[tuple[str, str]]:
    """Problems with choosing `metric` (in `mode`) among the metrics a run reports."""
    available = reported_metrics(ks, has_val=has_val)
    if metric not in available:
        if metric.startswith("val_") and not has_val:
            return [
                (
                    metric_path,
                    f"{metric!r} needs a validation split (data.val is not set); set data.val, "
                    "or select train_loss with mode 'min'",
                )
            ]
        return [(metric_path, f"{metric!r} is not reported; choose one of: {', '.join(available)}")]
    if metric == "train_loss" and mode != "min":
        return [(metric_path, "train_loss is minimised: set mode to 'min'")]
    if metric.startswith("val_") and mode != "max":
        return [(metric_path, f"{metric} is an accuracy: set mode to 'max'")]
    return []


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal[ARCHITECTURES] = "cifar_resnet20"  # type: ignore[valid-type]
    pretrained: str | None = None
    """Local path or fsspec URL of a state_dict (read with weights_only=True); never a hub name."""
    cosine_head: bool | None = None
    """Normalized features and weights (scores in [-1, 1]); None -> the loss decides."""
    compile: bool = False
    """torch.compile the model (worth it on a GPU, where it fuses the network's many small
    kernels; the first epoch pays the compilation)."""


class OptimSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD only; AdamW ignores it."""
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Literal["cosine", "step", "constant"] = "cosine"
    step_size: StrictInt = Field(30, ge=1)
    """Epochs between two decays of the `step` schedule."""
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    """The `step` schedule's decay factor."""
    warmup_epochs: StrictInt = Field(0, ge=0)
    """Linear warmup from lr/10 over this many epochs, then the schedule."""


class MetricsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ks: list[Annotated[StrictInt, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 5], min_length=1
    )
    """The K of every top-K and macro-average top-K accuracy reported on the validation split."""
    select: str = "val_top5"
    """The metric key the best checkpoint is chosen by (the paper: val_macro_top5 on Pl@ntNet)."""
    mode: Literal["max", "min"] = "max"
    collapse_share: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False)
    """Rank-1 collapse warning: each epoch reports `val_collapse_share`, the share of validation
    images whose top-1 prediction is the most-predicted class; above this share the epoch is
    flagged (`collapse_warning` in metrics.jsonl, a line in the job's log, `warnings` in
    result.json). 1.0 never warns. On balanced validation data a healthy model is near
    1/num_classes."""

    @field_validator("ks")
    @classmethod
    def _distinct(cls, ks: list[int]) -> list[int]:
        if len(set(ks)) != len(ks):
            raise ValueError(f"values must be distinct, got {ks}")
        return ks  # in the user's order, so that error paths like metrics.ks[1] point right


class ScalingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_workers: StrictInt = Field(1, ge=1, le=1024)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0, le=1024.0)
    gpus_per_worker: float = Field(1.0, gt=0.0, le=64.0)
    """Used only with use_gpu."""
    accelerator_type: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}$")
    """With use_gpu: the GPU type the workers need, as Ray names it (e.g. "H100", "A100",
    "L4"); Ray schedules them on nodes that have it. None: any GPU."""


class TrainSpec(BaseModel):
    """One training job. After validation `model.cosine_head` is a bool, never None."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=RUN_NAME_PATTERN)
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    loss: LossSpec = Field(default_factory=NoisedTopKLossSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    epochs: StrictInt = Field(10, ge=1, le=100_000)
    batch_size: StrictInt = Field(64, ge=1, le=1_000_000)
    """Per worker."""
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    storage: str | None = None
    """fsspec URL of the runs root; None -> the runtime's default."""
    max_failures: StrictInt = Field(0, ge=-1, le=1000)
    """Worker failures Ray Train recovers from (from the last checkpoint); -1 = unlimited."""
    amp: bool = True
    """Mixed precision; used on GPU only."""
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1)

    @model_validator(mode="after")
    def _check_cross_fields(self, info: ValidationInfo) -> TrainSpec:
        problems = (
            self._loss_problems()
            + self._head_problems()
            + self._metrics_problems()
            + self._optim_problems()
            + self._url_problems(info.context or {})
        )
        if problems:
            raise SpecError(problems)
        return self

    def _loss_problems(self) -> list[tuple[str, str]]:
        problems = []
        num_classes = self.data.num_classes
        k = getattr(self.loss, "k", None)
        if k is not None and k + 1 > num_classes:
            problems.append(("loss.k", f"k + 1 = {k + 1} exceeds data.num_classes = {num_classes}"))
        warmup = getattr(self.loss, "ce_warmup_epochs", 0)
        if warmup >= self.epochs:
            problems.append(
                (
                    "loss.ce_warmup_epochs",
                    f"{warmup} cross-entropy epochs leave no epoch for {self.loss.name} "
                    f"(epochs = {self.epochs})",
                )
            )
        counts = getattr(self.loss, "class_counts", None)
        if counts is not None and len(counts) != num_classes:
            problems.append(
                (
                    "loss.class_counts",
                    f"has {len(counts)} counts but data.num_classes = {num_classes}",
                )
            )
        return problems

    def _head_problems(self) -> list[tuple[str, str]]:
        wants_cosine = type(self.loss).needs_cosine_head
        if self.model.cosine_head is None:
            # a copy, not an in-place edit: the ModelSpec instance may be shared with the caller
            self.model = self.model.model_copy(update={"cosine_head": wants_cosine})
            return []
        if self.model.cosine_head == wants_cosine:
            return []
        if wants_cosine:
            message = (
                f"loss {self.loss.name!r} applies its margins and scale to cosine scores: "
                "it needs cosine_head true (or unset)"
            )
        else:
            takers = ", ".join(name for name, spec in LOSS_SPECS.items() if spec.needs_cosine_head)
            message = (
                "a cosine head gives scores in [-1, 1] and only the losses that apply their own "
                f"scale take it ({takers}): set cosine_head false (or unset)"
            )
        return [("model.cosine_head", message)]

    def _metrics_problems(self) -> list[tuple[str, str]]:
        problems = [
            (
                f"metrics.ks[{i}]",
                f"top-{k} accuracy needs k <= data.num_classes = {self.data.num_classes}",
            )
            for i, k in enumerate(self.metrics.ks)
            if k > self.data.num_classes
        ]
        problems += check_metric_choice(
            self.metrics.select,
            self.metrics.mode,
            ks=self.metrics.ks,
            has_val=self.data.val is not None,
            metric_path="metrics.select",
        )
        if self.schedule.warmup_epochs >= self.epochs:
            problems.append(
                (
                    "schedule.warmup_epochs",
                    f"{self.schedule.warmup_epochs} warmup epochs leave no epoch to train "
                    f"(epochs = {self.epochs})",
                )
            )
        return problems

    def _optim_problems(self) -> list[tuple[str, str]]:
        if not self.optim.nesterov:
            return []
        if self.optim.name != "sgd":
            return [("optim.nesterov", f"only SGD has Nesterov momentum, not {self.optim.name}")]
        if self.optim.momentum == 0.0:
            return [("optim.nesterov", "Nesterov momentum needs optim.momentum > 0")]
        return []

    def _url_problems(self, context: dict[str, Any]) -> list[tuple[str, str]]:
        """Refused URLs; a storage root that cannot be written; with the context's
        `check_local_data` (the service, `topk validate`, `train`, `sweep`), local data and
        weights that do not exist. Remote URLs are never touched here."""
        from jobs.contract.urls import check_url  # lazy: the data layer's import cost stays there

        limits = {
            key: context[key] for key in ("allowed_protocols", "allowed_roots") if key in context
        }
        urls: list[tuple[str, str]] = []
        for split in ("train", "val"):
            source = getattr(self.data, split)
            if isinstance(source, str):
                urls.append((f"data.{split}", source))
            elif source is not None:
                urls += [(f"data.{split}[{i}]", url) for i, url in enumerate(source)]
        if self.model.pretrained is not None:
            urls.append(("model.pretrained", self.model.pretrained))
        if self.storage is not None:
            urls.append(("storage", self.storage))
        problems = []
        local_checks = MAX_LOCAL_DATA_CHECKS if context.get("check_local_data") else 0
        for path, url in urls:
            try:
                checked = check_url(url, **limits)
            except ValueError as exc:
                problems.append((path, str(exc)))
                continue
            if path == "storage":
                problem = _storage_problem(checked)
            elif local_checks > 0:
                local_checks -= 1
                problem = _local_data_problem(path, checked)
            else:
                problem = None
            if problem:
                problems.append((path, problem))
        return problems


_READ_ONLY_PROTOCOLS = frozenset({"http", "https"})

MAX_LOCAL_DATA_CHECKS = 1000
"""At most this many local data paths are looked at per spec (a few stats each): a shard list
longer than that is checked for its first entries only; its worker checks the rest."""


def _local_data_problem(path: str, url: str) -> str | None:
    """Why the local data source or weights file `url` (checked) at spec field `path` is not
    there; None when it is, or when `url` is remote (never touched at validation)."""
    import os

    from jobs.contract.urls import is_local, local_source_problem

    if not is_local(url):
        return None
    if path == "model.pretrained":
        if os.path.isfile(url):
            return None
        if os.path.isdir(url):
            return f"{url} is a folder, not a weights file"
        return f"{url} does not exist"
    return local_source_problem(url, shard=path.endswith("]"))


def _storage_problem(url: str) -> str | None:
    """Why runs cannot be written under the (checked) storage root `url`, when that is cheap to
    tell: a read-only protocol, or a local path that is (or lies under) a regular file, or
    whose nearest existing folder is not writable. One stat per level, no listing."""
    import os

    from jobs.contract.urls import is_local, url_protocol

    if url_protocol(url) in _READ_ONLY_PROTOCOLS:
        return f"{url_protocol(url)}:// storage is read-only: runs are written there"
    if not is_local(url):
        return None
    path = url
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    if not os.path.isdir(path):
        where = "is" if path == url else f"lies under {path}, which is"
        return f"{url} {where} a file, not a folder: runs cannot be written there"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable: runs cannot be written under {url}"
    return None
