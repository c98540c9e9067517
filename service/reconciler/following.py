"""Following launched jobs: Ray's status becomes ours, and an ended Ray job an outcome.

A run that recorded its own failure (result.json) and a spec the worker refused (its exit code)
fail the job at once: another attempt would end the same way. Any other failure, and a job Ray
no longer knows, is an infrastructure failure: the job is queued again for a new attempt after
a backoff (resuming from the run's checkpoints, since the run name is the job id), and fails
with the reason once its attempts are spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from jobs.contract import exit_codes, run_files
from service.job_status import CANCELLED, FAILED, LAUNCHED, LAUNCHING, QUEUED, RUNNING, SUCCEEDED
from service.launcher import LaunchError, RayJobInfo
from service.settings import Settings
from service.store import JobRow, Store

SPEC_REFUSED_EXIT_CODES = exit_codes.REFUSED_BY_DRIVER
"""`python -m jobs train|sweep` exits 3 when the spec is invalid and 2 when its arguments or its
spec file are refused (jobs/contract/exit_codes.py): the user's error, the job fails at once. 1
when the run failed; any other code or a vanished job is an infrastructure failure (retried up
to TOPK_MAX_ATTEMPTS) unless the run recorded its own failure in result.json."""


class Following:
    """Moves launching and running jobs along with their Ray jobs. `submit` submits a
    launching job that Ray has never seen (service/reconciler/launching.py)."""

    def __init__(
        self,
        store: Store,
        launcher,
        settings: Settings,
        submit: Callable[[JobRow], None],
        clock: Callable[[], float] = time.time,
    ):
        self.store, self.launcher, self.settings = store, launcher, settings
        self.submit, self.clock = submit, clock

    def follow(self, job: JobRow) -> None:
        assert job.submission_id is not None
        try:
            info = self.launcher.info(job.submission_id)
        except LaunchError as exc:
            self.store.touch(job.id, f"Ray unreachable, will retry: {exc}", expect=job.status)
            return
        if info is None:
            if job.status == LAUNCHING:
                # Recorded but never submitted (or the submission was lost): submit it now.
                self.submit(job)
            else:
                self.retry_or_fail(
                    job, f"Ray job {job.submission_id} vanished (was the cluster restarted?)"
                )
            return
        if info.status == "PENDING":
            if job.status == LAUNCHING:
                self.store.touch(
                    job.id, f"Ray job {info.submission_id} is pending", expect=job.status
                )
            return
        if info.status == "RUNNING":
            if job.status == LAUNCHING:
                self.store.transition(
                    job.id, RUNNING, f"Ray job {info.submission_id} is running", expect=LAUNCHING
                )
            return
        self._finish(job, info)

    def _finish(self, job: JobRow, info: RayJobInfo) -> None:
        """The Ray job ended (SUCCEEDED, STOPPED or FAILED): the job's outcome."""
        result = run_files.read_run_json(job.storage_root, job.id, "result.json")
        if info.status != "STOPPED" and result is not None and result.get("status") == "failed":
            # The run recorded its own failure (Ray may still say SUCCEEDED: the driver exited).
            reason = f"training failed: {result.get('error') or 'see the logs'}"
            self.store.transition(job.id, FAILED, reason, expect=LAUNCHED)
        elif info.status == "SUCCEEDED":
            self.store.transition(job.id, SUCCEEDED, "finished", expect=LAUNCHED)
        elif info.status == "STOPPED":
            reason = "stopped on Ray (outside the service)"
            self.store.transition(job.id, CANCELLED, reason, expect=LAUNCHED)
        elif info.exit_code in SPEC_REFUSED_EXIT_CODES:
            # The user's error, found by the worker: another attempt would be refused the same way.
            reason = (
                f"the worker refused the spec (exit code {info.exit_code}): "
                f"{self._refusal(job, info)}"
            )
            self.store.transition(job.id, FAILED, reason, expect=LAUNCHED)
        else:
            self.retry_or_fail(job, f"attempt {job.attempt} failed: {_summary(info)}")

    def _refusal(self, job: JobRow, info: RayJobInfo) -> str:
        """The worker's error lines: from the log tail in Ray's message, else from the job's
        logs, else a pointer to them."""
        found = _error_lines(info.message or "")
        if found is None:
            try:
                found = _error_lines(self.launcher.logs(job.submission_id)[-20_000:])
            except LaunchError:
                found = None
        return found or "see the job's logs"

    def retry_or_fail(self, job: JobRow, reason: str) -> None:
        """An infrastructure failure of the job's attempt: queue the job for another attempt
        after a backoff, or fail it once its attempts are spent."""
        attempts = self.settings.max_attempts
        if job.attempt >= attempts:
            reason = f"{reason}; gave up after {job.attempt} attempts"
            self.store.transition(job.id, FAILED, reason, expect=job.status)
            return
        delay = self.settings.retry_backoff_s * 2 ** (job.attempt - 1)
        self.store.transition(
            job.id,
            QUEUED,
            f"{reason}; retrying in {delay:.0f}s (attempt {job.attempt + 1} of {attempts}, "
            "resuming from the last checkpoint)",
            expect=job.status,
            not_before=self.clock() + delay,
        )


_MAX_REFUSAL_CHARS = 500


def _error_lines(log_tail: str) -> str | None:
    """The worker's error out of the end of its output: from the last line that opens an error
    (`error: ...` or `SPEC: invalid spec (N problem(s)):`) to the end, joined on one line and
    bounded; None when no such line is there. Ray's failure message carries the last log lines
    after its own first line."""
    lines = [line.strip() for line in log_tail.splitlines()[-40:] if line.strip()]
    starts = [
        i
        for i, line in enumerate(lines)
        if line.startswith("error:") or ": error: " in line or ": invalid spec (" in line
    ]
    if not starts:
        return None
    text = " ".join(lines[starts[-1] :])
    return text if len(text) <= _MAX_REFUSAL_CHARS else text[: _MAX_REFUSAL_CHARS - 3] + "..."


def _summary(info: RayJobInfo) -> str:
    parts = [info.error_type or info.status]
    if info.exit_code is not None:
        parts.append(f"exit code {info.exit_code}")
    if info.message:
        parts.append(info.message.splitlines()[0][:300])
    return ", ".join(parts)
