"""The experiment config: a grid of training runs (datasets x losses x seeds) and its sweeps.

One YAML file says which datasets to build (from a local source, with the split, long tail and
label noise of the study), which losses to compare and with which published hyperparameters,
the training settings shared by every run, the seeds, and which loss hyperparameters to sweep
on which datasets (selected on the validation split, never the test split). No torch import.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from jobs.contract.loss import LOSS_SPECS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


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
    test_fraction: float = Field(gt=0.0, lt=1.0)
    max_per_class: StrictInt | None = Field(None, ge=1)
    imbalance_ratio: float = Field(1.0, ge=1.0)
    imbalance_profile: Literal["exp", "step"] = "exp"
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)
    noise_groups: Literal["none", "class_prefix"] = "none"
    """`class_prefix`: a noisy label stays in the group named by the class name up to its
    first '/' (Omniglot: the alphabet)."""
    max_size: StrictInt | None = Field(None, ge=1)
    image_format: Literal["keep", "png", "jpeg", "webp"] = "keep"
    training: dict[str, Any] = Field(default_factory=dict)
    """Training-spec fields for this dataset's runs, merged over the experiment's `training`."""

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


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    title: str = "Experiment"
    seeds: list[StrictInt] = Field(min_length=1)
    concurrency: StrictInt | None = Field(None, ge=1, le=64)
    """Runs trained at the same time, each in its own process (sharing the GPU when there is
    one); `topk experiment --concurrency` overrides it. None: 2 on the CPU, 4 on a GPU."""
    losses: dict[str, dict[str, Any]] = Field(min_length=1)
    """loss name -> hyperparameters (`k` and `class_counts` are filled per dataset)."""
    training: dict[str, Any] = Field(default_factory=dict)
    datasets: list[DatasetConfig] = Field(min_length=1)
    sweep: SweepConfig | None = None
    base_dir: Path = Path(".")
    """Where relative `source` paths start: set to the config file's folder when loading."""

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, losses: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(losses) - set(LOSS_SPECS))
        if unknown:
            raise ValueError(
                f"unknown loss(es) {', '.join(unknown)}; valid: {', '.join(sorted(LOSS_SPECS))}"
            )
        return losses

    @model_validator(mode="after")
    def _check_names(self) -> ExperimentConfig:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be distinct, got {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.sweep is not None:
            missing = sorted(set(self.sweep.datasets) - set(names))
            if missing:
                raise ValueError(f"sweep.datasets names unknown datasets: {', '.join(missing)}")
            extra = sorted(set(self.sweep.space) - set(self.losses))
            if extra:
                raise ValueError(f"sweep.space names losses not in `losses`: {', '.join(extra)}")
        return self

    def source_path(self, dataset: DatasetConfig) -> Path:
        path = Path(dataset.source).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def training_for(self, dataset: DatasetConfig) -> dict[str, Any]:
        return deep_merge(self.training, dataset.training)


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
