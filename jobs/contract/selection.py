"""The best record by a metric: one rule for every place that picks a winner.

The best epoch of a run (result.json's `best_epoch`), the checkpoints a run keeps, the best
trial of a sweep and the winning sweep run of an experiment all rank records with
`rank_by_metric` (or take its first with `best_by_metric`):

- a record takes part when its metric is a finite number (int or float, not a bool); a
  record without the metric, or with NaN or an infinity, is left out;
- `mode` "max" ranks the highest first, "min" the lowest;
- ties go to the earlier record in the input (the earliest epoch of a run's history).

No torch, no ray: the service and the runtime both use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeGuard, TypeVar

Mode = Literal["max", "min"]
Record = TypeVar("Record")


def is_score(value: object) -> TypeGuard[int | float]:
    """Whether `value` can rank a record: a finite int or float (bools are not scores)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def rank_by_metric(
    records: Iterable[Record],
    metric: str,
    mode: Mode,
    *,
    metrics_of: Callable[[Record], Mapping[str, Any]] | None = None,
) -> list[Record]:
    """The records that have a score for `metric`, best first (see the module docstring).

    `metrics_of(record)` is where a record keeps its metrics (a sweep trial's "metrics", an
    experiment record's "val_best"); by default the record is itself the mapping (a line of
    metrics.jsonl). Raises ValueError for a mode other than "max" or "min".
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = -1.0 if mode == "max" else 1.0
    scored = []
    for position, record in enumerate(records):
        metrics: Mapping[str, Any] = metrics_of(record) if metrics_of else record  # type: ignore[assignment]
        value = metrics.get(metric)
        if is_score(value):
            scored.append((sign * float(value), position, record))
    scored.sort(key=lambda entry: entry[:2])
    return [record for _, _, record in scored]


def best_by_metric(
    records: Iterable[Record],
    metric: str,
    mode: Mode,
    *,
    metrics_of: Callable[[Record], Mapping[str, Any]] | None = None,
) -> Record | None:
    """The first of `rank_by_metric(...)`: the best record, None when none has a score."""
    ranked = rank_by_metric(records, metric, mode, metrics_of=metrics_of)
    return ranked[0] if ranked else None
