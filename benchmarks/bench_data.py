"""Images per second of the training input pipeline, as a ratio to a plain read + decode loop.

For Omniglot and Fashion-MNIST shards (written to a temporary folder), this measures:
- the limit: one process that streams the same train shards and decodes every image with PIL
  (`Image.open(...).load()`), nothing else; the bytes are read with the standard library's
  `tarfile` (the plain loop: the decode limit) and with webdataset's `tar_file_iterator` (what
  the pipeline reads through, checked here to cost no more than the plain loop);
- the pipeline: `build_train_loader` (tar streaming, shuffle buffer, decode, random resized crop,
  flip, batch, DataLoader IPC of uint8 pixels, normalise) with 1 and 2 DataLoader workers, in
  steady state (the clock starts at the first batch, so worker start-up is not counted); and,
  with 1 worker, the loader as a GPU run builds it (pin_memory), whose uint8 batches the
  training loop normalises on the GPU (so the host does not).
Ratio per worker = pipeline / (limit x workers). In CPU time (immune to other processes'
load), the in-process pipeline is also set against the tar reading alone and against read +
decode + resize of the whole image to the training size (the least work that feeds a model).
The datasets: Omniglot's 105 px PNGs (and as JPEG) and Fashion-MNIST's 28 px PNGs, trained at
32 px greyscale, and Fashion-MNIST upscaled to 224 px RGB JPEG, trained at 224 px (the size of
ImageNet-like training, where the decode dominates).

The machine is shared and noisy: the limit and the pipeline are measured in alternation,
`--rounds` times, and each ratio is printed as the median over rounds with its range. Then the
same through s3:// from a local moto server process.
Run: .venv/bin/python benchmarks/bench_data.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

# The same upscaled Fashion-MNIST as the GPU loop benchmark's (b) (this folder is on sys.path)
from bench_gpu_loop import fashion_source
from PIL import Image
from webdataset.tariterators import tar_file_iterator

from jobs.contract.data import DataSpec
from jobs.contract.dataset_info import read_dataset_info
from jobs.contract.urls import open_url
from jobs.data.pipeline import build_train_loader
from jobs.data.writer import build_shards

# The machine's shared data: $TOPK_SHARED_DIR, else ../shared next to the repository.
SHARED_DATA = (
    Path(os.environ.get("TOPK_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
    / "data"
)
OMNIGLOT_ZIP = str(SHARED_DATA / "omniglot" / "images_background_small1.zip")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def tarfile_images(url: str):
    """The image bytes of a shard, read with the standard library's tarfile (stream mode)."""
    with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if member.name.endswith(IMAGE_EXTENSIONS):
                yield archive.extractfile(member).read()


def webdataset_images(url: str):
    """The image bytes of a shard, read with webdataset's tar iterator (as the pipeline does)."""
    with open_url(url) as stream:
        for member in tar_file_iterator(stream, skip_meta=None):
            if member["fname"].endswith(IMAGE_EXTENSIONS):
                yield member["data"]


def plain_decode_rate(shard_urls: list[str], read_images, min_seconds: float) -> float:
    """Images/s of read + PIL decode over the shards (repeated until min_seconds passed)."""
    images, started = 0, time.perf_counter()
    while True:
        for url in shard_urls:
            for data in read_images(url):
                Image.open(io.BytesIO(data)).load()
                images += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return images / elapsed


def plain_decode_cpu(shard_urls: list[str], read_images, resize: Shape | None = None) -> float:
    """CPU microseconds per image of read + PIL decode (immune to other processes' load); with
    `resize`, also the conversion to the training channels and the antialiased resize of the
    whole image to the training size: the least work any pipeline that feeds a model must do."""
    images, started = 0, time.process_time()
    for url in shard_urls:
        for data in read_images(url):
            image = Image.open(io.BytesIO(data))
            if resize is None:
                image.load()
            else:
                mode = "L" if resize.channels == 1 else "RGB"
                image.convert(mode).resize((resize.size, resize.size), Image.Resampling.BILINEAR)
            images += 1
    return (time.process_time() - started) / images * 1e6


def read_only_cpu(shard_urls: list[str]) -> float:
    """CPU microseconds per image of reading the shards with tarfile, decoding nothing."""
    images, started = 0, time.process_time()
    for url in shard_urls:
        images += sum(1 for _ in tarfile_images(url))
    return (time.process_time() - started) / images * 1e6


class Shape(NamedTuple):
    """What a dataset trains at: image size and channels."""

    size: int
    channels: int


def _spec(dataset: str, shape: Shape, *, num_classes: int, workers: int, samples: int) -> DataSpec:
    return DataSpec(
        train=dataset,
        num_classes=num_classes,
        image_size=shape.size,
        channels=shape.channels,
        loader_workers=workers,
        shuffle_buffer=1000,
        samples_per_epoch=samples,
    )


def pipeline_cpu(dataset: str, shape: Shape, *, num_classes: int, samples: int) -> float:
    """CPU microseconds per image of the whole pipeline run in this process (0 workers)."""
    spec = _spec(dataset, shape, num_classes=num_classes, workers=0, samples=samples)
    loader = build_train_loader(spec, batch_size=128, rank=0, world_size=1, epoch=0, seed=0)
    images, started = 0, time.process_time()
    for batch_images, _ in loader:
        images += batch_images.shape[0]
    return (time.process_time() - started) / images * 1e6


def pipeline_rate(
    dataset: str,
    shape: Shape,
    *,
    num_classes: int,
    workers: int,
    samples: int,
    gpu_run: bool = False,
) -> float:
    """Steady-state images/s of one rank's training loader (decode + augment + batch); with
    `gpu_run`, the loader of a GPU run (pin_memory), which hands out uint8 pixels that the
    training loop normalises on the GPU (not pinned here: this machine has no accelerator)."""
    spec = _spec(dataset, shape, num_classes=num_classes, workers=workers, samples=samples)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        loader = build_train_loader(
            spec, batch_size=128, rank=0, world_size=1, epoch=0, seed=0, pin_memory=gpu_run
        )
        batches = iter(loader)
        first_images, _ = next(batches)
        started, images = time.perf_counter(), 0
        for _, labels in batches:
            images += labels.shape[0]
    del first_images
    return images / (time.perf_counter() - started)


def _median(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def measure(
    name: str,
    dataset: str,
    shape: Shape,
    num_classes: int,
    samples: int,
    min_seconds: float,
    rounds: int,
) -> None:
    """Each round measures the limits and the pipeline one after the other; ratios are taken
    within a round, then summarised over rounds."""
    urls = read_dataset_info(dataset).shard_urls("train")
    local = not dataset.startswith("s3://")
    ratios: dict[str, list[float]] = {}
    last: dict[str, float] = {}

    def keep(label: str, value: float) -> None:
        ratios.setdefault(label, []).append(value)

    for _ in range(rounds):
        last["limit"] = limit = plain_decode_rate(urls, tarfile_images, min_seconds)
        last["wds_limit"] = wds_limit = plain_decode_rate(urls, webdataset_images, min_seconds)
        keep("webdataset+PIL / tarfile+PIL (wall clock)", wds_limit / limit)
        if local:
            plain_cpu = plain_decode_cpu(urls, tarfile_images)
            ours_cpu = pipeline_cpu(dataset, shape, num_classes=num_classes, samples=samples)
            resized_cpu = plain_decode_cpu(urls, tarfile_images, resize=shape)
            read_cpu = read_only_cpu(urls)
            last.update(plain_cpu=plain_cpu, ours_cpu=ours_cpu, resized=resized_cpu, read=read_cpu)
            keep("in-process pipeline, CPU time: of tarfile+PIL", plain_cpu / ours_cpu)
            keep(
                f"  of tarfile+PIL+resize to {shape.size} px (the least work)",
                resized_cpu / ours_cpu,
            )
        for workers in (1, 2):
            rate = pipeline_rate(
                dataset, shape, num_classes=num_classes, workers=workers, samples=samples
            )
            last[f"rate{workers}"] = rate
            per = f"pipeline, {workers} worker{'s' if workers > 1 else ''}, per worker: of"
            keep(f"{per} tarfile+PIL", rate / limit / workers)
            keep(f"{per} webdataset+PIL", rate / wds_limit / workers)
        gpu_rate = pipeline_rate(
            dataset, shape, num_classes=num_classes, workers=1, samples=samples, gpu_run=True
        )
        last["gpu_rate"] = gpu_rate
        keep("a GPU run's loader (uint8 out), 1 worker: of tarfile+PIL", gpu_rate / limit)
    print(f"{name}  ({rounds} round(s); the last round's rates for orientation)", flush=True)
    print(
        f"    tarfile+PIL {last['limit']:.0f} img/s, webdataset+PIL {last['wds_limit']:.0f} img/s, "
        f"pipeline 1 worker {last['rate1']:.0f} img/s, 2 workers {last['rate2']:.0f} img/s, "
        f"a GPU run's 1 worker {last['gpu_rate']:.0f} img/s"
    )
    if local:
        print(
            f"    CPU us/image: tarfile+PIL {last['plain_cpu']:.0f} (tar reading alone "
            f"{last['read']:.0f}), tarfile+PIL+resize {last['resized']:.0f}, pipeline in-process "
            f"{last['ours_cpu']:.0f}"
        )
    for label, values in ratios.items():
        print(f"    {label:<58} {_median(values)}", flush=True)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data, shorter runs")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternations of limit and pipeline (3, or 2 with --quick)",
    )
    args = parser.parse_args()
    fashion_per_class = 1000 if args.quick else 3000
    samples = 8000 if args.quick else 30000
    min_seconds = 2.0 if args.quick else 5.0
    rounds = args.rounds or (2 if args.quick else 3)
    large_count, large_samples = (512, 768) if args.quick else (2048, 3072)

    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        small, large = Shape(32, 1), Shape(224, 3)
        datasets: dict[str, tuple[str, int, Shape, int]] = {}
        if os.path.exists(OMNIGLOT_ZIP):
            for image_format in ("png", "jpeg"):
                # JPEG: the pipeline decodes at a reduced DCT scale (PIL draft) when it may
                path = os.path.join(folder, f"omniglot-{image_format}")
                build_shards(
                    OMNIGLOT_ZIP,
                    path,
                    progress=None,
                    shard_max_samples=500,
                    image_format=image_format,
                )
                datasets[f"omniglot (105px {image_format})"] = (path, 136, small, samples)
        if os.path.exists(FASHION_MNIST_DIR):
            path = os.path.join(folder, "fashion")
            build_shards(
                FASHION_MNIST_DIR,
                path,
                max_per_class=fashion_per_class,
                progress=None,
                shard_max_samples=2000,
            )
            datasets["fashion-mnist (28px png)"] = (path, 10, small, samples)
            path = os.path.join(folder, "fashion-224")
            build_shards(
                fashion_source(large_count, large.size),
                path,
                val_fraction=0.0,
                image_format="jpeg",
                progress=None,
                shard_max_samples=256,
            )
            datasets["fashion-mnist (224px rgb jpeg)"] = (path, 10, large, large_samples)
        print(f"CPUs: {os.cpu_count()}, batch 128, steady state", flush=True)
        for name, (path, classes, shape, count) in datasets.items():
            print(f"-- trained at {shape.size} px, {shape.channels} channel(s)", flush=True)
            measure(name, path, shape, classes, count, min_seconds, rounds)

        server, endpoint = start_moto()
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        try:
            import s3fs

            s3 = s3fs.S3FileSystem()
            s3.mkdir("bench")
            for name, (path, classes, shape, count) in datasets.items():
                remote = f"s3://bench/{os.path.basename(path)}"
                s3.put(path + "/", remote[len("s3://") :] + "/", recursive=True)
                measure(f"s3: {name}", remote, shape, classes, count, min_seconds, 1)
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
