"""The checkpoint part of a training spec. No torch import."""

from __future__ import annotations

import warnings
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictInt, model_validator


class CheckpointSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_best: StrictInt = Field(
        2, ge=1, le=1000, validation_alias=AliasChoices("keep_best", "keep_last")
    )
    """How many checkpoints a run keeps besides the most recent one (always kept, for
    resuming): the `keep_best` best by metrics.select, or the latest ones when there is no
    validation split. `keep_last` is its former name, still read (with a DeprecationWarning);
    a spec is written out with `keep_best`."""

    @model_validator(mode="before")
    @classmethod
    def _former_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "keep_last" in data:
            if "keep_best" in data:
                raise ValueError("give keep_best only: keep_last is its former name")
            warnings.warn(
                "checkpoint.keep_last is deprecated: it is now checkpoint.keep_best (the N best "
                "checkpoints are kept, plus the latest)",
                DeprecationWarning,
                stacklevel=2,
            )
        return data
