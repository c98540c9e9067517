"""The experiment runner's executor: a plain process pool of spawned processes, each training
one run at a time (no Ray)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any


class RunProcesses:
    """Up to `size` worker processes, each training one run at a time.

    Each process is its own one-process pool, started with `spawn` (a forked child cannot use
    CUDA, and would inherit the parent's threads) and kept for the next run, so torch is
    imported once per process. A process that dies (a segfault, the OOM killer) breaks only its
    own pool: its run's future raises BrokenProcessPool, and the next run gets a new process.
    """

    def __init__(self, size: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[ProcessPoolExecutor | None] = [None] * size  # None: not started
        self._busy: dict[Future, tuple[ProcessPoolExecutor, str]] = {}

    def __enter__(self) -> RunProcesses:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def has_room(self) -> bool:
        return bool(self._idle)

    @property
    def running(self) -> list[str]:
        return [run_id for _, run_id in self._busy.values()]

    def submit(self, run_id: str, fn: Callable[..., Any], *args: Any) -> None:
        """Start `fn(*args)` in an idle process; raises IndexError when all are busy."""
        pool = self._idle.pop()
        if pool is None:
            pool = ProcessPoolExecutor(max_workers=1, mp_context=self._context)
        self._busy[pool.submit(fn, *args)] = (pool, run_id)

    def next_done(self) -> tuple[str, Future]:
        """Wait for a run to end; returns its id and its (done) future."""
        done, _ = wait(self._busy, return_when=FIRST_COMPLETED)
        future = next(f for f in self._busy if f in done)  # the oldest of those done
        pool, run_id = self._busy.pop(future)
        if isinstance(future.exception(), BrokenProcessPool):
            pool.shutdown(wait=True)  # the process is gone; a new one starts on demand
            self._idle.append(None)
        else:
            self._idle.append(pool)
        return run_id, future

    def close(self) -> None:
        """Let the running runs finish (on Ctrl-C they are interrupted with the driver: they
        share its process group) and stop every process."""
        pools = [pool for pool in self._idle if pool is not None]
        pools += [pool for pool, _ in self._busy.values()]
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._idle, self._busy = [], {}
