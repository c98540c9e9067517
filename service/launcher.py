"""Launching jobs on Ray through its Job Submission API (the executor; the DB stays the record).

The entrypoint is built here from values the service generated or validated (python executable
from settings, job kind, the spec URL the service wrote, the job id, the checked storage root),
each shlex-quoted; no user text reaches a shell or `runtime_env`. The job's environment carries
the service's URL limits (`build_job_env`), so its workers open only what a submission may name,
whatever the Ray head's own environment says. Token auth for local clusters
comes from the process environment (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), read by Ray's
own client.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from service.error_text import short_message


class LaunchError(RuntimeError):
    """Ray could not be reached or refused a request (an infrastructure problem)."""


@dataclass(frozen=True)
class RayJobInfo:
    submission_id: str
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str | None
    error_type: str | None
    exit_code: int | None

    @property
    def is_terminal(self) -> bool:
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")


def build_entrypoint(
    *, python: str, kind: str, spec_url: str, run_name: str, storage_root: str
) -> str:
    """The command a Ray job runs: `python -m jobs {train|sweep} --spec ... --run-name ...`."""
    if kind not in ("train", "sweep"):
        raise ValueError(f"kind must be 'train' or 'sweep', got {kind!r}")
    argv = [*shlex.split(python), "-m", "jobs", kind, "--spec", spec_url, "--run-name", run_name]
    argv += ["--storage", storage_root]
    return shlex.join(argv)


def build_job_env(
    *, allowed_protocols: Sequence[str], allowed_roots: Sequence[str] | None
) -> dict[str, str]:
    """The environment variables a job runs with: the URL limits the service validated the spec
    with, read by jobs.contract.urls.check_url in the job's driver and every worker. Both are always
    set (an empty TOPK_ALLOWED_ROOTS: no local root limit)."""
    return {
        "TOPK_ALLOWED_PROTOCOLS": ",".join(allowed_protocols),
        "TOPK_ALLOWED_ROOTS": ",".join(allowed_roots or ()),
    }


def submission_id_for(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


class RayLauncher:
    """A thin, thread-safe wrapper around JobSubmissionClient that speaks our error type."""

    def __init__(self, address: str):
        self.address = address
        self._client = None
        self._lock = threading.Lock()

    def _get_client(self):
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address)
                except Exception as exc:  # connection refused, auth, version check
                    raise LaunchError(f"Ray at {self.address} is unreachable: {exc}") from exc
            return self._client

    def _call(self, method: str, *args, **kwargs):
        client = self._get_client()
        try:
            return getattr(client, method)(*args, **kwargs)
        except RuntimeError as exc:
            raise LaunchError(short_message(exc)) from exc
        except Exception as exc:  # requests' connection errors and the like
            with self._lock:
                self._client = None  # reconnect next time
            raise LaunchError(
                f"Ray at {self.address} is unreachable: {short_message(exc)}"
            ) from exc

    def ping(self) -> None:
        self._call("get_version")

    def submit(
        self, submission_id: str, entrypoint: str, env: Mapping[str, str] | None = None
    ) -> None:
        """Submit once, with `env` as the job's environment variables (Ray hands a job's
        runtime_env to its tasks and actors, the training workers included); a submission id
        that Ray already knows counts as submitted."""
        try:
            self._call(
                "submit_job",
                entrypoint=entrypoint,
                submission_id=submission_id,
                metadata={"topk_submission": submission_id},
                runtime_env={"env_vars": dict(env)} if env else None,
            )
        except LaunchError:
            if self.info(submission_id) is not None:
                return
            raise

    def info(self, submission_id: str) -> RayJobInfo | None:
        """The Ray job's status, or None when Ray has no job with this submission id."""
        try:
            details = self._call("get_job_info", submission_id)
        except LaunchError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise
        error_type = details.error_type
        return RayJobInfo(
            submission_id=submission_id,
            status=str(getattr(details.status, "value", details.status)),
            message=details.message,
            error_type=str(getattr(error_type, "value", error_type)) if error_type else None,
            exit_code=details.driver_exit_code,
        )

    def stop(self, submission_id: str) -> None:
        self._call("stop_job", submission_id)

    def logs(self, submission_id: str) -> str:
        return self._call("get_job_logs", submission_id)

    async def follow_logs(self, submission_id: str) -> AsyncIterator[str]:
        client = self._get_client()
        try:
            async for chunk in client.tail_job_logs(submission_id):
                yield chunk
        except RuntimeError as exc:
            raise LaunchError(short_message(exc)) from exc

    def capacity(self) -> dict[str, float]:
        """Total CPU and GPU of the cluster's live nodes (what a queued job may ask for)."""
        client = self._get_client()
        try:
            response = client._do_request("GET", "/api/v0/nodes?limit=10000")
            response.raise_for_status()
            nodes = response.json()["data"]["result"]["result"]
        except Exception as exc:
            raise LaunchError(f"could not read the cluster's resources: {exc}") from exc
        total = {"CPU": 0.0, "GPU": 0.0}
        for node in nodes:
            if node.get("state") != "ALIVE":
                continue
            resources = node.get("resources_total") or {}
            total["CPU"] += float(resources.get("CPU", 0.0))
            total["GPU"] += float(resources.get("GPU", 0.0))
        return total
