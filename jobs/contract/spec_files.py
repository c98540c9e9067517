"""Reading spec files, parsing them, filling class counts, and errors that name field paths.

    raw = load_spec_file("examples/omniglot_noised_topk.yaml")   # dict; SpecFileError
    spec = parse_spec(raw)                 # TrainSpec | SweepSpec; pydantic.ValidationError
    spec = resolve_class_counts(spec)      # reads dataset.json when needed; SpecError
    except (ValidationError, SpecError) as err: format_validation_error(err) -> ["loss.k: ..."]

No torch import here: the service validates specs with these functions.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from jobs.contract import spec_errors
from jobs.contract.dataset_info import read_dataset_info
from jobs.contract.loss import check_class_counts
from jobs.contract.sweep import SweepSpec
from jobs.contract.train import SpecError, TrainSpec
from jobs.contract.urls import is_local, parse_source

MAX_SPEC_FILE_BYTES = 1 << 20
"""A spec is a page of YAML; anything larger is a mistake (or an attack on the parser)."""

MAX_SPEC_NODES = 100_000
"""Values in a loaded document, counting each use of a YAML alias: a few nested aliases (the
"billion laughs") would otherwise expand into billions of values during validation."""

_ROOT_MODELS: dict[str, type[BaseModel]] = {"TrainSpec": TrainSpec, "SweepSpec": SweepSpec}


class SpecFileError(ValueError):
    """The spec file cannot be read or is not a YAML/JSON mapping (message names the file)."""


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


MAX_JSON_INT_DIGITS = 40
"""No spec field needs an integer this long; longer ones are refused while parsing (Python would
otherwise spend time converting, or refuse past 4,300 digits with an unrelated message)."""


def _bounded_json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits (at most {MAX_JSON_INT_DIGITS})")
    return int(text)


def parse_json_document(text: str | bytes) -> Any:
    """Strict JSON: duplicate keys and integers over 40 digits are refused, and so is nesting
    too deep for the parser. Raises ValueError naming the problem (never RecursionError)."""
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicate_json_keys, parse_int=_bounded_json_int
        )
    except RecursionError:
        raise ValueError("the document is nested too deeply") from None


def parse_spec_text(text: str, *, source: str = "spec", is_json: bool = False) -> dict[str, Any]:
    """A spec document (YAML, or JSON when `is_json`) -> dict. Raises SpecFileError."""
    try:
        if is_json:
            document = parse_json_document(text)
        else:
            document = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecFileError(f"{source}: not valid YAML: {exc.problem}{where}") from None
    except yaml.YAMLError as exc:
        raise SpecFileError(f"{source}: not valid YAML: {exc}") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise SpecFileError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        raise SpecFileError(f"{source}: a spec must be a mapping of fields, this file is {kind}")
    if _exceeds_node_count(document, MAX_SPEC_NODES):
        raise SpecFileError(f"{source}: more than {MAX_SPEC_NODES} values once aliases expand")
    return document


def _exceeds_node_count(document: Any, limit: int) -> bool:
    """Whether `document` holds more than `limit` values; stops counting at the limit."""
    pending, seen = [document], 0
    while pending:
        node = pending.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return False


def load_spec_file(path_or_url: str, **url_limits: Any) -> dict[str, Any]:
    """Read a YAML or JSON spec (JSON when the name ends in .json) from a path or URL.

    `url_limits` (allowed_protocols, allowed_roots) go to jobs.contract.urls.check_url. Raises
    SpecFileError naming the file: refused URL, missing, too large, not UTF-8, not YAML/JSON, or
    not a mapping.
    """
    from jobs.contract.urls import check_url, open_url

    try:
        url = check_url(path_or_url, **url_limits)
        with open_url(url) as handle:
            data = handle.read(MAX_SPEC_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise SpecFileError(f"cannot read spec {path_or_url}: {exc}") from None
    if len(data) > MAX_SPEC_FILE_BYTES:
        raise SpecFileError(f"{path_or_url}: larger than {MAX_SPEC_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecFileError(f"{path_or_url}: not UTF-8 text") from None
    return parse_spec_text(text, source=path_or_url, is_json=path_or_url.endswith(".json"))


def is_sweep_document(raw: Mapping[str, Any]) -> bool:
    """A sweep spec has `train` and `search` at the top (either one is enough to tell it from a
    training spec, which has `data`)."""
    return "search" in raw or "train" in raw


def parse_train_spec(raw: Mapping[str, Any], *, context: dict[str, Any] | None = None) -> TrainSpec:
    """Validate a training spec. Raises pydantic.ValidationError (see format_validation_error)."""
    return TrainSpec.model_validate(raw, context=context)


def parse_sweep_spec(raw: Mapping[str, Any], *, context: dict[str, Any] | None = None) -> SweepSpec:
    """Validate a sweep spec. Raises pydantic.ValidationError (see format_validation_error)."""
    return SweepSpec.model_validate(raw, context=context)


def parse_spec(
    raw: Mapping[str, Any], *, context: dict[str, Any] | None = None
) -> TrainSpec | SweepSpec:
    """A training or a sweep spec, told apart by is_sweep_document."""
    if is_sweep_document(raw):
        return parse_sweep_spec(raw, context=context)
    return parse_train_spec(raw, context=context)


@typing.overload
def resolve_class_counts(
    spec: TrainSpec, *, context: dict[str, Any] | None = None
) -> TrainSpec: ...
@typing.overload
def resolve_class_counts(
    spec: SweepSpec, *, context: dict[str, Any] | None = None
) -> SweepSpec: ...
@typing.overload
def resolve_class_counts(
    spec: TrainSpec | SweepSpec, *, context: dict[str, Any] | None = None
) -> TrainSpec | SweepSpec: ...
def resolve_class_counts(
    spec: TrainSpec | SweepSpec, *, context: dict[str, Any] | None = None
) -> TrainSpec | SweepSpec:
    """Fill `loss.class_counts` from the training split of data.train's dataset.json.

    Only for losses that need counts and lack them; otherwise `spec` comes back as is. For a
    sweep, the base training spec is filled (a trial that switches `loss.name` calls this on its
    own spec). `context` carries the URL limits as for validation. The spec is not validated
    again: the counts read are checked against their own rule and data.num_classes. Raises
    SpecError naming loss.class_counts when the counts are neither given nor readable.
    """
    if isinstance(spec, SweepSpec):
        train = resolve_class_counts(spec.train, context=context)
        return spec if train is spec.train else spec.model_copy(update={"train": train})
    loss = spec.loss
    if not type(loss).needs_class_counts or getattr(loss, "class_counts", None) is not None:
        return spec
    counts = _train_counts_from_dataset(spec, context or {})
    filled = loss.model_copy(update={"class_counts": counts})
    return spec.model_copy(update={"loss": filled})


def _train_counts_from_dataset(spec: TrainSpec, context: dict[str, Any]) -> list[int]:
    location = parse_source(spec.data.train).dataset_location
    limits = _url_limits(context)
    try:
        info = read_dataset_info(location, **limits)
        counts = info.class_counts["train"]
    except (OSError, ValueError, KeyError) as exc:
        reason = f"no train split in {location}" if isinstance(exc, KeyError) else str(exc)
        raise SpecError(
            [
                (
                    "loss.class_counts",
                    f"loss {spec.loss.name!r} needs the per-class training counts: give them "
                    f"here, or make data.train a dataset with a dataset.json ({reason})",
                )
            ]
        ) from None
    if len(counts) != spec.data.num_classes:
        raise SpecError(
            [
                (
                    "data.num_classes",
                    f"is {spec.data.num_classes} but the dataset at {location} has "
                    f"{len(counts)} classes",
                )
            ]
        )
    try:
        return check_class_counts([int(count) for count in counts])
    except (TypeError, ValueError) as exc:
        raise SpecError([("loss.class_counts", f"the dataset at {location}: {exc}")]) from None


def _url_limits(context: dict[str, Any]) -> dict[str, Any]:
    """The URL allow-list entries of a validation context, as read_dataset_info takes them."""
    return {k: context[k] for k in ("allowed_protocols", "allowed_roots") if k in context}


def check_decode_format(
    spec: TrainSpec | SweepSpec, *, context: dict[str, Any] | None = None
) -> None:
    """data.decode "device" decodes JPEG only: raise SpecError naming data.decode when a local
    dataset of data.train or data.val says (dataset.json `source.image_format`) that its images
    are PNG or WebP. Shard lists, remote datasets and datasets that do not say are left to the
    loader, which refuses a non-JPEG sample by its key."""
    if isinstance(spec, SweepSpec):
        return check_decode_format(spec.train, context=context)
    data = spec.data
    if data.decode != "device":
        return
    limits = _url_limits(context or {})
    read: set[str] = set()
    for field, source in (("data.train", data.train), ("data.val", data.val)):
        parsed = parse_source(source) if source is not None else None
        if parsed is None or parsed.dataset is None or not is_local(parsed.dataset):
            continue
        if parsed.dataset in read:
            continue  # data.val is often data.train's dataset (another split): read once
        read.add(parsed.dataset)
        try:
            image_format = read_dataset_info(parsed.dataset, **limits).source.get("image_format")
        except (OSError, ValueError):
            continue  # the data fields' own checks report an unreadable dataset
        if image_format in ("png", "webp"):
            raise SpecError(
                [
                    (
                        "data.decode",
                        f"'device' decodes JPEG images only, and {field} ({parsed.dataset}) "
                        f"holds {image_format} images; set data.decode: cpu, or write JPEG "
                        "shards (topk shards build --format jpeg)",
                    )
                ]
            )


def validation_problems(err: ValidationError | SpecError) -> list[tuple[str, str]]:
    """(field path, message) for every problem in a train or sweep spec's `err`, paths as the
    user typed them."""
    root = _ROOT_MODELS.get(err.title) if isinstance(err, ValidationError) else None
    return spec_errors.validation_problems(err, root=root)


def format_validation_error(err: ValidationError | SpecError) -> list[str]:
    """One "field.path: message" line per problem."""
    return [f"{path}: {message}" for path, message in validation_problems(err)]
