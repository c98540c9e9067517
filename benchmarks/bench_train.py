"""Training-step cost of the top-K losses, and DDP scaling of a training epoch on Ray.

1. Step time of a real training step (forward, loss, backward, SGD step) of ResNet-18 at 32x32,
   batch 128, on the CPU, for each loss against cross-entropy at 100 and 1,000 classes. The
   losses are timed interleaved in one process, so machine noise hits them alike; the figure is
   the ratio of medians.
2. Wall time of a training epoch with 2 Ray Train DDP workers against 1 worker on the same
   data (Omniglot shards written to a temporary folder), from the epoch times the runs report.

    .venv/bin/python benchmarks/bench_train.py               # both parts
    .venv/bin/python benchmarks/bench_train.py --part step --repeats 7
    .venv/bin/python benchmarks/bench_train.py --part ddp
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jobs.models import build_model
from topk import create_loss

LOSSES = {
    "cross_entropy": {},
    "noised_topk": {"k": 5, "epsilon": 1.0, "n_samples": 5},
    "noised_topk_imbalanced": {"k": 5, "epsilon": 0.01, "n_samples": 5},
    "smooth_topk_svm": {"k": 5, "tau": 0.1, "alpha": 1.0},
}
# The machine's shared data: $TOPK_SHARED_DIR, else ../shared next to the repository.
SHARED_DATA = (
    Path(os.environ.get("TOPK_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
    / "data"
)
OMNIGLOT_ZIP = SHARED_DATA / "omniglot" / "images_background_small1.zip"


def _long_tail_counts(num_classes: int) -> list[int]:
    """Exponentially decaying class counts (ratio 100), as CIFAR-LT."""
    return [max(1, round(500 * 0.01 ** (i / (num_classes - 1)))) for i in range(num_classes)]


def _step_setup(name: str, num_classes: int, arch: str, batch_size: int, image_size: int):
    params = dict(LOSSES[name])
    loss_class_needs_counts = name in ("noised_topk_imbalanced",)
    if loss_class_needs_counts:
        params["class_counts"] = _long_tail_counts(num_classes)
    loss_fn = create_loss(name, **params)
    torch.manual_seed(0)
    model = build_model(
        arch, num_classes, in_channels=3, cosine_head=bool(loss_fn.needs_cosine_head)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, image_size, image_size)
    # trained-like scores matter for the lazy sampler; labels cover all classes
    labels = torch.randint(0, num_classes, (batch_size,))
    generator = torch.Generator().manual_seed(0)
    return model, loss_fn, optimizer, images, labels, generator


# CPU time of this process (all its threads) by default: on a machine shared with other jobs it
# moves far less than wall time, which counts the time other processes hold the cores.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def _one_step(model, loss_fn, optimizer, images, labels, generator) -> float:
    start = clock()
    scores = model(images)
    loss = loss_fn(scores, labels, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return clock() - start


def bench_step(arch: str, batch_size: int, image_size: int, repeats: int) -> None:
    print(
        f"# training step: {arch} at {image_size}x{image_size}, batch {batch_size}, CPU, "
        f"{torch.get_num_threads()} threads, {clock.__name__}, median of {repeats} steps per loss"
    )
    print(f"{'classes':>8}  {'loss':<24} {'step ms':>9} {'x cross_entropy':>16}")
    for num_classes in (100, 1000):
        setups = {
            name: _step_setup(name, num_classes, arch, batch_size, image_size) for name in LOSSES
        }
        for setup in setups.values():  # warm-up: allocator, kernels
            _one_step(*setup)
        times: dict[str, list[float]] = {name: [] for name in LOSSES}
        for _ in range(repeats):
            for name, setup in setups.items():  # interleaved: noise hits every loss alike
                times[name].append(_one_step(*setup))
        base = statistics.median(times["cross_entropy"])
        for name in LOSSES:
            median = statistics.median(times[name])
            print(f"{num_classes:>8}  {name:<24} {median * 1e3:>9.1f} {median / base:>16.3f}")


def _omniglot_shards(out: str) -> str:
    from jobs.data.writer import build_shards

    summary = build_shards(
        str(OMNIGLOT_ZIP),
        out,
        seed=0,
        val_fraction=0.2,
        image_format="png",
        max_size=32,
        shard_max_samples=256,
        progress=None,
    )
    return summary.dataset_url


def bench_ddp(epochs: int) -> None:
    import ray

    from jobs.contract.run_files import read_metrics
    from jobs.contract.spec_files import parse_train_spec
    from jobs.training.run import run_training

    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as folder:
        dataset = _omniglot_shards(f"{folder}/omniglot")
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
        print(f"# DDP epoch: cifar_resnet20 on Omniglot (136 classes, 28x28, {dataset})")
        print(f"{'workers':>8} {'epoch s':>9} {'samples/s':>10} {'run wall s':>11}")
        epoch_seconds = {}
        try:
            for workers in (1, 2):
                spec = parse_train_spec(
                    {
                        "data": {
                            "train": dataset,
                            "val": dataset,
                            "num_classes": 136,
                            "image_size": 28,
                            "channels": 1,
                            "augment": {"random_resized_crop": False, "hflip": False},
                            "loader_workers": 0,
                        },
                        "model": {"arch": "cifar_resnet20"},
                        "loss": {"name": "noised_topk", "k": 5, "epsilon": 1.0},
                        "epochs": epochs,
                        "batch_size": 64 // workers,  # the same global batch
                        "scaling": {"num_workers": workers},
                    }
                )
                start = time.perf_counter()
                run_training(spec, f"ddp-{workers}", storage=f"{folder}/runs")
                wall = time.perf_counter() - start
                last = read_metrics(f"{folder}/runs/ddp-{workers}/metrics.jsonl")[-1]
                epoch_seconds[workers] = last["epoch_seconds"]
                print(
                    f"{workers:>8} {last['epoch_seconds']:>9.2f} "
                    f"{last['samples_per_second']:>10.1f} {wall:>11.1f}"
                )
        finally:
            ray.shutdown()
        print(f"2-worker epoch / 1-worker epoch: {epoch_seconds[2] / epoch_seconds[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["step", "ddp", "all"], default="all")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="DDP part: the last is timed")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="step timer")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("step", "all"):
        bench_step(args.arch, args.batch_size, args.image_size, args.repeats)
    if args.part in ("ddp", "all"):
        bench_ddp(args.epochs)


if __name__ == "__main__":
    main()
