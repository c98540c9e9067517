"""The experiment config: a grid of training runs (datasets x arms x seeds), its selections
on the validation split, and the claims it tests.

One YAML file says which datasets to build (from a local source, with the split, long tail and
label noise of the study), which arms to compare (an arm is a named loss with its
hyperparameters: `ce_cosine: {loss: ldam, max_m: 0.0}`; a bare loss name is an arm of that
loss), the training settings shared by every run, the seeds, each arm's learning rate grid and
the loss hyperparameters to sweep (both selected on the validation split of one seed, never the
test split), and which arms the paper's claims compare. No torch import.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from jobs.contract.loss import LOSS_SPECS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

LONG_TAIL_BASELINES = ("cross_entropy", "focal", "ldam", "logit_adjusted", "smooth_topk_svm")
"""Claim 2's default baselines: the losses of the paper's Pl@ntNet comparison."""


class DatasetConfig(BaseModel):
    """One dataset of the grid: how its shards are built and what K it is scored at."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=NAME_PATTERN)
    study: Literal["label_noise", "long_tail"]
    """Which claim the dataset tests: balanced training with noisy labels, or a long tail."""
    title: str | None = None
    source: str
    """A local image folder, .zip, .npz or IDX folder; relative to the config file's folder."""
    k: StrictInt = Field(ge=1)
    seed: StrictInt = Field(0, ge=0)
    """The split seed (the same split for every run of the dataset)."""
    val_fraction: float = Field(ge=0.0, lt=1.0)
    test_fraction: float = Field(ge=0.0, lt=1.0)
    """The share of each class held out for testing; 0 with `test_from`."""
    test_from: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """The official test set of an IDX folder source: the stem of its test files (Fashion-MNIST:
    `t10k-`), all of whose items make the test split; the other IDX files make the training
    and validation splits."""
    max_per_class: StrictInt | None = Field(None, ge=1)
    imbalance_ratio: float = Field(1.0, ge=1.0)
    imbalance_profile: Literal["exp", "step"] = "exp"
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)
    """The noise level p of the training labels (validation and test keep the true labels):
    `block`: each label is redrawn with probability p, uniformly inside its block (the true
    label included, as in the paper), so a share p (b-1)/b ends up wrong; `class_prefix` and
    `none`: a share p of the labels is replaced by another class of the group."""
    noise_groups: Literal["none", "class_prefix", "block"] = "none"
    """`block`: the paper's model (Garcin et al. 2022, CIFAR-100): a noisy label stays in its
    block of `noise_block` consecutive classes (a last, smaller block joins the one before);
    `class_prefix`: in the group named by the class name up to its first '/' (Omniglot: the
    alphabet); `none`: any class."""
    noise_block: StrictInt = Field(5, ge=2)
    clean: str | None = None
    """For a dataset with label noise: the dataset without it whose validation and test splits
    are the same (claim 1 compares the clean-to-noisy drop, seed by seed)."""
    losses: list[str] | None = None
    """The arms run on this dataset (None: every arm of the experiment)."""
    max_size: StrictInt | None = Field(None, ge=1)
    image_format: Literal["keep", "png", "jpeg", "webp"] = "keep"
    training: dict[str, Any] = Field(default_factory=dict)
    """Training-spec fields for this dataset's runs, merged over the experiment's `training`."""

    @model_validator(mode="after")
    def _check_test_split(self) -> DatasetConfig:
        if self.test_from is None and self.test_fraction == 0:
            raise ValueError("test_fraction must be above 0 (or give test_from)")
        if self.test_from is not None and self.test_fraction != 0:
            raise ValueError("test_from makes the test split: set test_fraction to 0")
        return self

    @property
    def select_metric(self) -> str:
        return f"val_macro_top{self.k}"


class SweepConfig(BaseModel):
    """A grid over loss hyperparameters, run with one seed on the listed datasets; each loss
    keeps the values with the best `val_macro_top{K}` at its best epoch."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[str] = Field(min_length=1)
    seed: StrictInt = Field(0, ge=0)
    space: dict[str, dict[str, list[Any]]] = Field(min_length=1)
    """loss name -> hyperparameter -> values; the grid is their product."""


LrGrid = Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=2, max_length=6)]


class LrSelectionConfig(BaseModel):
    """Each arm's learning rate, chosen per dataset on the validation split of one seed (the
    best `val_macro_top{K}` at its best epoch) from `grid` (or the arm's own grid in `grids`,
    for losses whose gradient scale is far from cross-entropy's); the other seeds run with it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    grid: LrGrid
    grids: dict[str, LrGrid] = Field(default_factory=dict)
    """arm name -> its grid, in place of `grid`."""
    seed: StrictInt = Field(0, ge=0)

    def grid_for(self, arm: str) -> list[float]:
        return list(self.grids.get(arm, self.grid))


class NoiseClaimConfig(BaseModel):
    """Claim 1 (label noise): each of `methods` against the best of `baselines`, and its
    clean-to-noisy drop against `reference`'s."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(default_factory=lambda: ["noised_topk"], min_length=1)
    baselines: list[str] = Field(
        default_factory=lambda: ["cross_entropy", "smooth_topk_svm"], min_length=1
    )
    reference: str = "cross_entropy"


class LongTailClaimConfig(BaseModel):
    """Claim 2 (long tail): each of `methods` against every one of `baselines`."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] = Field(default_factory=lambda: ["noised_topk_imbalanced"], min_length=1)
    baselines: list[str] = Field(default_factory=lambda: list(LONG_TAIL_BASELINES), min_length=1)


class ClaimsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label_noise: NoiseClaimConfig = Field(default_factory=NoiseClaimConfig)
    long_tail: LongTailClaimConfig = Field(default_factory=LongTailClaimConfig)


class ReducedGridConfig(BaseModel):
    """A grid smaller than the full protocol: the report says so, what was cut and which
    conclusions it cannot support."""

    model_config = ConfigDict(extra="forbid")

    full: str
    """The config of the full protocol (e.g. experiments/paper.yaml)."""
    changes: list[str] = Field(min_length=1)
    cannot_support: list[str] = Field(default_factory=list)


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    title: str = "Experiment"
    seeds: list[StrictInt] = Field(min_length=1)
    concurrency: StrictInt | None = Field(None, ge=1, le=64)
    """Runs trained at the same time, each in its own process (sharing the GPU when there is
    one); `topk experiment --concurrency` overrides it. None: 2 on the CPU, 4 on a GPU."""
    losses: dict[str, dict[str, Any]] = Field(min_length=1)
    """arm name -> its loss (`loss: NAME`, default the arm's name) and hyperparameters (`k` and
    `class_counts` are filled per dataset)."""
    training: dict[str, Any] = Field(default_factory=dict)
    datasets: list[DatasetConfig] = Field(min_length=1)
    sweep: SweepConfig | None = None
    lr_selection: LrSelectionConfig | None = None
    claims: ClaimsConfig = Field(default_factory=ClaimsConfig)
    reduced: ReducedGridConfig | None = None
    """Set in a reduced grid (None: this is the full protocol)."""
    base_dir: Path = Path(".")
    """Where relative `source` paths start: set to the config file's folder when loading."""

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, losses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = []
        for arm, params in losses.items():
            if not re.fullmatch(NAME_PATTERN, arm):
                problems.append(f"arm name {arm!r} must match {NAME_PATTERN}")
            loss = params.get("loss", arm)
            if loss not in LOSS_SPECS:
                problems.append(
                    f"{arm}: unknown loss {loss!r}; valid: {', '.join(sorted(LOSS_SPECS))}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return losses

    @model_validator(mode="after")
    def _check_names(self) -> ExperimentConfig:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be distinct, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        problems = []
        if self.lr_selection is not None:
            grids = self.lr_selection.grids
            problems.append(_unknown("lr_selection.grids", "arms", grids, self.losses))
        if self.sweep is not None:
            problems.append(_unknown("sweep.space", "arms", self.sweep.space, self.losses))
            problems.append(_unknown("sweep.datasets", "datasets", self.sweep.datasets, names))
        for dataset in self.datasets:
            where = f"datasets.{dataset.name}"
            problems.append(_unknown(f"{where}.losses", "arms", dataset.losses, self.losses))
            clean = [dataset.clean] if dataset.clean else []
            problems.append(_unknown(f"{where}.clean", "datasets", clean, names))
            twin = next((d for d in self.datasets if d.name == dataset.clean), None)
            if twin is not None and (twin.label_noise > 0 or twin.study != dataset.study):
                problems.append(
                    f"{where}.clean: {twin.name} must be a {dataset.study} dataset "
                    "without label noise"
                )
        for part in ("label_noise", "long_tail"):  # defaults apply to the arms present
            rule = getattr(self.claims, part)
            for key in sorted(rule.model_fields_set):
                value = getattr(rule, key)
                named = [value] if isinstance(value, str) else value
                problems.append(_unknown(f"claims.{part}.{key}", "arms", named, self.losses))
        problems = [p for p in problems if p]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def source_path(self, dataset: DatasetConfig) -> Path:
        path = Path(dataset.source).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def training_for(self, dataset: DatasetConfig) -> dict[str, Any]:
        return deep_merge(self.training, dataset.training)

    def loss_of(self, arm: str) -> str:
        """The registry name of an arm's loss."""
        return str(self.losses[arm].get("loss", arm))

    def params_of(self, arm: str) -> dict[str, Any]:
        """An arm's loss hyperparameters as configured (without `loss`)."""
        return {key: value for key, value in self.losses[arm].items() if key != "loss"}

    def arms_for(self, dataset: DatasetConfig) -> list[str]:
        """The arms run on `dataset`, in the order of `losses`."""
        chosen = set(dataset.losses) if dataset.losses is not None else set(self.losses)
        return [arm for arm in self.losses if arm in chosen]


def _unknown(field: str, kind: str, given: Any, known: Any) -> str:
    missing = sorted(set(given or []) - set(known))
    if not missing:
        return ""
    where = " (not in `losses`)" if kind == "arms" else ""
    return f"{field} names unknown {kind}{where}: {', '.join(missing)}"


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursively for nested dicts; neither is modified."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML/JSON file. Raises ValueError naming the field."""
    import yaml
    from pydantic import ValidationError

    from jobs.contract.train import format_path

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    raw.pop("base_dir", None)
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{format_path(e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ValueError(f"{path}: invalid experiment config\n" + "\n".join(lines)) from None
    return config.model_copy(update={"base_dir": path.resolve().parent})
