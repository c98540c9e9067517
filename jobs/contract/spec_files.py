"""Reading spec files, parsing them, filling class counts, and errors that name field paths.

    raw = load_spec_file("examples/omniglot_noised_topk.yaml")   # dict; SpecFileError
    spec = parse_spec(raw)                 # TrainSpec | SweepSpec; pydantic.ValidationError
    spec = resolve_class_counts(spec)      # reads dataset.json when needed; SpecError
    except (ValidationError, SpecError) as err: format_validation_error(err) -> ["loss.k: ..."]

No torch import here: the service validates specs with these functions.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from jobs.contract.loss import LOSS_SPECS
from jobs.contract.sweep import SweepSpec
from jobs.contract.train import SpecError, TrainSpec, format_path

MAX_SPEC_FILE_BYTES = 1 << 20
"""A spec is a page of YAML; anything larger is a mistake (or an attack on the parser)."""

MAX_SPEC_NODES = 100_000
"""Values in a loaded document, counting each use of a YAML alias: a few nested aliases (the
"billion laughs") would otherwise expand into billions of values during validation."""

_ROOT_MODELS: dict[str, type[BaseModel]] = {"TrainSpec": TrainSpec, "SweepSpec": SweepSpec}
# Loc entries that pydantic adds for the members of a plain (non-discriminated) union.
_UNION_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "none", "list[str]", "list[int]"})


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


SpecT = typing.TypeVar("SpecT", TrainSpec, SweepSpec)


def resolve_class_counts(spec: SpecT, *, context: dict[str, Any] | None = None) -> SpecT:
    """Fill `loss.class_counts` from the training split of data.train's dataset.json.

    Only for losses that need counts and lack them; otherwise `spec` comes back as is. For a
    sweep, the base training spec is filled (a trial that switches `loss.name` calls this on its
    own spec). `context` carries the URL limits as for validation. Raises SpecError naming
    loss.class_counts when the counts are neither given nor readable.
    """
    if isinstance(spec, SweepSpec):
        train = resolve_class_counts(spec.train, context=context)
        if train is spec.train:
            return spec
        return SweepSpec.model_validate(
            {**spec.model_dump(), "train": train.model_dump()}, context=context
        )
    loss = spec.loss
    if not type(loss).needs_class_counts or loss.class_counts is not None:
        return spec
    counts = _train_counts_from_dataset(spec, context or {})
    return TrainSpec.model_validate(
        {**spec.model_dump(), "loss": {**loss.model_dump(), "class_counts": counts}},
        context=context,
    )


def dataset_location(train_source: str | list[str]) -> str:
    """Where the dataset.json of a train source lives: the source itself when it is a
    dataset.json URL or a dataset folder, else the folder/prefix of its (first) shard."""
    from jobs.contract.urls import parent_url

    first = train_source if isinstance(train_source, str) else train_source[0]
    first = first.partition("#")[0]  # `dataset.json#split` names a split, not another file
    if first.rstrip("/").endswith(".json"):
        return first
    if "{" in first:
        return parent_url(first.split("{", 1)[0] + "x")  # the folder above the brace pattern
    if isinstance(train_source, list) or first.endswith(".tar"):
        return parent_url(first)
    return first  # a dataset folder: read_dataset_info finds its dataset.json


def _train_counts_from_dataset(spec: TrainSpec, context: dict[str, Any]) -> list[int]:
    from jobs.contract.dataset_info import read_dataset_info

    location = dataset_location(spec.data.train)
    limits = {k: context[k] for k in ("allowed_protocols", "allowed_roots") if k in context}
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
    return counts


def validation_problems(err: ValidationError | SpecError) -> list[tuple[str, str]]:
    """(field path, message) for every problem in `err`, paths as the user typed them."""
    if isinstance(err, SpecError):
        return list(err.problems)
    root = _ROOT_MODELS.get(err.title)
    problems: list[tuple[str, str]] = []
    for entry in err.errors():
        raw_loc = tuple(entry["loc"])
        path = format_path(_user_loc(raw_loc))
        if entry["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path = _join(path, "name")  # the discriminator field the user got wrong
        cause = (entry.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            problems += [(_join(path, inner), message) for inner, message in cause.problems]
            continue
        problems.append((path or "(spec)", _message(entry, root, raw_loc)))
    return _merge_union_alternatives(problems)


def format_validation_error(err: ValidationError | SpecError) -> list[str]:
    """One "field.path: message" line per problem."""
    return [f"{path}: {message}" for path, message in validation_problems(err)]


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _user_loc(loc: tuple[str | int, ...]) -> list[str | int]:
    """Drop the loc entries pydantic adds for union members (the loss name after `loss`, the
    member type of a plain union), which the user never typed."""
    kept: list[str | int] = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "loss" and part in LOSS_SPECS:
            continue
        if isinstance(part, str) and part in _UNION_MEMBER_TAGS:
            continue
        kept.append(part)
    return kept


def _message(entry: dict[str, Any], root: type[BaseModel] | None, loc: tuple) -> str:
    kind, ctx = entry["type"], entry.get("ctx") or {}
    if kind == "union_tag_invalid":
        return f"unknown loss {ctx.get('tag')!r}; valid choices: {', '.join(sorted(LOSS_SPECS))}"
    if kind == "union_tag_not_found":
        return f"required field is missing; valid choices: {', '.join(sorted(LOSS_SPECS))}"
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        fields = _fields_at(root, loc[:-1])
        if not fields:
            return "unknown field"
        guess = _suggest_field(str(loc[-1]), fields)
        hint = f"did you mean {guess!r}? " if guess else ""
        return f"unknown field; {hint}valid fields: {', '.join(fields)}"
    message = entry["msg"].removeprefix("Value error, ")
    value = entry.get("input")
    if (
        isinstance(value, (int, float, str))
        and not isinstance(value, bool)
        and len(str(value)) < 80
    ):
        message += f" (got {value!r})"
    return message


def _suggest_field(typed: str, fields: list[str]) -> str | None:
    """The field the user probably meant: a close spelling, or the initials of a long name
    (`learning_rate` -> `lr`)."""
    close = difflib.get_close_matches(typed, fields, n=1)
    if close:
        return close[0]
    initials = "".join(part[0] for part in typed.lower().split("_") if part)
    return next((f for f in fields if len(initials) > 1 and f == initials), None)


def _fields_at(root: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the model at `loc` (a raw pydantic loc), or [] when unknown."""
    model = root
    for part in loc:
        if model is None:
            return []
        if model.__name__ == "SweepSpec" and part == "search":
            return []  # search keys are dotted paths, checked by the sweep validator
        if isinstance(part, int) or part not in model.model_fields:
            if part in LOSS_SPECS:  # the discriminator tag after `loss`
                model = LOSS_SPECS[part]
                continue
            return []
        model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (through Optional, Annotated, list, dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated, list, dict):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _merge_union_alternatives(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One line per path: a plain union's members each report a problem for the same input."""
    merged: dict[str, list[str]] = {}
    for path, message in problems:
        messages = merged.setdefault(path, [])
        if message not in messages:
            messages.append(message)
    return [(path, "; or ".join(messages)) for path, messages in merged.items()]
