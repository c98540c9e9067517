"""Validation errors as "field.path: message" pairs, with paths as the user typed them (loss
tags and union members dropped) and "did you mean" suggestions for unknown fields."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from jobs.contract.loss import LOSS_SPECS
from jobs.contract.train import SpecError, TrainSpec, format_path

# Loc entries that pydantic adds for the members of a plain (non-discriminated) union.
_UNION_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "none", "list[str]", "list[int]"})


def validation_problems(
    err: ValidationError | SpecError, *, root: type[BaseModel] | None = None
) -> list[tuple[str, str]]:
    """(field path, message) for every problem in `err`, paths as the user typed them. `root`,
    the model that was validated, lets an unknown field get a "did you mean" (TrainSpec when
    not given and the error is TrainSpec's)."""
    if isinstance(err, SpecError):
        return list(err.problems)
    if root is None and err.title == TrainSpec.__name__:
        root = TrainSpec
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


def _message(entry: ErrorDetails, root: type[BaseModel] | None, loc: tuple[str | int, ...]) -> str:
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
    message = str(entry["msg"]).removeprefix("Value error, ")
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


def _fields_at(root: type[BaseModel] | None, loc: tuple[str | int, ...]) -> list[str]:
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
