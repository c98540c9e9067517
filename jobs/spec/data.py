"""The data part of a training spec (owned by the data layer, jobs/data/)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ShardSource = str | list[str]
"""Shard URLs: a brace pattern (`s3://b/train-{000..009}.tar`), a list of URLs, or the URL of a
`dataset.json` (then the split named by the field is read from it)."""


class AugmentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    random_resized_crop: bool = True
    crop_scale_min: float = Field(0.35, gt=0.0, le=1.0)
    hflip: bool = True
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.5])


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: ShardSource
    val: ShardSource | None = None
    num_classes: int = Field(ge=2)
    image_size: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 3
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    shuffle_buffer: int = Field(1000, ge=0)
    samples_per_epoch: int | None = Field(None, ge=1)
    loader_workers: int = Field(2, ge=0, le=64)
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
