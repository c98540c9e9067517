"""Validating request bodies into training and sweep specs, with field-path error messages.

The spec models and their error formatting live in jobs/contract (one schema everywhere); this
module adds the service's URL limits as validation context, which dataset.json files the server
may read while it answers (`needs_dataset_read`) and what the queue needs to know (requested
resources, refused beyond the cluster's ceiling; storage root).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
    are ValueErrors (jobs.contract.spec_files.parse_json_document, the CLI's JSON loader)."""
    from jobs.contract.spec_files import parse_json_document as parse

    return parse(raw)


def spec_model(kind: str):
    if kind == "train":
        from jobs.contract.train import TrainSpec

        return TrainSpec
    from jobs.contract.sweep import SweepSpec

    return SweepSpec


def validate_spec(kind: str, body: Any, settings: Settings) -> ValidatedSpec:
    """Validate `body` as a TrainSpec ("train") or SweepSpec ("sweep") under the service's URL
    allow-lists, filling loss.class_counts from the dataset's dataset.json where the loss needs
    them, the body has none and the server may read it (`needs_dataset_read`). Raises
    InvalidSpec with every problem found."""
    return complete_spec(kind, check_spec(kind, body, settings), settings)


def check_spec(kind: str, body: Any, settings: Settings):
    """The validation half of `validate_spec`: the spec model, or InvalidSpec. It reads no
    data, but looks at the file system (local data sources and the storage root are stat'ed),
    so it runs off the event loop."""
    from jobs.contract.spec_files import validation_problems
    from jobs.contract.train import SpecError

    if not isinstance(body, dict):
        raise InvalidSpec([("", f"the body must be a JSON object, got {type(body).__name__}")])
    try:
        return spec_model(kind).model_validate(body, context=_context(settings))
    except (ValidationError, SpecError) as exc:
        raise InvalidSpec(validation_problems(exc)) from None


IN_PROCESS_PROTOCOLS = frozenset({"file", "memory"})
"""Protocols whose reads stay on this machine: local files (inside the allowed roots) and
fsspec's in-process memory filesystem. Every other protocol opens a network connection."""

# A host as it appears between `scheme://` and the path: a name or IPv4 address, or a bracketed
# IPv6 address, and an optional port. Anything else (user info before '@', '%' escapes,
# backslashes, braces) is never matched against the allow-list: clients disagree about which
# host such a URL names.
_PLAIN_HOST = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def needs_dataset_read(model, settings: Settings) -> bool:
    """Whether `complete_spec` reads data.train's dataset.json for this spec while it answers
    the submission: the loss needs class counts, the spec has none, and the dataset.json is
    local, in memory, or on a host in `settings.allowed_hosts`.

    Any other remote dataset is read by the worker when the job starts (jobs/cli.py), which
    fails the job with the reason when it cannot: a read on the request path would let any
    token holder make the server connect to a host and port of their choosing and time it.
    """
    from jobs.contract.urls import dataset_location, url_protocol

    train = getattr(model, "train", model)
    loss = train.loss
    if not type(loss).needs_class_counts or loss.class_counts is not None:
        return False
    location = dataset_location(train.data.train).strip()
    if url_protocol(location) in IN_PROCESS_PROTOCOLS:
        return True
    host = _url_host(location)
    allowed = {name.lower().rstrip(".") for name in settings.allowed_hosts}
    return host is not None and host in allowed


def _url_host(url: str) -> str | None:
    """The host a remote URL names (lower case, no port, no trailing dot; the bucket of an
    s3:// or gs:// URL), or None when the URL's host part is not a plain host."""
    netloc = url.partition("://")[2].split("/", 1)[0]
    if not _PLAIN_HOST.fullmatch(netloc):
        return None
    host = urlsplit(url).hostname
    return host.rstrip(".") if host else None


def complete_spec(kind: str, model, settings: Settings) -> ValidatedSpec:
    """The second half of `validate_spec`: class counts from dataset.json where needed and
    allowed (see `needs_dataset_read`), the resources the queue needs, checked against the
    cluster's ceiling when one is set, and the JSON-ready spec."""
    from jobs.contract.spec_files import resolve_class_counts, validation_problems
    from jobs.contract.train import SpecError

    train = model if kind == "train" else model.train
    scaling = train.scaling
    cpus = scaling.num_workers * scaling.cpus_per_worker
    gpus = scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0
    if kind == "sweep":
        # Trials that may run at once (one when Tune decides), each with its driver process.
        concurrent = model.max_concurrent_trials or 1
        cpus, gpus = concurrent * (cpus + 1.0), concurrent * gpus
    problems = _beyond_ceiling(kind, model, float(cpus), float(gpus), settings)
    if problems:
        raise InvalidSpec(problems)
    if needs_dataset_read(model, settings):
        try:
            # Counts from a dataset.json that is cheap and safe to read are filled now, so a
            # job that could never start is refused at submission and its record holds the
            # counts it trains with. Other jobs keep null counts until their worker starts.
            model = resolve_class_counts(model, context=_context(settings))
        except (ValidationError, SpecError) as exc:
            raise InvalidSpec(validation_problems(exc)) from None
    return ValidatedSpec(
        kind=kind,
        spec=model.model_dump(mode="json"),
        name=train.name,
        storage_root=train.storage or settings.storage_url,
        requested_cpus=float(cpus),
        requested_gpus=float(gpus),
    )


def _beyond_ceiling(
    kind: str, model, cpus: float, gpus: float, settings: Settings
) -> list[tuple[str, str]]:
    """Problems for a request larger than the cluster can ever be (TOPK_CLUSTER_MAX_CPUS/GPUS;
    none when unset). Such a job could only wait forever in the queue. Each problem names the
    field that made the request too big: the per-worker amount when one worker (with its
    trial's driver, for a sweep) is already over, else the worker count, else (a sweep) the
    trials at once."""
    train = model if kind == "train" else model.train
    scaling = train.scaling
    prefix = "" if kind == "train" else "train."
    driver = 1.0 if kind == "sweep" else 0.0  # CPUs of a trial's driver process
    problems: list[tuple[str, str]] = []
    for unit, total, ceiling, per_worker, extra, variable in (
        ("CPU", cpus, settings.cluster_max_cpus, scaling.cpus_per_worker, driver, "CPUS"),
        ("GPU", gpus, settings.cluster_max_gpus, scaling.gpus_per_worker, 0.0, "GPUS"),
    ):
        if ceiling is None or total <= ceiling + 1e-9:
            continue
        if per_worker + extra > ceiling + 1e-9:
            field = f"{prefix}scaling.{unit.lower()}s_per_worker"
        elif scaling.num_workers * per_worker + extra > ceiling + 1e-9:
            field = f"{prefix}scaling.num_workers"
        else:
            field = "max_concurrent_trials"
        workers = scaling.num_workers
        how = f"{workers} worker{'s' if workers != 1 else ''} x {per_worker:g}"
        if kind == "sweep":
            trials = model.max_concurrent_trials or 1
            how = f"{trials} trials at once x ({how}" + (" + 1 for its driver)" if extra else ")")
        problems.append(
            (
                field,
                f"asks for {total:g} {unit}s ({how}), more than the cluster's ceiling of "
                f"{ceiling:g} {unit}s (TOPK_CLUSTER_MAX_{variable}): it could never start",
            )
        )
    return problems


def _context(settings: Settings) -> dict[str, Any]:
    # Local data that does not exist is refused at submission, naming the field (a few stats,
    # jobs/contract/train.py); remote data is read by the job only.
    context: dict[str, Any] = {
        "allowed_protocols": list(settings.allowed_protocols),
        "check_local_data": True,
    }
    if settings.allowed_roots is not None:
        context["allowed_roots"] = list(settings.allowed_roots)
    return context
