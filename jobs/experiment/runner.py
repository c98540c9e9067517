"""Run an experiment grid on this machine, a process per run, and keep one record per run.

Layout under the output root OUT:
    OUT/data/<dataset>/            shards + dataset.json (built once, reused while the dataset's
                                   build settings are unchanged)
    OUT/runs/<run id>/             the run as `topk train` leaves it (spec.json, metrics.jsonl,
                                   checkpoints, result.json) plus record.json, written last
A run id is `<dataset>--<loss>--<hash of the training spec>--s<seed>`, so a run is redone only
when its spec changes, and a sweep run and a final run with the same spec are one run. A run
with record.json is finished; one without is started again and resumes from its latest
checkpoint.

Every run trains in a worker process of a plain process pool (`RunProcesses`; no Ray):
`concurrency` processes at once (`--concurrency`, else the config's `concurrency`, else 2 on
the CPU and 4 on a GPU, `default_concurrency`), started with `spawn` (CUDA cannot be used in a
forked child) and reused from run to run, so torch is imported once per process. Each process
is its own one-process pool: a process that dies (a segfault, the OOM killer) fails only the
run it held, and the next run gets a fresh process. A process runs the training loop of
`topk train` and of the service's jobs (jobs.training.worker.run_loop, with the same model,
loss, data pipeline, checkpoints and metrics files) in process through
`jobs.training.run.run_training_in_process`: with a Ray Train worker group per run, runs that
had nothing left to train still took 24-39 s each on a 2-core machine (CPU-bound), more than
training one of these small runs. After training, it evaluates the best-validation checkpoint
and the last one on the test split (per-class top-K recall included). The test split is read
only there: sweeps select on the validation split.

Runs train on the GPU when torch finds one, on the CPU otherwise (jobs.training.device:
TOPK_DEVICE=auto|cpu|cuda, default auto); with a GPU the `concurrency` runs share it. The device
is not part of a run's spec (nor of its id): a run started on the CPU resumes on the GPU, and
its record says where it was trained (`device`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.contract.loss import LOSS_SPECS
from jobs.experiment.config import DatasetConfig, ExperimentConfig, deep_merge

RECORD_FILE = "record.json"
CPU_CONCURRENCY = 2
"""Runs at a time on a CPU machine when neither --concurrency nor the config says."""
GPU_CONCURRENCY = 4
"""Runs at a time sharing the GPU when neither --concurrency nor the config says: these small
runs leave a GPU mostly idle, and 4 processes keep it busy without running out of memory."""
Log = Callable[[str], None]


def default_concurrency(device: str) -> int:
    """Runs at a time on `device` ("cpu" or "cuda") when nothing else says."""
    return GPU_CONCURRENCY if device == "cuda" else CPU_CONCURRENCY


def _log_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _digest(value: Any, length: int = 10) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# -- datasets ------------------------------------------------------------------------------------


def _build_settings(config: ExperimentConfig, dataset: DatasetConfig) -> dict[str, Any]:
    settings = dataset.model_dump(exclude={"name", "title", "study", "k", "training"})
    settings["source"] = str(config.source_path(dataset))
    return settings


def build_datasets(config: ExperimentConfig, out: Path, log: Log = _log_stderr) -> dict[str, Path]:
    """Build (or reuse) every dataset's shards; returns name -> path of its dataset.json."""
    from jobs.data.sources import open_source
    from jobs.data.writer import build_shards

    built = {}
    for dataset in config.datasets:
        folder = out / "data" / dataset.name
        settings = _build_settings(config, dataset)
        stamp = folder / "build.json"
        info = folder / "dataset.json"
        if info.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
            built[dataset.name] = info
            continue
        source_path = Path(settings["source"])
        if not source_path.exists():
            raise ValueError(f"dataset {dataset.name}: source {source_path} does not exist")
        log(f"building dataset {dataset.name} from {source_path}")
        source = open_source(str(source_path))
        groups = None
        if dataset.noise_groups == "class_prefix":
            prefixes = [name.split("/", 1)[0] for name in source.class_names]
            index = {prefix: i for i, prefix in enumerate(dict.fromkeys(prefixes))}
            groups = [index[p] for p in prefixes]
        summary = build_shards(
            source,
            str(folder),
            seed=dataset.seed,
            val_fraction=dataset.val_fraction,
            test_fraction=dataset.test_fraction,
            max_per_class=dataset.max_per_class,
            imbalance_ratio=dataset.imbalance_ratio,
            imbalance_profile=dataset.imbalance_profile,
            image_format=dataset.image_format,
            max_size=dataset.max_size,
            train_label_noise=dataset.label_noise,
            label_noise_groups=groups,
            progress=None,
        )
        log(summary.format())
        stamp.write_text(json.dumps(settings, indent=1))
        built[dataset.name] = info
    return built


# -- the plan ------------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    run_id: str
    dataset: str
    loss: str
    params: dict[str, Any]
    """The loss hyperparameters as configured (without `k` and `class_counts`)."""
    seed: int
    spec: dict[str, Any]
    roles: set[str] = field(default_factory=set)
    """"sweep" and/or "final"."""


def make_spec(
    config: ExperimentConfig,
    dataset: DatasetConfig,
    dataset_json: Path,
    num_classes: int,
    loss: str,
    params: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """The training spec (as JSON) of one run; validated here, so a bad config fails early."""
    from jobs.contract.train import TrainSpec

    loss_part = {"name": loss, **params}
    if "k" in LOSS_SPECS[loss].model_fields:
        loss_part["k"] = dataset.k
    ks = sorted({1, dataset.k})
    fixed = {
        "data": {
            "train": str(dataset_json),
            "val": f"{dataset_json}#val",
            "num_classes": num_classes,
        },
        "loss": loss_part,
        "seed": seed,
        "metrics": {"ks": ks, "select": dataset.select_metric, "mode": "max"},
        "checkpoint": {"keep_last": 1},
        "scaling": {"num_workers": 1, "use_gpu": False},
    }
    spec = deep_merge(config.training_for(dataset), fixed)
    spec["loss"] = loss_part  # the loss part is the run's, never merged with a default
    TrainSpec.model_validate(spec)
    return spec


def run_id_for(dataset: str, loss: str, spec: dict[str, Any], seed: int) -> str:
    return f"{dataset}--{loss}--{_digest(spec)}--s{seed}"


def sweep_grid(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the values, in the order given."""
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


class Plan:
    """The runs of a config: sweep runs first, final runs as soon as their parameters are known
    (a swept loss's final runs wait for its sweep on that dataset)."""

    def __init__(self, config: ExperimentConfig, datasets: dict[str, Path]):
        self.config = config
        self.datasets = datasets
        self.num_classes = {
            name: int(json.loads(path.read_text())["num_classes"])
            for name, path in datasets.items()
        }
        self.by_name = {d.name: d for d in config.datasets}
        self.runs: dict[str, PlannedRun] = {}
        self.sweeps: dict[tuple[str, str], list[str]] = {}  # (dataset, loss) -> run ids
        sweep = config.sweep
        if sweep is not None:
            for dataset_name in sweep.datasets:
                for loss, space in sweep.space.items():
                    ids = []
                    for combo in sweep_grid(space):
                        params = deep_merge(config.losses[loss], combo)
                        ids.append(self._add(dataset_name, loss, params, sweep.seed, "sweep"))
                    self.sweeps[(dataset_name, loss)] = ids
        for dataset in config.datasets:
            for loss, params in config.losses.items():
                if (dataset.name, loss) not in self.sweeps:
                    for seed in config.seeds:
                        self._add(dataset.name, loss, params, seed, "final")

    def _add(self, dataset_name: str, loss: str, params: dict, seed: int, role: str) -> str:
        dataset = self.by_name[dataset_name]
        spec = make_spec(
            self.config,
            dataset,
            self.datasets[dataset_name],
            self.num_classes[dataset_name],
            loss,
            params,
            seed,
        )
        run_id = run_id_for(dataset_name, loss, spec, seed)
        run = self.runs.setdefault(
            run_id, PlannedRun(run_id, dataset_name, loss, dict(params), seed, spec)
        )
        run.roles.add(role)
        return run_id

    def release_finals(self, records: dict[str, dict[str, Any]]) -> list[str]:
        """Add the final runs of every sweep whose runs all have records; returns new run ids."""
        added = []
        for (dataset_name, loss), ids in list(self.sweeps.items()):
            if any(run_id not in records for run_id in ids):
                continue
            if self._has_finals(dataset_name, loss):
                continue
            chosen = select_sweep_winner(
                [records[r] for r in ids], self.by_name[dataset_name].select_metric
            )
            params = chosen["params"] if chosen else self.config.losses[loss]
            for seed in self.config.seeds:
                run_id = self._add(dataset_name, loss, params, seed, "final")
                added.append(run_id)
        return added

    def _has_finals(self, dataset_name: str, loss: str) -> bool:
        return any(
            r.dataset == dataset_name and r.loss == loss and "final" in r.roles
            for r in self.runs.values()
        )


def select_sweep_winner(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The succeeded sweep record with the highest best-epoch validation `metric` (the first
    one on a tie); None when none succeeded."""
    scored = [
        r
        for r in records
        if r.get("status") == "succeeded"
        and isinstance((r.get("val_best") or {}).get(metric), float)
    ]
    if not scored:
        return None
    return max(scored, key=lambda r: r["val_best"][metric])


# -- one run (inside a worker process) -----------------------------------------------------------


def evaluate_checkpoint(
    spec: Any, checkpoint: Path, split_url: str, device: str = "cpu"
) -> dict[str, Any]:
    """Top-k and macro top-k accuracy and per-class recall of a checkpoint on one split,
    computed on `device` ("cpu" or "cuda")."""
    import torch

    from jobs.data.pipeline import build_eval_loader
    from jobs.models import build_model
    from jobs.training.checkpoint import load_training_state
    from jobs.training.loop import evaluate

    model = build_model(
        spec.model.arch,
        spec.data.num_classes,
        in_channels=spec.data.channels,
        cosine_head=bool(spec.model.cosine_head),
    )
    load_training_state(checkpoint, model=model)
    model = model.to(device)
    data = spec.data.model_copy(update={"val": split_url, "loader_workers": 0})
    loader = build_eval_loader(data, batch_size=256, rank=0, world_size=1)
    ks = sorted(set(spec.metrics.ks))
    with torch.no_grad():
        counts = evaluate(model, loader, ks, spec.data.num_classes, device=device)
    support = counts.support.clamp(min=1).double()
    result: dict[str, Any] = {"samples": int(counts.support.sum())}
    for row, k in enumerate(counts.ks):
        result[f"top{k}"] = counts.accuracy(k)
        result[f"macro_top{k}"] = counts.macro_accuracy(k)
        result[f"class_recall_top{k}"] = (counts.hits[row].double() / support).tolist()
    result["class_support"] = counts.support.tolist()
    return result


def train_and_test(run: dict[str, Any], runs_root: str, device: str = "cpu") -> dict[str, Any]:
    """Train one planned run on `device` ("cpu" or "cuda"; resuming it if it was interrupted),
    test it and write its record.json; returns the record. A failed run gets a record with
    status "failed"."""
    import torch

    from jobs.contract.run_files import read_metrics
    from jobs.contract.train import TrainSpec
    from jobs.training.run import run_training_in_process
    from jobs.training.worker import local_checkpoints

    torch.set_num_threads(1)
    started = time.monotonic()
    run_dir = Path(runs_root) / run["run_id"]
    spec = TrainSpec.model_validate(run["spec"])
    record: dict[str, Any] = {
        key: run[key] for key in ("run_id", "dataset", "loss", "params", "seed", "roles")
    }
    record["device"] = device
    try:
        result = run_training_in_process(spec, run["run_id"], storage=runs_root, device=device)
        error = None
    except RuntimeError as exc:
        result, error = None, str(exc)
    history = read_metrics(str(run_dir / "metrics.jsonl"))
    record["history"] = [
        {key: value for key, value in epoch.items() if key != "time"} for epoch in history
    ]
    seconds = [e["epoch_seconds"] for e in history if isinstance(e.get("epoch_seconds"), float)]
    record["seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else None
    record["epochs"] = len(history)
    dataset_info = json.loads(Path(spec.data.train).read_text())  # type: ignore[arg-type]
    record["train_class_counts"] = dataset_info["splits"]["train"]["class_counts"]
    if error is None and result is not None:
        try:
            checkpoints = local_checkpoints(run_dir / "checkpoints")
            best_epoch = result.get("best_epoch") or max(checkpoints)
            final_epoch = max(checkpoints)
            test_url = f"{spec.data.train}#test"
            record["best_epoch"] = best_epoch
            record["val_best"] = _val_metrics(history, best_epoch)
            record["val_final"] = _val_metrics(history, final_epoch)
            record["test_best"] = evaluate_checkpoint(
                spec, checkpoints[best_epoch], test_url, device
            )
            record["test_final"] = (
                record["test_best"]
                if final_epoch == best_epoch
                else evaluate_checkpoint(spec, checkpoints[final_epoch], test_url, device)
            )
        except (KeyError, ValueError, OSError) as exc:
            error = f"testing failed: {type(exc).__name__}: {exc}"
    record["status"] = "failed" if error else "succeeded"
    record["error"] = error
    record["wall_seconds"] = time.monotonic() - started
    (run_dir / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return record


def _val_metrics(history: list[dict[str, Any]], epoch: int) -> dict[str, float]:
    for entry in history:
        if entry.get("epoch") == epoch:
            return {k: float(v) for k, v in entry.items() if k.startswith("val_")}
    return {}


# -- the driver ----------------------------------------------------------------------------------


def read_records(runs_root: Path, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    records = {}
    for run_id in run_ids:
        path = runs_root / run_id / RECORD_FILE
        if path.is_file():
            records[run_id] = json.loads(path.read_text())
    return records


def _load_records(plan: Plan, runs_root: Path, *, retry_failed: bool) -> dict[str, Any]:
    """The records of the plan's runs (without the failed ones when `retry_failed`), adding
    the final runs of sweeps that finished earlier and reading theirs too."""

    def kept(run_ids: list[str]) -> dict[str, Any]:
        records = read_records(runs_root, run_ids)
        if retry_failed:
            records = {k: v for k, v in records.items() if v.get("status") == "succeeded"}
        return records

    records = kept(list(plan.runs))
    while added := plan.release_finals(records):
        records.update(kept(added))
    return records


def collect(config: ExperimentConfig, out: Path) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """The plan and the records already written, training nothing (the datasets must exist)."""
    datasets = {}
    for dataset in config.datasets:
        info = out / "data" / dataset.name / "dataset.json"
        if not info.is_file():
            raise ValueError(f"dataset {dataset.name} is not built under {out}: run the grid first")
        datasets[dataset.name] = info
    plan = Plan(config, datasets)
    return plan, _load_records(plan, out / "runs", retry_failed=False)


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    retry_failed: bool = False,
    log: Log = _log_stderr,
    device: str | None = None,
) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """Build the datasets, run every planned run that has no record yet (`retry_failed`: and
    those whose record says failed), and return the plan and all records.

    Runs train on `device` ("auto", "cpu" or "cuda"; None reads TOPK_DEVICE, default auto: the
    GPU when there is one), `config.concurrency` at a time (None: `default_concurrency`).
    Raises ValueError for a bad config value, a missing source, or "cuda" without a GPU."""
    from jobs.training.device import resolve_device

    chosen = resolve_device(device).type
    out.mkdir(parents=True, exist_ok=True)
    invoked = time.monotonic()
    try:
        return _run_grid(config, out, retry_failed=retry_failed, log=log, device=chosen)
    finally:
        _append_timing(out, time.monotonic() - invoked)


def _append_timing(out: Path, seconds: float) -> None:
    """Add this invocation's wall time to OUT/timing.json (the report sums the entries)."""
    path = out / "timing.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append({"finished": time.time(), "seconds": seconds})
    path.write_text(json.dumps(entries, indent=1))


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


def _run_grid(
    config: ExperimentConfig, out: Path, *, retry_failed: bool, log: Log, device: str
) -> tuple[Plan, dict[str, dict[str, Any]]]:
    datasets = build_datasets(config, out, log)
    plan = Plan(config, datasets)
    runs_root = out / "runs"
    runs_root.mkdir(exist_ok=True)
    records = _load_records(plan, runs_root, retry_failed=retry_failed)
    todo = [r for r in plan.runs if r not in records]
    if not todo:
        log(f"all {len(plan.runs)} runs have records; nothing to train")
        return plan, records

    concurrency = config.concurrency or default_concurrency(device)
    log(f"{len(todo)} runs to train, {concurrency} at a time, on {device}")
    started = time.monotonic()
    done_now = 0
    with RunProcesses(concurrency) as processes:
        while True:
            running = processes.running
            todo = [r for r in plan.runs if r not in records and r not in running]
            todo.sort(key=lambda r: "sweep" not in plan.runs[r].roles)  # sweeps unlock finals
            while todo and processes.has_room:
                run_id = todo.pop(0)
                run = plan.runs[run_id]
                payload = {**asdict(run), "roles": sorted(run.roles)}
                processes.submit(run_id, train_and_test, payload, str(runs_root), device)
            if not processes.running:
                break
            run_id, future = processes.next_done()
            try:
                record = future.result()
            except Exception as exc:  # the process died or the task raised (not a training
                # failure, which train_and_test records itself); no record.json: the next
                # invocation tries the run again
                reason = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, BrokenProcessPool):
                    reason = f"its process died ({exc})"
                record = {"run_id": run_id, "status": "failed", "error": reason}
                log(f"run {run_id} crashed: {reason}")
            records[run_id] = record
            done_now += 1
            plan.release_finals(records)
            remaining = sum(1 for r in plan.runs if r not in records)
            elapsed = time.monotonic() - started
            eta = elapsed / done_now * remaining
            log(_progress_line(record, len(records), len(plan.runs), elapsed, eta))
    return plan, records


def _progress_line(
    record: dict[str, Any], done: int, total: int, elapsed: float, eta: float
) -> str:
    head = f"[{done}/{total}, {elapsed / 60:.1f} min, about {eta / 60:.0f} min left]"
    if record.get("status") != "succeeded":
        return f"{head} FAILED {record['run_id']}: {record.get('error')}"
    test = record.get("test_best", {})
    figures = ", ".join(
        f"{key} {value:.3f}"
        for key, value in test.items()
        if key.startswith(("top", "macro_top")) and isinstance(value, float)
    )
    return f"{head} {record['run_id']}: test {figures} ({record['wall_seconds']:.0f} s)"
