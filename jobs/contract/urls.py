"""Our only way to data: URL checks against a protocol allow-list, brace expansion, and an opener.

Every URL a user typed goes through `check_url` before any I/O: `pipe:` (which runs a shell
command in other WebDataset readers), chained URLs (`simplecache::s3://...`) and any protocol
outside the allow-list are refused with a `ValueError`. This module does not import torch: the
service imports it to validate specs.

The process-wide limits come from the environment (TOPK_ALLOWED_PROTOCOLS, TOPK_ALLOWED_ROOTS, the
variables the service sets on every job it launches) and apply inside `check_url` itself, and
`open_url` checks every URL it opens: a URL that a worker finds on its own (a shard named by
dataset.json, pretrained weights, a run file) meets the same limits as the submitted spec, however
the caller reached it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import IO, Any

ALLOWED_PROTOCOLS: frozenset[str] = frozenset({"file", "s3", "gs", "gcs", "https", "memory"})
"""Protocols data and storage URLs may use. A URL without `scheme:` is a local path (`file`)."""

PROTOCOLS_ENV = "TOPK_ALLOWED_PROTOCOLS"
ROOTS_ENV = "TOPK_ALLOWED_ROOTS"
"""Comma lists of the protocols and local roots this process may use (unset or empty: no limit
beyond the caller's)."""

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
"""A data source ending so is a shard (or a brace pattern of shards); any other string names a
dataset.json or the folder holding one."""
DATASET_FILENAME = "dataset.json"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_BRACE_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Local reads and remote reads differ in what a good buffer is: the OS caches local files, a
# remote object store wants few large range requests.
_LOCAL_BUFFER_BYTES = 1 << 20
# Object stores list a prefix in one request; an https "listing" is an HTML page, so probe each.
_LISTABLE_PROTOCOLS = frozenset({"s3", "gs", "gcs", "memory"})
_REMOTE_BLOCK_BYTES = 8 << 20


def url_protocol(url: str) -> str:
    """The protocol of `url`: "file" for local paths, else the lower-cased scheme."""
    match = _SCHEME.match(url)
    if match is None or (len(match.group(1)) == 1 and os.name == "nt"):
        return "file"
    return match.group(1).lower()


def is_local(url: str) -> bool:
    return url_protocol(url) == "file"


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def url_limits_from_env() -> dict[str, Any]:
    """The process-wide URL limits: {"allowed_protocols": [...], "allowed_roots": [...]} from
    TOPK_ALLOWED_PROTOCOLS and TOPK_ALLOWED_ROOTS, each key present only when its variable
    names something."""
    limits: dict[str, Any] = {}  # a new dict per call: callers add their own context keys
    for key, env in (("allowed_protocols", PROTOCOLS_ENV), ("allowed_roots", ROOTS_ENV)):
        parts = [part.strip() for part in os.environ.get(env, "").split(",") if part.strip()]
        if parts:
            limits[key] = parts
    return limits


def check_url(
    url: str,
    allowed_protocols: frozenset[str] | set[str] | tuple[str, ...] | list[str] = ALLOWED_PROTOCOLS,
    allowed_roots: list[str] | tuple[str, ...] | None = None,
) -> str:
    """Validate `url` without touching it and return it normalized.

    Local paths and `file://` URLs come back as absolute local paths (symlinks resolved);
    other URLs come back stripped of surrounding whitespace. `allowed_roots`, when given,
    restricts local paths to those folders (it does not apply to remote URLs).

    The environment's limits (`url_limits_from_env`) apply on top: its protocols narrow
    `allowed_protocols`, and its roots apply when the caller gives none.

    Raises ValueError naming the URL and the reason: empty, `pipe:`, chained (`::`),
    a protocol outside `allowed_protocols`, or a local path outside `allowed_roots`.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("empty URL")
    url = url.strip()
    if url.lower().startswith("pipe:"):
        raise ValueError(
            f"refused URL {url!r}: 'pipe:' URLs run shell commands and are not allowed"
        )
    if "::" in url:
        raise ValueError(f"refused URL {url!r}: chained fsspec URLs ('::') are not allowed")
    if "\x00" in url:
        raise ValueError(f"refused URL {url!r}: contains a NUL byte")
    protocol = url_protocol(url)
    process_limits = url_limits_from_env()
    allowed = {p.lower() for p in allowed_protocols}
    if "allowed_protocols" in process_limits:
        allowed &= {p.lower() for p in process_limits["allowed_protocols"]}
    if protocol not in allowed:
        raise ValueError(
            f"refused URL {url!r}: protocol {protocol!r} is not allowed "
            f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    if protocol != "file":
        if not url.lower().startswith(f"{protocol}://") or len(url) <= len(protocol) + 3:
            raise ValueError(f"refused URL {url!r}: expected {protocol}://<location>")
        return url
    path = os.path.realpath(os.path.expanduser(_local_path(url)))
    allowed_roots = allowed_roots or process_limits.get("allowed_roots")
    if allowed_roots:
        roots = [os.path.realpath(os.path.expanduser(root)) for root in allowed_roots]
        if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            raise ValueError(
                f"refused URL {url!r}: local path {path} is outside the allowed roots "
                f"({', '.join(roots)})"
            )
    return path


MAX_BRACE_URLS = 100_000
"""The most URLs one brace pattern may name. Counted before anything is expanded: a pattern such
as `x-{0..99999999}.tar` is refused at once instead of filling the server's memory."""

_MAX_RANGE_DIGITS = 18  # a bound in a range has at most this many digits (fits an int64)


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _quoted(pattern: str) -> str:
    """The pattern for an error message: a user's 10,000-character pattern is not echoed whole."""
    return repr(_shorten(pattern))


def _brace_group(pattern: str, start: int) -> tuple[int, list[str] | range, int]:
    """The group whose '{' is at `start`: (end index of its '}', its choices as a list or a range
    of ints, the zero-padding width of a range). Raises ValueError for an unbalanced,
    nested, empty or unknown group."""
    end = pattern.find("}", start)
    if end < 0:
        raise ValueError(f"unbalanced '{{' in {_quoted(pattern)}")
    body = pattern[start + 1 : end]
    if "{" in body:
        raise ValueError(f"nested braces in {_quoted(pattern)}")
    range_match = _BRACE_RANGE.match(body)
    if range_match:
        lo_text, hi_text = range_match.groups()
        if max(len(lo_text.lstrip("-")), len(hi_text.lstrip("-"))) > _MAX_RANGE_DIGITS:
            raise ValueError(
                f"brace range {{{_shorten(body)}}} in {_quoted(pattern)} has too many digits"
            )
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"empty brace range {{{_shorten(body)}}} in {_quoted(pattern)}")
        width = len(lo_text) if lo_text.startswith("0") and len(lo_text) > 1 else 0
        return end, range(lo, hi + 1), width
    if "," in body:
        return end, body.split(","), 0
    raise ValueError(
        f"cannot expand {{{_shorten(body)}}} in {_quoted(pattern)}: use {{a..b}} or {{x,y}}"
    )


def count_braces(pattern: str) -> int:
    """How many URLs expand_braces(pattern) names, without expanding anything (the product of
    the groups' sizes). Raises ValueError as expand_braces does, except for the size limit."""
    count, position = 1, 0
    while (start := pattern.find("{", position)) >= 0:
        if "}" in pattern[position:start]:
            raise ValueError(f"unbalanced '}}' in {_quoted(pattern)}")
        end, choices, _ = _brace_group(pattern, start)
        count *= len(choices)
        position = end + 1
    if "}" in pattern[position:]:
        raise ValueError(f"unbalanced '}}' in {_quoted(pattern)}")
    return count


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: `a-{000..003}.tar` (zero padding kept) and `{train,val}`.

    Several groups expand as a product, left to right. Raises ValueError on unbalanced or
    nested braces, an empty range, or a pattern naming more than MAX_BRACE_URLS URLs (counted
    first, so a huge pattern costs nothing).
    """
    count = count_braces(pattern)
    if count > MAX_BRACE_URLS:
        raise ValueError(
            f"the brace pattern {_quoted(pattern)} names {count:,} URLs; "
            f"at most {MAX_BRACE_URLS:,} are allowed"
        )
    return _expand(pattern)


def first_expansion(pattern: str) -> str:
    """The first URL `expand_braces(pattern)` names, without expanding the others."""
    parts, position = [], 0
    while (start := pattern.find("{", position)) >= 0:
        end, choices, width = _brace_group(pattern, start)
        first = str(choices[0]).zfill(width) if isinstance(choices, range) else choices[0]
        parts += [pattern[position:start], first]
        position = end + 1
    return "".join(parts) + pattern[position:]


@dataclass(frozen=True)
class DataSource:
    """What a spec's data source names, by the one rule every layer uses: a list is shard URLs;
    a string whose URL (before any `#`) ends in .tar/.tar.gz/.tgz is a shard or a brace pattern
    of shards; any other string is a dataset.json URL or the folder/prefix holding one, with
    `#name` selecting a split."""

    shards: tuple[str, ...] = ()
    """The shard URLs or brace patterns, unexpanded (empty for a dataset source)."""
    dataset: str | None = None
    """The dataset.json URL or its folder (None for a shard source)."""
    split: str | None = None
    """The split after `#` of a dataset source (None: the field's own split)."""

    @property
    def dataset_location(self) -> str:
        """Where this source's dataset.json lives: the dataset itself, else the folder/prefix
        holding the (first) shard (the folder above a brace pattern)."""
        if self.dataset is not None:
            return self.dataset
        first = self.shards[0]
        if "{" in first:
            return parent_url(first.split("{", 1)[0] + "x")
        return parent_url(first)


def parse_source(source: str | list[str]) -> DataSource:
    """`source` (a spec's data.train / data.val value) as a DataSource; no I/O. Raises
    ValueError for an empty list."""
    if isinstance(source, list):
        if not source:
            raise ValueError("empty list of shard URLs")
        return DataSource(shards=tuple(source))
    location, hash_sign, split = source.partition("#")
    if location.rstrip("/").endswith(SHARD_SUFFIXES):
        return DataSource(shards=(location,))
    return DataSource(dataset=location, split=split if hash_sign else None)


def dataset_location(source: str | list[str]) -> str:
    """Where the dataset.json of a data source lives (see DataSource.dataset_location)."""
    return parse_source(source).dataset_location


def local_source_problem(path: str, *, shard: bool = False) -> str | None:
    """Why the local data source at `path` (a path `check_url` returned) names nothing, when a
    few stats tell; None when it is there. A shard or brace pattern of shards (`shard`: an entry
    of a shard list) must have its first shard; a dataset.json must exist; any other path is a
    dataset folder and must hold a dataset.json. A `#split` suffix is ignored. At most three
    stats, no listing, nothing opened."""
    path = path.partition("#")[0]
    if shard or parse_source(path).shards:
        try:
            first = first_expansion(path)
        except ValueError as exc:
            return str(exc)
        if os.path.isfile(first):
            return None
        folder = os.path.dirname(first)
        if not os.path.isdir(folder):
            return f"folder {folder} does not exist"
        which = f" (the first shard of {_shorten(path)})" if first != path else ""
        return f"shard {first} does not exist{which}"
    if path.endswith(".json"):
        return None if os.path.isfile(path) else f"{path} does not exist"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, DATASET_FILENAME)):
            return None
        return f"folder {path} holds no {DATASET_FILENAME}"
    if os.path.exists(path):
        return (
            f"{path} is neither a {DATASET_FILENAME}, a folder holding one, nor a shard "
            f"({', '.join(SHARD_SUFFIXES)})"
        )
    return f"{path} does not exist"


def _expand(pattern: str) -> list[str]:
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end, choices, width = _brace_group(pattern, start)
    head, tail = pattern[:start], pattern[end + 1 :]
    texts = [str(i).zfill(width) for i in choices] if isinstance(choices, range) else choices
    return [expanded for text in texts for expanded in _expand(head + text + tail)]


def join_url(base: str, relative: str) -> str:
    """`relative` resolved against the folder/prefix URL `base` (absolute URLs pass through)."""
    if url_protocol(relative) != "file" or relative.startswith("/"):
        return relative
    return base.rstrip("/") + "/" + relative


def parent_url(url: str) -> str:
    """The folder/prefix holding `url` (`s3://b/p/x.json` -> `s3://b/p`)."""
    head, _, _ = url.rstrip("/").rpartition("/")
    return head if head and not head.endswith(":/") else url


def filesystem_for(url: str, **storage_options: Any) -> tuple[Any, str]:
    """The fsspec filesystem and in-filesystem path for a checked URL. Raises ValueError when
    the protocol's fsspec driver (s3fs, gcsfs, aiohttp) is not installed."""
    import fsspec.core

    try:
        filesystem, path = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as exc:
        raise ValueError(f"cannot open {url}: {exc}") from None
    return filesystem, str(path)


def open_url(url: str, mode: str = "rb", **storage_options: Any) -> IO[bytes]:
    """Open a URL for streaming reads (or writes with mode "wb").

    The URL passes `check_url` under the process-wide limits first (a caller with its own
    limits checks with them before). Local files use a plain buffered file; other protocols go
    through fsspec with a read-ahead cache of large blocks. Raises ValueError for a refused URL,
    FileNotFoundError for a missing object (the message names the URL).
    """
    url = check_url(url)
    if is_local(url):
        path = _local_path(url)
        if "w" in mode:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            return open(path, mode, buffering=_LOCAL_BUFFER_BYTES)  # noqa: SIM115
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} does not exist") from None
    fs, path = filesystem_for(url, **storage_options)
    try:
        options = (
            {"block_size": _REMOTE_BLOCK_BYTES, "cache_type": "readahead"} if "r" in mode else {}
        )
        handle: IO[bytes] = fs.open(path, mode, **options)
        return handle
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


def missing_urls(urls: list[str]) -> list[str]:
    """The URLs in `urls` that do not exist, listing each folder once rather than probing each."""
    missing: list[str] = []
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(parent_url(url), []).append(url)
    for parent, members in by_parent.items():
        if is_local(parent):
            missing.extend(u for u in members if not os.path.isfile(_local_path(u)))
            continue
        fs, parent_path = filesystem_for(parent)
        listed: set[str] | None = None
        if url_protocol(parent) in _LISTABLE_PROTOCOLS:
            try:
                entries = fs.ls(parent_path, detail=False)
                listed = {entry.rstrip("/").rpartition("/")[2] for entry in entries}
            except (FileNotFoundError, NotImplementedError, OSError, ValueError):
                listed = set()
        for url in members:
            name = url.rstrip("/").rpartition("/")[2]
            if listed is not None:
                if name not in listed:
                    missing.append(url)
            elif not fs.exists(filesystem_for(url)[1]):
                missing.append(url)
    return missing
