"""Service settings, read once from the environment (names are the deployment contract).

Every setting has an embedded default, so `topk serve` with no configuration runs on one
machine: SQLite and run storage under TOPK_DATA_DIR, a local Ray head started by `serve`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LAUNCH_MODES = ("ray", "hold")
"""`ray` launches jobs on Ray; `hold` accepts and records jobs but keeps them queued (used by the
API benchmark and by API-only tests, so they measure the service and not a cluster)."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path(".topk")
    database_url: str = ""
    ray_address: str | None = None
    ray_dashboard_url: str | None = None
    storage_url: str = ""
    allowed_protocols: tuple[str, ...] = ("file", "s3", "gs", "https", "memory")
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
    test_crash_at: str | None = field(default=None, repr=False)

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
        if self.ray_dashboard_url is None and self.ray_address:
            object.__setattr__(self, "ray_dashboard_url", self.ray_address)
        if self.launch_mode not in LAUNCH_MODES:
            raise ValueError(
                f"TOPK_LAUNCH_MODE must be one of {', '.join(LAUNCH_MODES)}, got {self.launch_mode!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Build settings from TOPK_* variables; `overrides` (field names) win over the environment.

        Raises ValueError naming the variable when a value has the wrong type.
        """
        env = os.environ if environ is None else environ
        values: dict = {}
        if env.get("TOPK_DATA_DIR"):
            values["data_dir"] = Path(env["TOPK_DATA_DIR"])
        for name, var in (
            ("database_url", "TOPK_DATABASE_URL"),
            ("ray_address", "TOPK_RAY_ADDRESS"),
            ("ray_dashboard_url", "TOPK_RAY_DASHBOARD_URL"),
            ("storage_url", "TOPK_STORAGE_URL"),
            ("host", "TOPK_HOST"),
            ("launch_mode", "TOPK_LAUNCH_MODE"),
            ("job_python", "TOPK_JOB_PYTHON"),
            ("test_crash_at", "TOPK_TEST_CRASH_AT"),
        ):
            if env.get(var):
                values[name] = env[var]
        for name, var, kind in (
            ("max_body_bytes", "TOPK_MAX_BODY_BYTES", int),
            ("port", "TOPK_PORT", int),
            ("max_attempts", "TOPK_MAX_ATTEMPTS", int),
            ("retry_backoff_s", "TOPK_RETRY_BACKOFF_S", float),
            ("reconcile_interval_s", "TOPK_RECONCILE_INTERVAL_S", float),
            ("worker_threads", "TOPK_WORKER_THREADS", int),
            ("cluster_max_cpus", "TOPK_CLUSTER_MAX_CPUS", float),
            ("cluster_max_gpus", "TOPK_CLUSTER_MAX_GPUS", float),
        ):
            if env.get(var):
                try:
                    values[name] = kind(env[var])
                except ValueError:
                    raise ValueError(
                        f"{var} must be a{'n integer' if kind is int else ' number'}, "
                        f"got {env[var]!r}"
                    ) from None
        if env.get("TOPK_ALLOWED_PROTOCOLS"):
            values["allowed_protocols"] = _split_list(env["TOPK_ALLOWED_PROTOCOLS"])
        if env.get("TOPK_ALLOWED_ROOTS"):
            values["allowed_roots"] = _split_list(env["TOPK_ALLOWED_ROOTS"])
        if env.get("TOPK_ALLOWED_HOSTS"):
            values["allowed_hosts"] = tuple(
                host.lower().rstrip(".") for host in _split_list(env["TOPK_ALLOWED_HOSTS"])
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def _local_path(url: str) -> str | None:
    """The absolute local path of a local storage URL (a path or file://), else None."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        return None
    return os.path.abspath(os.path.expanduser(url))


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())
