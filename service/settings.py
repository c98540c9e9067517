"""Service settings, read once from the environment (names are the deployment contract).

Each setting is a field of `Settings`, read from the variable TOPK_<FIELD NAME>: `port` from
TOPK_PORT, `allowed_roots` from TOPK_ALLOWED_ROOTS (a comma list), ... (service/README.md lists
them). An empty variable counts as unset. Every setting has an embedded default, so `topk serve`
with no configuration runs on one machine: SQLite and run storage under TOPK_DATA_DIR, a local
Ray head started by `serve`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jobs.contract.urls import ALLOWED_PROTOCOLS

LAUNCH_MODES = ("ray", "hold")
"""`ray` launches jobs on Ray; `hold` accepts and records jobs but keeps them queued (used by the
API benchmark and by API-only tests, so they measure the service and not a cluster)."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".topk")
    database_url: str = ""  # default: SQLite in data_dir
    ray_address: str | None = None
    ray_dashboard_url: str | None = None  # default: ray_address
    storage_url: str = ""  # default: data_dir/runs
    # The contract's allow-list, the one the jobs apply (it used to be a copy that lacked gcs).
    allowed_protocols: tuple[str, ...] = tuple(sorted(ALLOWED_PROTOCOLS))
    allowed_roots: tuple[str, ...] | None = None
    # Hosts (bucket names for s3/gs) whose dataset.json the server may read while it answers a
    # submission; the worker reads any other remote dataset at start-up (service/specs.py).
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 1_048_576
    host: str = "127.0.0.1"
    port: int = 8000
    launch_mode: str = "ray"
    max_attempts: int = 3
    retry_backoff_s: float = 5.0
    reconcile_interval_s: float = 2.0
    job_python: str = "python"
    worker_threads: int = 8
    # An autoscaling cluster (KubeRay) shows only the nodes it has now; the queue admits jobs up
    # to these totals so that Ray sees the demand and scales up (unset: what the cluster has).
    cluster_max_cpus: float | None = None
    cluster_max_gpus: float | None = None
    test_crash_at: str | None = field(default=None, repr=False)  # see crash_point

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(
                self, "database_url", f"sqlite:///{(self.data_dir / 'topk.db').absolute()}"
            )
        if not self.storage_url:
            object.__setattr__(self, "storage_url", str((self.data_dir / "runs").absolute()))
        local_storage = _local_path(self.storage_url)
        if self.allowed_roots and local_storage and local_storage not in self.allowed_roots:
            # Every job reads its spec.json and writes its run under the runs folder: allowed
            # roots that leave it out would refuse every job in its worker.
            object.__setattr__(self, "allowed_roots", (*self.allowed_roots, local_storage))
        object.__setattr__(
            self, "allowed_hosts", tuple(host.lower().rstrip(".") for host in self.allowed_hosts)
        )
        if self.ray_dashboard_url is None and self.ray_address:
            object.__setattr__(self, "ray_dashboard_url", self.ray_address)
        if self.launch_mode not in LAUNCH_MODES:
            raise ValueError(
                f"TOPK_LAUNCH_MODE must be one of {', '.join(LAUNCH_MODES)}, got {self.launch_mode!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Build settings from the TOPK_* variables of `environ` (default: the process's);
        `overrides` (field names, None for unset) win over the environment.

        Raises ValueError naming the variable when a value has the wrong type.
        """
        env = os.environ if environ is None else environ
        values = {}
        for name, kind in _field_types().items():
            variable = f"TOPK_{name.upper()}"
            if env.get(variable):
                values[name] = _parse(variable, env[variable], kind)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _field_types() -> dict[str, type]:
    """Each field's type, None taken out of the optional ones (`float | None` -> float)."""
    hints = typing.get_type_hints(Settings)
    kinds = {}
    for setting in dataclasses.fields(Settings):
        kind = hints[setting.name]
        if isinstance(kind, types.UnionType):
            (kind,) = (part for part in typing.get_args(kind) if part is not type(None))
        kinds[setting.name] = kind
    return kinds


def _parse(variable: str, text: str, kind) -> object:
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            article = "an integer" if kind is int else "a number"
            raise ValueError(f"{variable} must be {article}, got {text!r}") from None
    return kind(text)  # str, Path


def _local_path(url: str) -> str | None:
    """The absolute local path of a local storage URL (a path or file://), else None."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        return None
    return os.path.abspath(os.path.expanduser(url))


def crash_point(settings: Settings, step: str) -> None:
    """Test hook: TOPK_TEST_CRASH_AT=<step> kills the process (like kill -9) at that step."""
    if settings.test_crash_at == step:
        os._exit(137)
