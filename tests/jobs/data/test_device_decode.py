"""data.decode "device": the loader workers send JPEG bytes and each image's view, and the batch
is decoded where the loop places it (`torchvision.io.decode_jpeg` on a list; here on the CPU,
the same code as on a GPU). Real JPEG shards written by the shard writer from Fashion-MNIST,
upscaled to several sizes and tinted to colour; each device-decoded batch is compared with the
CPU-decoded batch of the same spec (PIL), sample by sample."""

from __future__ import annotations

import io
import pickle
import random
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from reference_data import require_fashion_mnist, tar_bytes
from torch.utils.data._utils.pin_memory import pin_memory

from jobs.contract.data import AugmentSpec, DataSpec
from jobs.data.batching import (
    SHARED_MEMORY_BYTES,
    JpegBatcher,
    PixelBatch,
    PixelBatcher,
    WorkerArray,
    normalisation,
    normalise_pixels,
    received,
)
from jobs.data.device_decode import JpegBatch
from jobs.data.pipeline import DataPipelineError, build_eval_loader, build_train_loader
from jobs.data.shard_format import RawSample
from jobs.data.sources import ImageSource, idx_source
from jobs.data.writer import build_shards
from jobs.training.loop import DevicePrefetcher

PER_CLASS = 12
# (width, height) by sample: square, landscape and portrait, so crops differ in size
SIZES = [(96, 96), (120, 84), (84, 112)]
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def tinted_fashion(per_class: int) -> ImageSource:
    """The first `per_class` Fashion-MNIST images of each class, upscaled to SIZES in turn and
    tinted by class, as RGB arrays."""
    source = idx_source(str(require_fashion_mnist()))
    keep = np.concatenate([np.flatnonzero(source.labels == c)[:per_class] for c in range(10)])

    def load(i: int) -> np.ndarray:
        grey = Image.fromarray(source.load(int(keep[i]))).resize(
            SIZES[i % len(SIZES)], Image.Resampling.BICUBIC
        )
        tint = np.array([1.0, 0.4 + 0.06 * source.labels[keep[i]], 0.7])
        return (np.asarray(grey, np.float32)[..., None] * tint).astype(np.uint8)

    return ImageSource(
        "fashion-tinted", source.class_names, source.labels[keep], [str(i) for i in keep], load
    )


@pytest.fixture(scope="session")
def jpeg_dataset(tmp_path_factory) -> str:
    """120 RGB JPEGs (quality 90) of three sizes, half train, half val, shards of 25."""
    out = tmp_path_factory.mktemp("fashion-jpeg")
    summary = build_shards(
        tinted_fashion(PER_CLASS),
        str(out),
        seed=0,
        val_fraction=0.5,
        image_format="jpeg",
        shard_max_samples=25,
        progress=None,
    )
    return summary.dataset_url


def jpeg_spec(dataset: str, **overrides) -> DataSpec:
    fields = {
        "train": dataset,
        "val": dataset,
        "num_classes": 10,
        "image_size": 64,  # no reduced-scale JPEG decode on the CPU path below 2 x 64 px
        "channels": 3,
        "augment": {"random_resized_crop": False, "hflip": False, "mean": MEAN, "std": STD},
        "loader_workers": 0,
        "shuffle_buffer": 16,
    }
    return DataSpec(**{**fields, **overrides})


def pixel_units(images: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """Normalised images back in 0..255 pixel units."""
    channels = images.shape[1]
    mean = torch.tensor(spec.augment.mean).expand(channels).view(1, -1, 1, 1)
    std = torch.tensor(spec.augment.std).expand(channels).view(1, -1, 1, 1)
    return (images * std + mean) * 255


def assert_batches_match(cpu_batches, device_batches, spec: DataSpec) -> None:
    """Same samples in the same order; pixels within the resampling's rounding. RGB is resized
    by the same filter on both paths (torch's, on the crop); greyscale by PIL on the CPU path,
    whose filter also reads the pixels just outside the crop: its edges differ more."""
    assert len(cpu_batches) == len(device_batches) > 0
    for (cpu_images, cpu_labels), (device_images, device_labels) in zip(
        cpu_batches, device_batches, strict=True
    ):
        assert torch.equal(cpu_labels, device_labels)
        assert device_images.shape == cpu_images.shape and device_images.dtype == torch.float32
        difference = (pixel_units(device_images, spec) - pixel_units(cpu_images, spec)).abs()
        assert difference[..., 2:-2, 2:-2].max() <= 2.0, difference[..., 2:-2, 2:-2].max()
        edges = 2.0 if spec.channels == 3 else 16.0
        assert difference.max() <= edges, difference.max()
        assert difference.mean() <= 0.25, difference.mean()


def placed(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(DevicePrefetcher(loader, "cpu"))


def concatenated(batches) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([images for images, _ in batches]), torch.cat(
        [labels for _, labels in batches]
    )


def test_decode_is_a_spec_choice():
    assert DataSpec(train="s.tar", num_classes=2).decode == "cpu"
    with pytest.raises(ValidationError, match="'cpu' or 'device'"):
        DataSpec(train="s.tar", num_classes=2, decode="gpu")


@pytest.mark.parametrize("channels", [3, 1])
def test_device_decoded_eval_batches_match_cpu_decoded(jpeg_dataset, channels):
    normalise = {"mean": MEAN, "std": STD} if channels == 3 else {"mean": [0.5], "std": [0.2]}
    augment = {"random_resized_crop": False, "hflip": False, **normalise}
    spec = jpeg_spec(jpeg_dataset, channels=channels, augment=augment)
    cpu = build_eval_loader(spec, batch_size=16, rank=0, world_size=1)
    device_spec = spec.model_copy(update={"decode": "device"})
    device = build_eval_loader(device_spec, batch_size=16, rank=0, world_size=1)
    batches = list(device)
    assert all(isinstance(images, JpegBatch) for images, _ in batches)  # decoded by the loop
    assert_batches_match(placed(cpu), placed(device), spec)
    assert device.stats.samples == cpu.stats.samples == 60
    assert device.stats.skipped_total == 0


def test_device_decoded_train_batches_match_cpu_decoded(jpeg_dataset):
    """Random resized crops and flips: the worker picks each view with the same draws as the
    CPU path, so the same seed gives the same crops, flips and order."""
    spec = jpeg_spec(
        jpeg_dataset,
        augment={"random_resized_crop": True, "hflip": True, "mean": MEAN, "std": STD},
        samples_per_epoch=96,
    )
    device_spec = spec.model_copy(update={"decode": "device"})
    for epoch in (1, 2):
        cpu, device = (
            build_train_loader(s, batch_size=16, rank=0, world_size=1, epoch=epoch, seed=5)
            for s in (spec, device_spec)
        )
        assert_batches_match(placed(cpu), placed(device), spec)
        assert len(device) == 6


def test_workers_send_device_batches(jpeg_dataset):
    """Two DataLoader workers, two ranks: every val sample once, as with CPU decoding."""
    spec = jpeg_spec(jpeg_dataset, decode="device", loader_workers=2)
    labels = []
    for rank in range(2):
        loader = build_eval_loader(spec, batch_size=8, rank=rank, world_size=2)
        labels += [label for _, batch_labels in placed(loader) for label in batch_labels.tolist()]
    cpu = build_eval_loader(jpeg_spec(jpeg_dataset), batch_size=8, rank=0, world_size=1)
    assert sorted(labels) == sorted(label for _, b in placed(cpu) for label in b.tolist())


def test_png_shards_are_a_spec_error(id_dataset):
    """dataset.json says the shards hold PNGs: refused when the loader is built."""
    spec = DataSpec(train=str(id_dataset), val=str(id_dataset), num_classes=5, decode="device")
    with pytest.raises(ValueError, match=r"data.decode: 'device' decodes JPEG images only.*png"):
        build_eval_loader(spec, batch_size=4, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"data.decode: .*data.train hold png images"):
        build_train_loader(spec, batch_size=4, rank=0, world_size=1, epoch=1, seed=0)


def test_png_in_listed_shards_fails_naming_the_field_and_shard(id_dataset):
    """No dataset.json to tell: the first PNG sample stops the pass, naming data.decode."""
    shard = sorted(id_dataset.glob("val-*.tar"))[0]
    spec = DataSpec(train=[str(shard)], val=[str(shard)], num_classes=5, decode="device")
    loader = build_eval_loader(spec, batch_size=4, rank=0, world_size=1)
    with pytest.raises(DataPipelineError, match=rf"data.decode: .*data.val shard {shard} .*\.png"):
        list(loader)


def jpeg_bytes(seed: int) -> bytes:
    """A 48 x 40 colour JPEG: smooth gradients that differ by seed, plus some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:40, 0:48]
    slopes = rng.uniform(-3, 3, (2, 3))
    pixels = (
        128 + y[..., None] * slopes[0] + x[..., None] * slopes[1] + rng.normal(0, 4, (40, 48, 3))
    )
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def without_quantisation_tables(data: bytes) -> bytes:
    """A JPEG whose header reads fine but which no decoder can decode (no DQT segment)."""
    kept, i = [data[:2]], 2
    while data[i + 1] != 0xDA:  # up to the start of scan
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if data[i + 1] != 0xDB:
            kept.append(data[i:end])
        i = end
    return b"".join(kept) + data[i:]


def test_bad_jpegs_are_skipped_and_counted(tmp_path):
    """A JPEG cut short is caught by the worker's header check, one that only fails to decode
    is dropped from its batch on the device; both count as bad_image, as on the CPU path."""
    members = []
    for i in range(10):
        members += [(f"s{i:02d}.jpg", jpeg_bytes(i)), (f"s{i:02d}.cls", b"%d" % (i % 5))]
    cut = jpeg_bytes(100)
    members[4:4] = [("cut.jpg", cut[: len(cut) // 2]), ("cut.cls", b"1")]
    members[12:12] = [
        ("nodqt.jpg", without_quantisation_tables(jpeg_bytes(101))),
        ("nodqt.cls", b"2"),
    ]
    shard = tmp_path / "shard.tar"
    shard.write_bytes(tar_bytes(members))
    fields = {"train": [str(shard)], "val": [str(shard)], "num_classes": 5, "image_size": 32}
    cpu_spec = DataSpec(**fields, max_bad_fraction=0.5, loader_workers=0)
    cpu = build_eval_loader(cpu_spec, batch_size=4, rank=0, world_size=1)
    spec = cpu_spec.model_copy(update={"decode": "device"})
    device = build_eval_loader(spec, batch_size=4, rank=0, world_size=1)
    # the batch that held the undecodable JPEG is one sample short: compare the samples
    assert_batches_match([concatenated(placed(cpu))], [concatenated(placed(device))], spec)
    for loader in (cpu, device):
        assert loader.stats.samples == 10
        assert loader.stats.skipped["bad_image"] == 2 and loader.stats.skipped_total == 2
    assert device.stats.device_failures == 1

    strict = spec.model_copy(update={"max_bad_fraction": 0.05})
    loader = build_eval_loader(strict, batch_size=4, rank=0, world_size=1)
    with pytest.raises(DataPipelineError, match="data.val: shard .*bad_image=1"):
        placed(loader)  # the cut JPEG, past 5 % of its shard


def test_undecodable_jpegs_past_the_threshold_fail_the_pass(tmp_path):
    members = []
    for i in range(10):
        data = jpeg_bytes(i) if i % 3 else without_quantisation_tables(jpeg_bytes(i))
        members += [(f"s{i:02d}.jpg", data), (f"s{i:02d}.cls", b"0")]
    shard = tmp_path / "shard.tar"
    shard.write_bytes(tar_bytes(members))
    spec = DataSpec(
        train=[str(shard)], val=[str(shard)], num_classes=5, decode="device", max_bad_fraction=0.2
    )
    loader = build_eval_loader(spec, batch_size=5, rank=0, world_size=1)
    message = r"data.val: 4 of 10 JPEG images failed to decode on the device \(first: s00: "
    with pytest.raises(DataPipelineError, match=message):
        placed(loader)
    lenient = build_eval_loader(
        spec.model_copy(update={"max_bad_fraction": 0.5}), batch_size=5, rank=0, world_size=1
    )
    assert sum(len(labels) for _, labels in placed(lenient)) == 6


def test_a_device_batch_crosses_a_pinning_loader_unpinned_but_its_labels():
    """The JPEG bytes travel as one writable array (a pinning DataLoader would rebuild bytes
    item by item), which its pin thread leaves in ordinary memory; the labels get pinned."""
    batcher = JpegBatcher(batch_size=4, train=False, augment=AugmentSpec())
    for i in range(3):
        batcher.add(RawSample(f"s{i}", i, jpeg_bytes(i), "jpg", i), random.Random(0))
    batch = batcher.emit(pin=True)
    jpeg = batch["jpeg"]
    assert isinstance(jpeg, WorkerArray) and not jpeg.pin and jpeg.data.flags.writeable
    as_pinned = pin_memory(jpeg)  # what the DataLoader's pin thread does with it
    assert isinstance(as_pinned, torch.Tensor) and not as_pinned.is_pinned()
    assert as_pinned.numpy().tobytes() == b"".join(jpeg_bytes(i) for i in range(3))
    assert batch["lengths"].tolist() == [len(jpeg_bytes(i)) for i in range(3)]
    assert batch["labels"].pin and received(batch["labels"]).tolist() == [0, 1, 2]
    assert batch["keys"] == ["s0", "s1", "s2"] and batcher.count == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_batches_match_cpu_decoded_without_a_torch_host_sync(jpeg_dataset):
    """On a GPU: nvJPEG's batches against PIL's, within its IDCT's rounding; the decode, crops,
    resizes and copies make no torch-level host sync (nvJPEG waits on its own stream only)."""
    spec = jpeg_spec(
        jpeg_dataset,
        augment={"random_resized_crop": True, "hflip": True, "mean": MEAN, "std": STD},
        samples_per_epoch=96,
    )
    cpu = build_train_loader(spec, batch_size=16, rank=0, world_size=1, epoch=1, seed=5)
    device_spec = spec.model_copy(update={"decode": "device"})
    gpu = build_train_loader(
        device_spec, batch_size=16, rank=0, world_size=1, epoch=1, seed=5, pin_memory=True
    )
    list(DevicePrefetcher(gpu, "cuda"))  # warm up: nvJPEG's decoder, kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        placed_on_gpu = list(DevicePrefetcher(gpu, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_host = [(images.cpu(), labels.cpu()) for images, labels in placed_on_gpu]
    assert len(on_host) == 6
    for (cpu_images, cpu_labels), (gpu_images, gpu_labels) in zip(
        placed(cpu), on_host, strict=True
    ):
        assert torch.equal(cpu_labels, gpu_labels)
        difference = (pixel_units(gpu_images, spec) - pixel_units(cpu_images, spec)).abs()
        assert difference[..., 2:-2, 2:-2].max() <= 6.0 and difference.mean() <= 0.75


# --- data.decode "cpu" on a GPU run: uint8 pixels cross to the loop, normalised on its device --


@pytest.mark.parametrize("channels", [1, 3])
def test_pixels_normalised_on_the_device_equal_those_normalised_on_the_host(channels):
    """PixelBatch.decode (the GPU run's path, here on the CPU) gives exactly the host's
    normalisation: the same float32 values and the same memory order."""
    rng = np.random.default_rng(channels)
    shape = (5, 7, 7) if channels == 1 else (5, 3, 7, 7)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    augment = AugmentSpec(mean=MEAN[:channels], std=STD[:channels])
    scale, shift = normalisation(augment, channels)
    labels = torch.arange(5)
    on_host = torch.from_numpy(normalise_pixels(pixels, scale, shift))
    images, got_labels = PixelBatch(
        torch.from_numpy(pixels), scale.tolist(), shift.tolist()
    ).decode("cpu", labels)
    assert images.shape == (5, channels, 7, 7) and images.dtype == torch.float32
    assert torch.equal(images, on_host) and images.stride() == on_host.stride()
    assert torch.equal(got_labels, labels)
    mean = torch.tensor(MEAN[:channels]).view(1, -1, 1, 1)
    std = torch.tensor(STD[:channels]).view(1, -1, 1, 1)
    reference = (torch.from_numpy(pixels).float().view(5, channels, 7, 7) / 255 - mean) / std
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-5)


def test_workers_send_uint8_pixels_not_float_images():
    """A batch crosses from a loader worker as uint8 pixels (a quarter of float32's bytes),
    handed over, not copied; a GPU run's are marked for the pin thread."""
    augment = AugmentSpec(random_resized_crop=False, hflip=False)
    batcher = PixelBatcher(batch_size=4, size=16, channels=3, train=True, augment=augment)
    picture = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    for i in range(3):
        batcher.add(RawSample(f"s{i}", i, encoded.getvalue(), "png", i), random.Random(0))
    cpu_run = batcher.emit(pin=False)
    assert not cpu_run["pixels"].pin and not cpu_run["labels"].pin
    pixels = received(cpu_run["pixels"])
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 16, 16)
    assert received(cpu_run["labels"]).tolist() == [0, 1, 2] and batcher.count == 0
    batcher.add(RawSample("s3", 3, encoded.getvalue(), "png", 3), random.Random(0))
    gpu_run = batcher.emit(pin=True)
    assert gpu_run["pixels"].pin and gpu_run["labels"].pin
    assert received(gpu_run["pixels"]).shape == (1, 3, 16, 16)
    # handed over, not copied: the batcher fills new arrays for the next batch
    assert not np.shares_memory(pixels.numpy(), received(gpu_run["pixels"]).numpy())
    assert (pixels == 200).all()


def test_big_arrays_cross_in_shared_memory_small_ones_through_the_pipe():
    """What a worker's pickler sends: below SHARED_MEMORY_BYTES the array's bytes, from it a
    handle to shared memory; both arrive with their values."""
    small = np.arange(SHARED_MEMORY_BYTES - 1, dtype=np.uint8)
    big = np.arange(SHARED_MEMORY_BYTES, dtype=np.uint8)
    for array, crosses_in_pipe in ((small, True), (big, False)):
        sent = ForkingPickler.dumps(WorkerArray.of(array, pin=False))
        assert (len(sent) >= array.nbytes) == crosses_in_pipe, len(sent)
        arrived = pickle.loads(sent)
        assert torch.equal(received(arrived), torch.from_numpy(array))


@pytest.mark.parametrize("batch_size", [8, 32])
def test_a_cpu_run_worker_gives_the_in_process_batches(jpeg_dataset, batch_size):
    """Batches of 8 x 3 x 112 x 112 (301 KB: the pipe) and 32 (1.2 MB: shared memory) cross
    from a worker with the values the in-process loader makes."""
    spec = jpeg_spec(
        jpeg_dataset,
        image_size=112,
        augment={"random_resized_crop": True, "hflip": True, "mean": MEAN, "std": STD},
        samples_per_epoch=64,
    )
    batches = []
    for workers in (0, 1):
        worker_spec = spec.model_copy(update={"loader_workers": workers})
        loader = build_train_loader(
            worker_spec, batch_size=batch_size, rank=0, world_size=1, epoch=0, seed=3
        )
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 64 // batch_size
    for (in_process, labels), (from_worker, worker_labels) in zip(*batches, strict=True):
        assert torch.equal(in_process, from_worker) and torch.equal(labels, worker_labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pin_thread_pins_a_gpu_runs_pixels_and_labels():
    for array in (np.zeros(64, np.uint8), np.zeros(SHARED_MEMORY_BYTES, np.uint8)):
        assert pin_memory(WorkerArray.of(array, pin=True)).is_pinned()
        assert not pin_memory(WorkerArray.of(array, pin=False)).is_pinned()


@pytest.mark.parametrize("channels", [1, 3])
def test_a_pinning_loader_places_the_batches_of_a_cpu_run_exactly(jpeg_dataset, channels):
    """A GPU run's loader (pin_memory) yields PixelBatches; placed by the loop's prefetcher
    they are the CPU run's normalised batches, value for value."""
    spec = jpeg_spec(
        jpeg_dataset,
        channels=channels,
        loader_workers=1,
        augment={
            "random_resized_crop": True,
            "hflip": True,
            "mean": MEAN[:channels],
            "std": STD[:channels],
        },
        samples_per_epoch=48,
    )
    cpu_run = build_train_loader(spec, batch_size=16, rank=0, world_size=1, epoch=2, seed=4)
    gpu_run = build_train_loader(
        spec, batch_size=16, rank=0, world_size=1, epoch=2, seed=4, pin_memory=True
    )
    assert all(isinstance(images, PixelBatch) for images, _ in gpu_run)
    expected, got = placed(cpu_run), placed(gpu_run)
    assert len(expected) == len(got) == 3
    for (want_images, want_labels), (images, labels) in zip(expected, got, strict=True):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pixels_normalised_on_the_gpu_match_the_host_without_a_host_sync(jpeg_dataset):
    """On a GPU: the pinned uint8 batches, copied and normalised on the device one batch
    ahead, equal the host-normalised ones (within float32 rounding), and placing them makes no
    torch-level host sync."""
    spec = jpeg_spec(
        jpeg_dataset,
        augment={"random_resized_crop": True, "hflip": True, "mean": MEAN, "std": STD},
        samples_per_epoch=48,
    )
    cpu_run = build_train_loader(spec, batch_size=16, rank=0, world_size=1, epoch=1, seed=5)
    gpu_run = build_train_loader(
        spec, batch_size=16, rank=0, world_size=1, epoch=1, seed=5, pin_memory=True
    )
    list(DevicePrefetcher(gpu_run, "cuda", channels_last=True))  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = list(DevicePrefetcher(gpu_run, "cuda", channels_last=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(on_gpu) == 3
    for (want_images, want_labels), (images, labels) in zip(placed(cpu_run), on_gpu, strict=True):
        assert images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(images.cpu(), want_images, rtol=1e-6, atol=1e-6)
        assert torch.equal(labels.cpu(), want_labels)
