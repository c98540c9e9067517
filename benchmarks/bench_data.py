"""Images per second of the training input pipeline, as a ratio to a plain read + decode loop.

For Omniglot and Fashion-MNIST shards (written to a temporary folder), this measures:
- the limit: one process that streams the same train shards and decodes every image with PIL
  (`Image.open(...).load()`), nothing else; the bytes are read with the standard library's
  `tarfile` (the plain loop: the decode limit) and with webdataset's `tar_file_iterator` (what
  the pipeline reads through, checked here to cost no more than the plain loop);
- the pipeline: `build_train_loader` (tar streaming, shuffle buffer, decode, random resized crop,
  flip, normalise, batch, DataLoader IPC) with 1 and 2 DataLoader workers, in steady state (the
  clock starts at the first batch, so worker start-up is not counted).
Ratio per worker = pipeline / (limit x workers). In CPU time (immune to other processes'
load), the in-process pipeline is also set against the tar reading alone and against read +
decode + resize of the whole image to the training size (the least work that feeds a model).
Then the same through s3://
from a local moto server process. Run: .venv/bin/python benchmarks/bench_data.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

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
IMAGE_SIZE = 32


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


def plain_decode_cpu(shard_urls: list[str], read_images, resize_to: int | None = None) -> float:
    """CPU microseconds per image of read + PIL decode (immune to other processes' load); with
    `resize_to`, also the greyscale conversion and the antialiased resize of the whole image to
    the training size: the least work any pipeline that feeds a model must do."""
    images, started = 0, time.process_time()
    for url in shard_urls:
        for data in read_images(url):
            image = Image.open(io.BytesIO(data))
            if resize_to is None:
                image.load()
            else:
                image.convert("L").resize((resize_to, resize_to), Image.Resampling.BILINEAR)
            images += 1
    return (time.process_time() - started) / images * 1e6


def read_only_cpu(shard_urls: list[str]) -> float:
    """CPU microseconds per image of reading the shards with tarfile, decoding nothing."""
    images, started = 0, time.process_time()
    for url in shard_urls:
        images += sum(1 for _ in tarfile_images(url))
    return (time.process_time() - started) / images * 1e6


def pipeline_cpu(dataset: str, *, num_classes: int, samples: int) -> float:
    """CPU microseconds per image of the whole pipeline run in this process (0 workers)."""
    spec = _spec(dataset, num_classes=num_classes, workers=0, samples=samples)
    loader = build_train_loader(spec, batch_size=128, rank=0, world_size=1, epoch=0, seed=0)
    images, started = 0, time.process_time()
    for batch_images, _ in loader:
        images += batch_images.shape[0]
    return (time.process_time() - started) / images * 1e6


def _spec(dataset: str, *, num_classes: int, workers: int, samples: int) -> DataSpec:
    return DataSpec(
        train=dataset,
        num_classes=num_classes,
        image_size=IMAGE_SIZE,
        channels=1,
        loader_workers=workers,
        shuffle_buffer=1000,
        samples_per_epoch=samples,
    )


def pipeline_rate(dataset: str, *, num_classes: int, workers: int, samples: int) -> float:
    """Steady-state images/s of one rank's training loader (decode + augment + batch)."""
    spec = _spec(dataset, num_classes=num_classes, workers=workers, samples=samples)
    loader = build_train_loader(spec, batch_size=128, rank=0, world_size=1, epoch=0, seed=0)
    batches = iter(loader)
    first_images, _ = next(batches)
    started, images = time.perf_counter(), 0
    for batch_images, _ in batches:
        images += batch_images.shape[0]
    del first_images
    return images / (time.perf_counter() - started)


def measure(name: str, dataset: str, num_classes: int, samples: int, min_seconds: float) -> None:
    urls = read_dataset_info(dataset).shard_urls("train")
    limit = plain_decode_rate(urls, tarfile_images, min_seconds)
    wds_limit = plain_decode_rate(urls, webdataset_images, min_seconds)
    print(f"{name:<28} plain tarfile + PIL decode        {limit:>7.0f} img/s", flush=True)
    print(f"{name:<28} plain webdataset + PIL decode     {wds_limit:>7.0f} img/s", flush=True)
    if not dataset.startswith("s3://"):
        plain_cpu = plain_decode_cpu(urls, tarfile_images)
        wds_cpu = plain_decode_cpu(urls, webdataset_images)
        resized_cpu = plain_decode_cpu(urls, tarfile_images, resize_to=IMAGE_SIZE)
        read_cpu = read_only_cpu(urls)
        ours_cpu = pipeline_cpu(dataset, num_classes=num_classes, samples=samples)
        print(
            f"{name:<28} CPU us/image: tarfile+PIL {plain_cpu:.0f}, webdataset+PIL "
            f"{wds_cpu:.0f}, pipeline in-process {ours_cpu:.0f} -> ratios "
            f"{plain_cpu / ours_cpu:.2f} and {wds_cpu / ours_cpu:.2f}",
            flush=True,
        )
        print(
            f"{name:<28} of which: tar reading alone {read_cpu:.0f}; tarfile+PIL+resize to "
            f"{IMAGE_SIZE} px {resized_cpu:.0f} -> ratio {resized_cpu / ours_cpu:.2f}",
            flush=True,
        )
    for workers in (1, 2):
        rate = pipeline_rate(dataset, num_classes=num_classes, workers=workers, samples=samples)
        print(
            f"{name:<28} pipeline, {workers} worker{'s' if workers > 1 else ' '}"
            f"{rate:>22.0f} img/s  per worker: {rate / limit / workers:.2f} of tarfile+PIL, "
            f"{rate / wds_limit / workers:.2f} of webdataset+PIL",
            flush=True,
        )


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
    args = parser.parse_args()
    fashion_per_class = 1000 if args.quick else 3000
    samples = 8000 if args.quick else 30000
    min_seconds = 2.0 if args.quick else 5.0

    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        datasets = {}
        if os.path.exists(OMNIGLOT_ZIP):
            datasets["omniglot (105px png)"] = (os.path.join(folder, "omniglot"), 136)
            build_shards(
                OMNIGLOT_ZIP,
                datasets["omniglot (105px png)"][0],
                progress=None,
                shard_max_samples=500,
            )
            # JPEG: the pipeline decodes at a reduced DCT scale (PIL draft) when it may
            datasets["omniglot (105px jpeg)"] = (os.path.join(folder, "omniglot-jpeg"), 136)
            build_shards(
                OMNIGLOT_ZIP,
                datasets["omniglot (105px jpeg)"][0],
                progress=None,
                shard_max_samples=500,
                image_format="jpeg",
            )
        if os.path.exists(FASHION_MNIST_DIR):
            datasets["fashion-mnist (28px png)"] = (os.path.join(folder, "fashion"), 10)
            build_shards(
                FASHION_MNIST_DIR,
                datasets["fashion-mnist (28px png)"][0],
                max_per_class=fashion_per_class,
                progress=None,
                shard_max_samples=2000,
            )
        print(
            f"CPUs: {os.cpu_count()}, image_size {IMAGE_SIZE}, batch 128, steady state", flush=True
        )
        for name, (path, classes) in datasets.items():
            measure(name, path, classes, samples, min_seconds)

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
            for name, (path, classes) in datasets.items():
                remote = f"s3://bench/{os.path.basename(path)}"
                s3.put(path + "/", remote[len("s3://") :] + "/", recursive=True)
                measure(f"s3: {name}", remote, classes, samples, min_seconds)
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
