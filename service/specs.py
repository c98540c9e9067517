"""Validating request bodies into training and sweep specs, with field-path error messages.

The spec models live in jobs/spec (one schema everywhere); this module adds the service's URL
limits as validation context and turns pydantic errors into ("field.path", "message") pairs.
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


def spec_model(kind: str):
    if kind == "train":
        from jobs.spec.train import TrainSpec

        return TrainSpec
    from jobs.spec.sweep import SweepSpec

    return SweepSpec


def validate_spec(kind: str, body: Any, settings: Settings) -> ValidatedSpec:
    """Validate `body` as a TrainSpec ("train") or SweepSpec ("sweep") under the service's URL
    allow-lists. Raises InvalidSpec with every problem found."""
    from jobs.spec.train import SpecError

    if not isinstance(body, dict):
        raise InvalidSpec([("", f"the body must be a JSON object, got {type(body).__name__}")])
    context = {"allowed_protocols": list(settings.allowed_protocols)}
    if settings.allowed_roots is not None:
        context["allowed_roots"] = list(settings.allowed_roots)
    try:
        model = spec_model(kind).model_validate(body, context=context)
    except ValidationError as exc:
        raise InvalidSpec(format_errors(exc, body)) from None
    except SpecError as exc:
        raise InvalidSpec(list(exc.problems)) from None
    train = model if kind == "train" else model.train
    scaling = train.scaling
    cpus = scaling.num_workers * scaling.cpus_per_worker
    gpus = scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0
    if kind == "sweep":
        cpus += 1.0  # the Tune trial's own driver process
    return ValidatedSpec(
        kind=kind,
        spec=model.model_dump(mode="json"),
        name=train.name,
        storage_root=train.storage or settings.storage_url,
        requested_cpus=float(cpus),
        requested_gpus=float(gpus),
    )


def format_errors(exc: ValidationError, body: Any) -> list[tuple[str, str]]:
    """pydantic errors -> (path the user typed, readable message).

    Cross-field problems (SpecError inside a model validator) keep their own paths, prefixed
    with where the model sits; the discriminator segment pydantic adds for tagged unions
    (`loss.noised_topk.epsilon`) is dropped, since the user never typed it.
    """
    from jobs.spec.train import SpecError, format_path

    problems: list[tuple[str, str]] = []
    for error in exc.errors():
        loc = _user_path(error.get("loc", ()), body)
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            prefix = format_path(loc)
            for path, message in cause.problems:
                problems.append((f"{prefix}.{path}" if prefix else path, message))
            continue
        message = error.get("msg", "invalid value")
        if error.get("type") == "extra_forbidden":
            message = "unknown field (not part of the spec)"
        elif error.get("type") == "missing":
            message = "field required"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        problems.append((format_path(loc), message))
    return problems


def _user_path(loc: tuple, body: Any) -> list[str | int]:
    path: list[str | int] = []
    node = body
    for part in loc:
        is_union_tag = (
            isinstance(node, dict)
            and isinstance(part, str)
            and part not in node
            and node.get("name") == part
        )
        if is_union_tag:  # pydantic adds the tag of a discriminated union; the user never typed it
            continue
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return path
