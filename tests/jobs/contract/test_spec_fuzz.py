"""Whatever a user sends, validation answers with field-path lines, never a crash."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobs.contract.spec_files import format_validation_error, parse_spec
from jobs.contract.train import SpecError

BASE = {
    "data": {"train": "d/dataset.json", "val": "d/dataset.json", "num_classes": 10},
    "loss": {"name": "noised_topk_imbalanced", "class_counts": [5] * 10},
}
PATHS = [
    "data",
    "data.train",
    "data.num_classes",
    "data.augment",
    "data.augment.mean",
    "loss",
    "loss.name",
    "loss.k",
    "loss.epsilon",
    "loss.class_counts",
    "model",
    "model.arch",
    "model.cosine_head",
    "optim.lr",
    "schedule",
    "metrics.ks",
    "metrics.select",
    "scaling.num_workers",
    "storage",
    "epochs",
    "unknown_field",
]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["ldam", "pipe:ls", "s3://b/x", "val_top5", "resnet50", "grid"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def set_path(document: dict, path: str, value: object) -> None:
    *parents, key = path.split(".")
    node = document
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key] = value


def check_answers_cleanly(document: dict) -> None:
    try:
        parse_spec(document)
    except (ValidationError, SpecError) as exc:
        lines = format_validation_error(exc)
        assert lines and all(isinstance(line, str) and ": " in line for line in lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), JSON_VALUES), min_size=1, max_size=3))
def test_training_specs_with_any_values_fail_cleanly(edits):
    document = copy.deepcopy(BASE)
    for path, value in edits:
        set_path(document, path, value)
    check_answers_cleanly(document)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["loss.k", "loss.epsilon", "loss.name", "optim", "x.y", "loss", ""]),
        st.dictionaries(
            st.sampled_from(["grid", "choice", "uniform", "loguniform", "other"]),
            JSON_VALUES,
            max_size=2,
        )
        | JSON_VALUES,
        max_size=3,
    ),
    JSON_VALUES,
)
def test_sweep_specs_with_any_search_fail_cleanly(search, metric):
    check_answers_cleanly({"train": copy.deepcopy(BASE), "search": search, "metric": metric})
