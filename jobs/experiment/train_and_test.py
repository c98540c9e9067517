"""One run of the experiment, inside a worker process: train it in process (resuming it when
it was interrupted), test its best-validation and last checkpoints on the test split, and
write OUT/runs/<run id>/record.json last (a run with a record is finished).

The test split is read only here: sweeps select on the validation split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jobs.contract.dataset_info import read_dataset_info
from jobs.contract.train import TrainSpec

RECORD_FILE = "record.json"


def evaluate_checkpoint(
    spec: TrainSpec, checkpoint: Path, split_url: str, device: str = "cpu"
) -> dict[str, Any]:
    """Top-k and macro top-k accuracy (`TopKCounts.to_metrics` names: top{k}, macro_top{k}),
    per-class recall, and the collapse share (the share of images whose top-1 prediction is
    the most-predicted class, `collapse_class`) of a checkpoint on the split at `split_url`,
    computed on `device` ("cpu" or "cuda")."""
    import torch

    from jobs.data.pipeline import build_eval_loader
    from jobs.training.checkpoint import load_training_state
    from jobs.training.loop import evaluate
    from jobs.training.worker import build_model_for

    model = build_model_for(spec, load_pretrained=False)  # the checkpoint holds every weight
    load_training_state(checkpoint, model=model)
    model = model.to(device)
    data = spec.data.model_copy(update={"loader_workers": 0})  # read in this process
    loader = build_eval_loader(
        data, batch_size=256, rank=0, world_size=1, source=split_url, source_field="test split"
    )
    ks = sorted(set(spec.metrics.ks))
    with torch.no_grad():
        counts = evaluate(model, loader, ks, spec.data.num_classes, device=device)
    support = counts.support.clamp(min=1).double()
    result: dict[str, Any] = {"samples": int(counts.support.sum()), **counts.to_metrics()}
    for row, k in enumerate(counts.ks):
        result[f"class_recall_top{k}"] = (counts.hits[row].double() / support).tolist()
    result["class_support"] = counts.support.tolist()
    result["collapse_share"] = counts.collapse_share()
    result["collapse_class"] = counts.most_predicted()
    return result


def train_and_test(run: dict[str, Any], runs_root: str, device: str = "cpu") -> dict[str, Any]:
    """Train one planned run on `device` ("cpu" or "cuda"; resuming it if it was interrupted),
    test it and write its record.json; returns the record. A failed run gets a record with
    status "failed". The run's spec is resolved here, once (this process starts the run)."""
    import torch

    from jobs.contract.run_files import read_metrics
    from jobs.contract.spec_files import resolve_class_counts
    from jobs.training.run import run_training_in_process

    torch.set_num_threads(1)
    started = time.monotonic()
    run_dir = Path(runs_root) / run["run_id"]
    spec = resolve_class_counts(TrainSpec.model_validate(run["spec"]))
    record: dict[str, Any] = {
        key: run[key]
        for key in ("run_id", "dataset", "arm", "loss", "params", "lr", "seed", "roles")
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
    info = read_dataset_info(spec.data.train)  # type: ignore[arg-type]  # the plan's dataset.json
    record["train_class_counts"] = info.class_counts["train"]
    record["val_samples"] = info.num_samples.get("val", 0)
    if error is None and result is not None:
        try:
            record.update(_test_record(spec, run_dir, history, result["best_epoch"], device))
        except (KeyError, ValueError, OSError) as exc:
            error = f"testing failed: {type(exc).__name__}: {exc}"
    record["status"] = "failed" if error else "succeeded"
    record["error"] = error
    record["wall_seconds"] = time.monotonic() - started
    (run_dir / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return record


def _test_record(
    spec: TrainSpec,
    run_dir: Path,
    history: list[dict[str, Any]],
    best_epoch: int | None,
    device: str,
) -> dict[str, Any]:
    """The record's test part: the validation metrics of the best epoch (by metrics.select;
    the last one when none was scored) and of the last, and both checkpoints' test metrics."""
    from jobs.training.session import local_checkpoints

    checkpoints = local_checkpoints(run_dir / "checkpoints")
    final_epoch = max(checkpoints)
    best_epoch = best_epoch or final_epoch
    test_url = f"{spec.data.train}#test"
    test_best = evaluate_checkpoint(spec, checkpoints[best_epoch], test_url, device)
    return {
        "best_epoch": best_epoch,
        "val_best": _val_metrics(history, best_epoch),
        "val_final": _val_metrics(history, final_epoch),
        "test_best": test_best,
        "test_final": (
            test_best
            if final_epoch == best_epoch
            else evaluate_checkpoint(spec, checkpoints[final_epoch], test_url, device)
        ),
    }


def _val_metrics(history: list[dict[str, Any]], epoch: int) -> dict[str, float]:
    for entry in history:
        if entry.get("epoch") == epoch:
            return {k: float(v) for k, v in entry.items() if k.startswith("val_")}
    return {}
