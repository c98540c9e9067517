"""Samples per second of the project's training loop against its limit, on one GPU.

The limit is the same model, batch, loss, optimiser and autocast stepping on one synthetic batch
that is already on the device: the most the loop could reach if the data cost nothing. The loop
is `jobs.training.loop.train_one_epoch` fed by the project's data pipeline
(`jobs.data.pipeline.build_train_loader`, the loader of `topk train`), in steady state (a warm-up
epoch first, so the workers and cuDNN's algorithm choice are not counted).

  (a) ResNet-18 at 32 px, Fashion-MNIST shards (Debian's dataset-fashion-mnist), batch 512;
  (b) ResNet-50 at 224 px, JPEG shards of Fashion-MNIST upscaled to 224 px, batch 128, the
      images decoded by the loader's CPU workers.

Each line prints loop samples/s, limit samples/s and their ratio (target: at least 0.8).
Run: python benchmarks/bench_gpu_loop.py [--quick] [--device cuda|cpu] [--workers N]
(--device cpu runs the same code on the CPU in seconds, to check the script, not to measure.)
Needs torch, torchvision, numpy, Pillow and the project; not Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.contract.data import DataSpec  # noqa: E402
from jobs.data.pipeline import build_train_loader  # noqa: E402
from jobs.data.sources import ImageSource, open_source  # noqa: E402
from jobs.data.writer import build_shards  # noqa: E402
from jobs.models import build_model  # noqa: E402
from jobs.training.loop import (  # noqa: E402
    _autocast,
    build_optimizer,
    train_one_epoch,
    use_channels_last,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class CrossEntropy(torch.nn.Module):
    def forward(self, scores, labels, generator=None):
        return F.cross_entropy(scores, labels)


def fashion_source(limit: int | None, upscale: int | None) -> ImageSource:
    """Fashion-MNIST's training images (the first `limit`), upscaled to `upscale` px if set."""
    source = open_source(FASHION_MNIST_DIR)
    keep = np.arange(len(source.labels) if limit is None else min(limit, len(source.labels)))
    if upscale is None:
        return ImageSource(
            "fashion", source.class_names, source.labels[keep], [source.names[i] for i in keep],
            lambda i: source.load(int(keep[i])),
        )  # fmt: skip
    from PIL import Image

    def load(i: int):
        image = source.load(int(keep[i]))
        if isinstance(image, tuple):  # (encoded bytes, extension)
            import io

            image = np.asarray(Image.open(io.BytesIO(image[0])).convert("L"))
        resized = Image.fromarray(np.asarray(image)).resize((upscale, upscale), Image.BILINEAR)
        return np.asarray(resized)

    return ImageSource(
        "fashion-224", source.class_names, source.labels[keep], [source.names[i] for i in keep],
        load,
    )  # fmt: skip


def loop_rate(model, data: DataSpec, batch: int, device: torch.device, epochs: int = 2) -> float:
    """Samples/s of the last of `epochs` epochs of the real loop (the first warms up)."""
    optimizer = build_optimizer(model, name="sgd", lr=0.01, weight_decay=5e-4)
    channels_last = use_channels_last(device, model)
    rate = 0.0
    for epoch in range(1, epochs + 1):
        loader = build_train_loader(
            data, batch_size=batch, rank=0, world_size=1, epoch=epoch, seed=0
        )
        stats = train_one_epoch(
            model, loader, CrossEntropy(), optimizer, device=device, amp=True,
            channels_last=channels_last,
        )  # fmt: skip
        rate = stats.samples_per_second
    return rate


def limit_rate(model, shape, classes: int, batch: int, device: torch.device, steps: int) -> float:
    """Samples/s of the same step on one batch already on the device."""
    optimizer = build_optimizer(model, name="sgd", lr=0.01, weight_decay=5e-4)
    channels_last = use_channels_last(device, model)
    images = torch.randn(batch, *shape, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    loss_fn = CrossEntropy()

    def step():
        with _autocast(device, True):
            scores = model(images)
        loss = loss_fn(scores.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def measure(name, arch, source, size, batch, args, device, folder, image_format) -> None:
    out = os.path.join(folder, name)
    build_shards(
        source, out, val_fraction=0.0, image_format=image_format, progress=None,
        shard_max_samples=2000,
    )  # fmt: skip
    data = DataSpec.model_validate(
        {
            "train": f"{out}/dataset.json",
            "num_classes": 10,
            "image_size": size,
            "channels": 1,
            "loader_workers": args.workers,
            "augment": {"random_resized_crop": False, "hflip": False},
        }
    )
    torch.manual_seed(0)
    model = build_model(arch, 10, in_channels=1).to(device)
    if use_channels_last(device, model):
        model = model.to(memory_format=torch.channels_last)
    loop = loop_rate(model, data, batch, device)
    steps = max(10, len(source.labels) // batch)
    limit = limit_rate(model, (1, size, size), 10, batch, device, steps)
    print(
        f"{name:<34} loop {loop:9.0f} samples/s   limit {limit:9.0f} samples/s   "
        f"ratio {loop / limit:5.2f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    device = torch.device(args.device)
    if not Path(FASHION_MNIST_DIR).exists():
        print(f"needs {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    small, large = (2048, 256) if args.quick else (32_768, 4096)
    batch_a, batch_b = (64, 16) if device.type == "cpu" else (512, 128)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"
          f", torch {torch.__version__}, {args.workers} loader workers", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-gpu-loop-") as folder:
        measure("(a) resnet18 32px fashion-mnist", "resnet18", fashion_source(small, None), 32,
                batch_a, args, device, folder, "keep")  # fmt: skip
        measure("(b) resnet50 224px jpeg, cpu decode", "resnet50", fashion_source(large, 224), 224,
                batch_b, args, device, folder, "jpeg")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
