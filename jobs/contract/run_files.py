"""The run's files on storage (any fsspec URL; a local folder by default): one layout, read
and written here by the service (spec.json before launch; status reads) and the runtime.

Layout for a run named RUN under the storage root ROOT:
ROOT/RUN/spec.json, ROOT/RUN/metrics.jsonl (one JSON object per finished epoch),
ROOT/RUN/checkpoints/ (Ray Train's run folder: checkpoint_* directories and its state),
ROOT/RUN/result.json, and for sweeps ROOT/RUN/sweep.json and each trial's own run folder
ROOT/RUN/trials/trial-<trial id>/.

Readers tolerate what a concurrent writer can leave: a file that does not exist yet (None / [])
and a JSON document or metrics line that does not parse yet (None / the line skipped). Local
files are replaced atomically and object stores in one PUT, so those cases are rare.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import fsspec

from jobs.contract.urls import check_url

DEFAULT_STORAGE = os.path.join(".topk", "runs")
RAY_RUN_FOLDER = "checkpoints"  # Ray Train's run name inside ROOT/RUN
SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
SWEEP_FILE = "sweep.json"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_name(name: str) -> str:
    """A run name is one path segment: letters, digits, '.', '_', '-' (max 128 characters)."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or name in {".", ".."}:
        raise ValueError(
            f"run name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def default_storage_root() -> str:
    """TOPK_STORAGE_URL when set (the service's setting), else ./.topk/runs."""
    return os.environ.get("TOPK_STORAGE_URL") or DEFAULT_STORAGE


def normalize_root(root: str | None) -> str:
    """The storage root as a URL; a local path becomes absolute (Ray workers have other cwds)."""
    root = root or default_storage_root()
    _check_protocol(root)
    if "://" not in root:
        return str(Path(root).expanduser().resolve())
    if root.startswith("file://"):
        return str(Path(root[len("file://") :]).resolve())
    return root.rstrip("/")


def _check_protocol(url: str) -> None:
    check_url(url)


def _filesystem(url: str, check: bool = True) -> tuple[Any, str]:
    """The fsspec filesystem and path for `url`, which passes the process's URL limits first
    (every run file a worker opens meets the limits its spec was checked with) unless `check`
    is False (the service's own reads and writes: see write_spec)."""
    if check:
        _check_protocol(url)
    filesystem, path = fsspec.core.url_to_fs(url)
    return filesystem, str(path)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def run_url(root: str, run_name: str, filename: str) -> str:
    """ROOT/RUN/FILENAME."""
    return join(root, run_name, filename)


def trial_run_name(run_name: str, trial_id: str) -> str:
    """A sweep trial's run folder under the sweep's: RUN/trials/trial-<trial id> (its own
    spec.json, metrics.jsonl, result.json)."""
    return f"{run_name}/trials/trial-{trial_id}"


def ray_storage(root_url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig.

    Local folders and the protocols pyarrow speaks natively (s3, gs) go as they are; any other
    fsspec protocol goes through pyarrow's FSSpecHandler with the protocol stripped.
    """
    _check_protocol(root_url)
    if "://" not in root_url:
        return root_url, None
    protocol = root_url.split("://", 1)[0]
    if protocol in {"s3", "gs", "gcs"}:
        return root_url, None
    import pyarrow.fs  # type: ignore[import-untyped]  # pyarrow ships no type information

    filesystem, path = fsspec.core.url_to_fs(root_url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))


def write_text(url: str, text: str, *, check: bool = True) -> None:
    """Replace the file at `url` with `text`; local files are swapped in atomically so that a
    reader never sees half a file."""
    filesystem, path = _filesystem(url, check)
    parent = path.rsplit("/", 1)[0]
    if parent:
        filesystem.makedirs(parent, exist_ok=True)
    if filesystem.protocol in ("file", ("file", "local")) or "file" in filesystem.protocol:
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
        return
    with filesystem.open(path, "w") as handle:  # object stores replace an object in one PUT
        handle.write(text)


def read_text(url: str, *, check: bool = True) -> str | None:
    """The file's text, or None when it does not exist (a character cut by a concurrent
    writer reads as U+FFFD, never an error)."""
    filesystem, path = _filesystem(url, check)
    try:
        with filesystem.open(path, "rb") as handle:
            data: bytes = handle.read()
    except FileNotFoundError:
        return None
    return data.decode("utf-8", errors="replace")


def write_json(url: str, value: Any, *, check: bool = True) -> None:
    write_text(url, json.dumps(value, indent=2, sort_keys=True) + "\n", check=check)


def read_json(url: str, *, check: bool = True) -> Any | None:
    """The JSON document at `url`; None when it does not exist or does not parse yet."""
    text = read_text(url, check=check)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_metrics(url: str, *, check: bool = True) -> list[dict[str, Any]]:
    """The epochs recorded in a metrics.jsonl file, in file order (empty when absent); a line
    that is not a JSON object (one still being written) is skipped."""
    records = []
    for line in (read_text(url, check=check) or "").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# The service's reads and writes (write_spec, read_run_json, read_run_metrics) do not apply the
# process environment's URL limits: the service checked each job's storage root with its own
# settings at submission, and those always include its runs folder, which TOPK_ALLOWED_ROOTS
# may leave out (the jobs get the folder added to their limits).


def write_spec(root: str, run_name: str, spec: dict[str, Any]) -> str:
    """ROOT/RUN/spec.json (replaced atomically on local disks); returns its URL."""
    url = run_url(root, run_name, SPEC_FILE)
    write_json(url, spec, check=False)
    return url


def read_run_json(root: str, run_name: str, filename: str) -> dict[str, Any] | None:
    """ROOT/RUN/FILENAME as a JSON object; None when absent, unparsable yet, or not an object."""
    value = read_json(run_url(root, run_name, filename), check=False)
    return value if isinstance(value, dict) else None


def read_run_metrics(root: str, run_name: str) -> list[dict[str, Any]]:
    """The per-epoch history in ROOT/RUN/metrics.jsonl."""
    return read_metrics(run_url(root, run_name, METRICS_FILE), check=False)


class MetricsLog:
    """ROOT/RUN/metrics.jsonl, one line per finished epoch, rewritten whole on each append.

    Object stores cannot append, and a rewrite lets a resumed run drop the lines of epochs
    after its checkpoint (an epoch that finished but whose checkpoint was lost is run again).
    """

    def __init__(self, url: str, *, keep_through_epoch: int) -> None:
        self.url = url
        self.records = [r for r in read_metrics(url) if r.get("epoch", 0) <= keep_through_epoch]

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        write_text(self.url, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))


def collapse_warnings(history: list[dict[str, Any]]) -> list[str]:
    """The rank-1 collapse warning of a run, from its metrics.jsonl records: one line naming the
    flagged epochs (`collapse_warning`) and the worst one; none when no epoch was flagged.
    result.json's `warnings`, and the service's live `warnings` of a job. Records written by
    something else (fields missing or of the wrong type) are skipped."""
    flagged = [
        r
        for r in history
        if r.get("collapse_warning") is True
        and isinstance(r.get("val_collapse_share"), (int, float))
        and isinstance(r.get("epoch"), int)
    ]
    if not flagged:
        return []
    epochs = ", ".join(str(r["epoch"]) for r in flagged)
    worst = max(flagged, key=lambda r: r["val_collapse_share"])
    return [
        f"rank-1 collapse warning in epoch(s) {epochs}: up to "
        f"{worst['val_collapse_share']:.0%} of the validation images had class "
        f"{worst.get('val_collapse_class')} as their top-1 prediction (epoch {worst['epoch']})"
    ]
