"""The shard format: WebDataset tars, a sample per run of consecutive members `<key>.<ext>`.

A sample is an image (`jpg`/`jpeg`/`png`/`webp`) and its label, either `<key>.cls` (the integer
as text, what our writer makes) or a field of `<key>.json` (`label_key`, default "label"), the
two conventions of shards made by other tools. This module holds the convention: the member
extensions, how a member name splits into key and extension, how a label is read, and what a
reader hands on (RawSample, or BadRecord with a reason from SKIP_REASONS). Reading is
shard_reader.py, writing shard_writer.py, both on the `webdataset` package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
JSON_EXTENSION = "json"
DEFAULT_LABEL_KEY = "label"
READ_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, LABEL_EXTENSION, JSON_EXTENSION))

# Why a sample was skipped; the order is the layout of the per-batch counters in the pipeline.
SKIP_REASONS = (
    "bad_image",  # undecodable or truncated image bytes
    "missing_image",
    "missing_label",  # no `.cls`, and no `.json` with the label field
    "bad_label",  # the label is not an integer (or the `.json` is not JSON)
    "label_out_of_range",
    "non_contiguous_key",  # a key's members are split by another key's
    "duplicate_member",  # one member name twice in a sample
    "truncated_tar",  # the archive ends early or is not a tar
)


class ShardReadError(RuntimeError):
    """A shard cannot be opened or read at all (missing object, I/O failure)."""


@dataclass(frozen=True, slots=True)
class RawSample:
    """One good sample as stored: `index` counts the samples of its shard from 0."""

    key: str
    index: int
    image: bytes
    image_ext: str
    label: int


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A skipped sample (or a broken shard tail), with the reason from SKIP_REASONS."""

    key: str
    index: int
    reason: str
    detail: str = ""


def split_member_name(name: str) -> tuple[str | None, str]:
    """`dir/abc.seg.PNG` -> ("dir/abc", "seg.png"): the key ends at the first dot of the base
    name, the extension is lower-cased. (None, "") for a name that has no key and extension
    (no dot, or a base name starting with one): such a member belongs to no sample, as in
    webdataset's own `base_plus_ext`."""
    start = name.rfind("/") + 1
    dot = name.find(".", start)
    if dot <= start:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


def parse_label(sample: dict[str, Any], num_classes: int, label_key: str) -> int | tuple[str, str]:
    """The sample's label, or (reason, detail) when it has none that can be used."""
    if LABEL_EXTENSION in sample:
        text = sample[LABEL_EXTENSION].decode("ascii", errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            return "bad_label", f"label {text[:20]!r} is not an integer"
    elif JSON_EXTENSION in sample:
        try:
            document = json.loads(sample[JSON_EXTENSION])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return "bad_label", f".json is not valid JSON ({exc})"
        if not isinstance(document, dict) or label_key not in document:
            return "missing_label", f"no .cls member and no {label_key!r} field in .json"
        value = document[label_key]
        if not isinstance(value, int) or isinstance(value, bool):
            return "bad_label", f".json field {label_key!r} is {str(value)[:20]!r}, not an integer"
        label = value
    else:
        return "missing_label", f"no .cls member and no .json with a {label_key!r} field"
    if not 0 <= label < num_classes:
        return "label_out_of_range", f"label {label} not in [0, {num_classes})"
    return label
