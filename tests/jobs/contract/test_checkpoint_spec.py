"""`checkpoint.keep_best` (the N best checkpoints, plus the latest) and its former name
`keep_last`, still read with a DeprecationWarning; specs are written out with the new name."""

from __future__ import annotations

import warnings

import pytest

from jobs.contract.spec_files import format_validation_error
from jobs.contract.train import TrainSpec

DATA = {"train": "memory://d/dataset.json", "val": "memory://d/dataset.json", "num_classes": 10}


def test_keep_best_is_read_and_written_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = TrainSpec.model_validate({"data": DATA, "checkpoint": {"keep_best": 3}})
    assert spec.checkpoint.keep_best == 3
    assert spec.model_dump(mode="json")["checkpoint"] == {"keep_best": 3}


def test_keep_last_is_the_deprecated_name_of_keep_best():
    with pytest.warns(DeprecationWarning, match="checkpoint.keep_last is deprecated"):
        spec = TrainSpec.model_validate({"data": DATA, "checkpoint": {"keep_last": 4}})
    assert spec.checkpoint.keep_best == 4
    assert spec.model_dump(mode="json")["checkpoint"] == {"keep_best": 4}  # the new name only
    assert TrainSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_errors_name_the_key_as_typed_and_both_keys_are_refused():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError) as old:
        TrainSpec.model_validate({"data": DATA, "checkpoint": {"keep_last": 0}})
    assert format_validation_error(old.value)[0].startswith("checkpoint.keep_last:")
    with pytest.raises(ValueError) as both:
        TrainSpec.model_validate({"data": DATA, "checkpoint": {"keep_best": 1, "keep_last": 1}})
    assert "give keep_best only: keep_last is its former name" in str(both.value)
