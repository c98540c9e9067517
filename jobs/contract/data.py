"""The data part of a training spec (owned by the data layer, jobs/data/). No torch import."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs.contract.urls import check_url, expand_braces

ShardSource = str | list[str]
"""Shard URLs: a brace pattern (`s3://b/train-{000..009}.tar`), a list of URLs, or the URL of a
`dataset.json` or of the folder/prefix holding one (then the split named by the field is read
from it; `.../dataset.json#test` picks another split)."""


class AugmentSpec(BaseModel):
    """Training augmentation (random resized crop, flip) and the normalisation of all inputs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    random_resized_crop: bool = True
    crop_scale_min: float = Field(0.35, gt=0.0, le=1.0)
    hflip: bool = True
    mean: list[float] = Field(default_factory=lambda: [0.5], min_length=1, max_length=3)
    std: list[float] = Field(default_factory=lambda: [0.5], min_length=1, max_length=3)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: list[float]) -> list[float]:
        if any(s <= 0 for s in std):
            raise ValueError("every std must be > 0")
        return std


def _check_source(source: ShardSource) -> ShardSource:
    """Refuse what no configuration allows (`pipe:` and chained URLs) and bad brace patterns,
    without I/O. The protocol allow-list and local roots are settings: TrainSpec checks them
    with the validation context, and the loaders check every URL again before reading."""
    urls = source if isinstance(source, list) else [source]
    if not urls:
        raise ValueError("empty list of shard URLs")
    for url in urls:
        for expanded in expand_braces(url.partition("#")[0]):
            if expanded.strip().lower().startswith("pipe:") or "::" in expanded:
                check_url(expanded)  # raises, naming the reason
    return source


class DataSpec(BaseModel):
    """Where the shards are and how to turn them into batches (see jobs/data/pipeline.py)."""

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
    # The field of a sample's `.json` member that holds its class index, for shards made by
    # other tools; a `.cls` member, when there is one, is the label.
    label_key: str = Field("label", min_length=1, max_length=200)
    # Where images are decoded. "cpu": in the loader workers (any image format; PIL, and for
    # RGB torch's antialiased resize, the filter of "device", after torchvision's decoders for
    # JPEG and PNG).
    # "device": on the training device, a batch per call of torchvision.io.decode_jpeg (nvJPEG
    # on a GPU; the CPU runs the same code), the workers only reading the shards and the JPEG
    # headers; same crops, flips and normalisation. JPEG shards only; for large JPEGs (224 px
    # and up), where CPU decoding cannot keep a GPU busy.
    decode: Literal["cpu", "device"] = "cpu"

    @field_validator("train", "val")
    @classmethod
    def _refuse_unsafe_urls(cls, source: ShardSource | None) -> ShardSource | None:
        return None if source is None else _check_source(source)

    @model_validator(mode="after")
    def _normalisation_matches_channels(self) -> DataSpec:
        for name in ("mean", "std"):
            values = getattr(self.augment, name)
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"augment.{name} has {len(values)} values; give 1 or channels={self.channels}"
                )
        return self
