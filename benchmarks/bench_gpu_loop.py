"""Samples per second of the project's training loop against its limit, on one GPU.

The limit is the same model, batch, loss, optimiser and autocast stepping on one synthetic batch
that is already on the device: the most the loop could reach if the data cost nothing. The loop
is `jobs.training.loop.train_one_epoch` fed by the project's data pipeline
(`jobs.data.pipeline.build_train_loader`, one loader for the run as `topk train` builds it:
persistent workers, pinned batches), in steady state (a warm-up epoch first, so the workers'
start and cuDNN's algorithm choice are not counted).

  (a) ResNet-18 at 32 px, Fashion-MNIST shards (Debian's dataset-fashion-mnist), batch 512;
  (b) ResNet-50 at 224 px, JPEG shards of Fashion-MNIST upscaled to 224 px (RGB), batch 128,
      training augmentation (random resized crop, flip), the images decoded
        - by the loader's CPU workers (data.decode: cpu), and
        - on the GPU in batches with torchvision.io.decode_jpeg (data.decode: device).

Each line prints loop samples/s, limit samples/s and their ratio (target: at least 0.8 in (a)
and in (b) with GPU decoding); (b) also prints the GPU-decoding loop over the CPU-decoding one.
On a machine without a GPU (or with --device cpu) it runs a tiny smoke of the same code (a few
steps, small batches) to check the script, not to measure. At most ~5 minutes on one GPU.
Run: python benchmarks/bench_gpu_loop.py [--quick] [--device cuda|cpu] [--workers N]
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
    """Fashion-MNIST's training images (the first `limit`); upscaled to `upscale` px and made
    RGB (grey in three channels) if `upscale` is set."""
    source = open_source(FASHION_MNIST_DIR)
    keep = np.arange(len(source.labels) if limit is None else min(limit, len(source.labels)))
    names = [source.names[i] for i in keep]
    if upscale is None:

        def load(i: int):
            return source.load(int(keep[i]))

        return ImageSource("fashion", source.class_names, source.labels[keep], names, load)
    from PIL import Image

    def load_upscaled(i: int) -> np.ndarray:
        image = Image.fromarray(np.asarray(source.load(int(keep[i]))))
        resized = image.resize((upscale, upscale), Image.Resampling.BILINEAR).convert("RGB")
        return np.asarray(resized)

    labels = source.labels[keep]
    return ImageSource(f"fashion-{upscale}", source.class_names, labels, names, load_upscaled)


def loop_rate(model, data: DataSpec, batch: int, device: torch.device, epochs: int = 2) -> float:
    """Samples/s of the last of `epochs` epochs of the real loop (the first warms up), with one
    loader for the run, as the training worker builds it."""
    optimizer = build_optimizer(model, name="sgd", lr=0.01, weight_decay=5e-4)
    channels_last = use_channels_last(device, model)
    loader = build_train_loader(
        data, batch_size=batch, rank=0, world_size=1, epoch=1, seed=0,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    rate = 0.0
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
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


def write_shards(source: ImageSource, folder: str, image_format: str) -> str:
    build_shards(
        source, folder, val_fraction=0.0, image_format=image_format, progress=None,
        shard_max_samples=1000,
    )  # fmt: skip
    return f"{folder}/dataset.json"


def model_for(arch: str, channels: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, 10, in_channels=channels).to(device)
    if use_channels_last(device, model):
        model = model.to(memory_format=torch.channels_last)
    return model


def report(name: str, loop: float, limit: float, extra: str = "") -> None:
    print(
        f"{name:<40} loop {loop:9.1f} samples/s   limit {limit:9.1f} samples/s   "
        f"ratio {loop / limit:5.2f}{extra}",
        flush=True,
    )


def measure(name, arch, dataset, *, size, channels, batch, images, args, device, augment,
            decodes=("cpu",)) -> None:  # fmt: skip
    """One line per decode choice: the loop on `dataset` against the limit of its model."""
    rates = {}
    for decode in decodes:
        data = DataSpec.model_validate(
            {
                "train": dataset,
                "num_classes": 10,
                "image_size": size,
                "channels": channels,
                "loader_workers": args.workers,
                "augment": augment,
                "decode": decode,
            }
        )
        rates[decode] = loop_rate(model_for(arch, channels, device), data, batch, device)
    steps = max(3 if device.type == "cpu" else 10, images // batch)
    model = model_for(arch, channels, device)
    limit = limit_rate(model, (channels, size, size), 10, batch, device, steps)
    for decode, rate in rates.items():
        label = f"{name}, {decode} decode" if len(decodes) > 1 else name
        extra = ""
        if decode == "device" and "cpu" in rates:
            extra = f"   {rate / rates['cpu']:5.2f}x the cpu-decode loop"
        report(label, rate, limit, extra)


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
    if device.type == "cpu":  # a smoke of the same code: a few steps of small batches
        (small, batch_a), (large, batch_b) = (128, 32), (16, 4)
    elif args.quick:
        (small, batch_a), (large, batch_b) = (4096, 512), (1024, 128)
    else:
        (small, batch_a), (large, batch_b) = (32_768, 512), (8192, 128)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu: a smoke run"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.workers} loader workers",
          flush=True)  # fmt: skip
    fixed = {"random_resized_crop": False, "hflip": False}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-loop-") as folder:
        fashion = write_shards(fashion_source(small, None), f"{folder}/a", "keep")
        measure("(a) resnet18 32px fashion-mnist", "resnet18", fashion, size=32, channels=1,
                batch=batch_a, images=small, args=args, device=device, augment=fixed)  # fmt: skip
        jpeg = write_shards(fashion_source(large, 224), f"{folder}/b", "jpeg")
        measure("(b) resnet50 224px jpeg", "resnet50", jpeg, size=224, channels=3,
                batch=batch_b, images=large, args=args, device=device, augment={},
                decodes=("cpu", "device"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
