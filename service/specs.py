"""Validating request bodies into training and sweep specs, with field-path error messages.

The spec models and their error formatting live in jobs/spec (one schema everywhere); this
module adds the service's URL limits as validation context and what the queue needs to know
(requested resources, storage root).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.settings import Settings


class InvalidSpec(ValueError):
    """The body is not a valid spec; `problems` lists (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(
            "; ".join(f"{path}: {message}" if path else message for path, message in problems)
        )


@dataclass(frozen=True)
class ValidatedSpec:
    kind: str  # "train" | "sweep"
    spec: dict  # the validated spec, defaults filled, JSON-ready
    name: str | None
    storage_root: str
    requested_cpus: float
    requested_gpus: float


def parse_json_document(raw: bytes) -> Any:
    """A request body as strict JSON: duplicate keys, integers over 40 digits and nesting too deep
    are ValueErrors (jobs.spec.io.parse_json_document, the CLI's JSON loader)."""
    from jobs.spec.io import parse_json_document as parse

    return parse(raw)


def spec_model(kind: str):
    if kind == "train":
        from jobs.spec.train import TrainSpec

        return TrainSpec
    from jobs.spec.sweep import SweepSpec

    return SweepSpec


def validate_spec(kind: str, body: Any, settings: Settings) -> ValidatedSpec:
    """Validate `body` as a TrainSpec ("train") or SweepSpec ("sweep") under the service's URL
    allow-lists, filling loss.class_counts from the dataset's dataset.json where the loss needs
    them and the body has none. Raises InvalidSpec with every problem found."""
    return complete_spec(kind, check_spec(kind, body, settings), settings)


def check_spec(kind: str, body: Any, settings: Settings):
    """The validation half of `validate_spec`: the spec model, or InvalidSpec. It reads no
    data (local paths are only normalized), so it may run on the event loop."""
    from jobs.spec.io import validation_problems
    from jobs.spec.train import SpecError

    if not isinstance(body, dict):
        raise InvalidSpec([("", f"the body must be a JSON object, got {type(body).__name__}")])
    try:
        return spec_model(kind).model_validate(body, context=_context(settings))
    except (ValidationError, SpecError) as exc:
        raise InvalidSpec(validation_problems(exc)) from None


def needs_dataset_read(model) -> bool:
    """Whether `complete_spec` reads the dataset's dataset.json (possibly remote) for this
    spec: its loss needs class counts and the spec has none."""
    train = getattr(model, "train", model)
    loss = train.loss
    return type(loss).needs_class_counts and loss.class_counts is None


def complete_spec(kind: str, model, settings: Settings) -> ValidatedSpec:
    """The second half of `validate_spec`: class counts from dataset.json where needed (see
    `needs_dataset_read`), the resources the queue needs and the JSON-ready spec."""
    from jobs.spec.io import resolve_class_counts, validation_problems
    from jobs.spec.train import SpecError

    try:
        # Losses that need class counts get them from dataset.json now, so a job that could
        # never start is refused at submission and its record holds the counts it trains with.
        model = resolve_class_counts(model, context=_context(settings))
    except (ValidationError, SpecError) as exc:
        raise InvalidSpec(validation_problems(exc)) from None
    train = model if kind == "train" else model.train
    scaling = train.scaling
    cpus = scaling.num_workers * scaling.cpus_per_worker
    gpus = scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0
    if kind == "sweep":
        # Trials that may run at once (one when Tune decides), each with its driver process.
        concurrent = model.max_concurrent_trials or 1
        cpus, gpus = concurrent * (cpus + 1.0), concurrent * gpus
    return ValidatedSpec(
        kind=kind,
        spec=model.model_dump(mode="json"),
        name=train.name,
        storage_root=train.storage or settings.storage_url,
        requested_cpus=float(cpus),
        requested_gpus=float(gpus),
    )


def _context(settings: Settings) -> dict[str, Any]:
    context: dict[str, Any] = {"allowed_protocols": list(settings.allowed_protocols)}
    if settings.allowed_roots is not None:
        context["allowed_roots"] = list(settings.allowed_roots)
    return context
