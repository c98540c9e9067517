"""The service's view of the runtime layout on storage (ROOT/RUN/...), through fsspec.

The service writes ROOT/RUN/spec.json before it launches; the training runtime writes
metrics.jsonl (one JSON object per finished epoch), result.json and, for sweeps, sweep.json
and each trial's run under trials/.
Readers here tolerate files that do not exist yet (None / []) and a last line still being
written (skipped).
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def run_url(root: str, run_name: str, filename: str) -> str:
    return f"{root.rstrip('/')}/{run_name}/{filename}"


def trial_run_name(run_name: str, trial_id: str) -> str:
    """A sweep trial's run folder under the sweep's, as jobs/sweep.py lays it out:
    ROOT/RUN/trials/trial-<trial id>/ (its own metrics.jsonl, result.json)."""
    return f"{run_name}/trials/trial-{trial_id}"


def write_spec(root: str, run_name: str, spec: dict) -> str:
    """Write the validated spec to ROOT/RUN/spec.json (replacing it atomically on local disks);
    returns its URL."""
    url = run_url(root, run_name, "spec.json")
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    payload = json.dumps(spec, indent=2, sort_keys=True).encode()
    if isinstance(fs, LocalFileSystem):  # readers never see a half-written file
        temp = path + ".tmp"
        with fs.open(temp, "wb") as handle:
            handle.write(payload)
        fs.mv(temp, path)
    else:
        with fs.open(path, "wb") as handle:
            handle.write(payload)
    return url


def _read_text(url: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def read_json(root: str, run_name: str, filename: str) -> dict[str, Any] | None:
    text = _read_text(run_url(root, run_name, filename))
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # being written right now
        return None
    return value if isinstance(value, dict) else None


def read_metrics(root: str, run_name: str) -> list[dict[str, Any]]:
    """The per-epoch history from ROOT/RUN/metrics.jsonl, in file order ([] when absent)."""
    text = _read_text(run_url(root, run_name, "metrics.jsonl"))
    history = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line still being appended
            continue
        if isinstance(record, dict):
            history.append(record)
    return history
