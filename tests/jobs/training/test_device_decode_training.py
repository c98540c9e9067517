"""Training with data.decode "device" on the CPU: the loop decodes each JPEG batch where it
places it (the same code path as on a GPU), reads nothing back per step, and a whole run trains
and evaluates on real JPEG shards (Fashion-MNIST written by the shard writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_gpu_path import HostReads

from jobs.contract.data import DataSpec
from jobs.contract.run_files import read_metrics
from jobs.contract.train import TrainSpec
from jobs.data.pipeline import build_eval_loader, build_train_loader
from jobs.data.sources import ImageSource, idx_source
from jobs.data.writer import build_shards
from jobs.models import build_model
from jobs.training.loop import evaluate, train_one_epoch
from jobs.training.run import run_training_in_process

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory) -> str:
    """Fashion-MNIST, 24 per class, upscaled to 40 px and stored as JPEG; a quarter is val."""
    if not FASHION_MNIST_DIR.is_dir():
        pytest.fail(f"{FASHION_MNIST_DIR} is missing: apt-get install dataset-fashion-mnist")
    source = idx_source(str(FASHION_MNIST_DIR))
    keep = np.concatenate([np.flatnonzero(source.labels == c)[:24] for c in range(10)])

    def load(i: int) -> np.ndarray:
        image = Image.fromarray(source.load(int(keep[i])))
        return np.asarray(image.resize((40, 40), Image.Resampling.BICUBIC))

    names = [str(i) for i in keep]
    subset = ImageSource("fashion-40", source.class_names, source.labels[keep], names, load)
    out = tmp_path_factory.mktemp("fashion-jpeg-40")
    summary = build_shards(
        subset,
        str(out),
        val_fraction=0.25,
        image_format="jpeg",
        shard_max_samples=64,
        progress=None,
    )
    return summary.dataset_url


class CrossEntropy(torch.nn.Module):
    def forward(self, scores, labels, generator=None):
        return F.cross_entropy(scores, labels)


def _host_reads(dataset: str, samples: int) -> int:
    data = DataSpec(
        train=dataset,
        num_classes=10,
        image_size=32,
        channels=1,
        decode="device",
        loader_workers=0,
        samples_per_epoch=samples,
    )
    loader = build_train_loader(data, batch_size=8, rank=0, world_size=1, epoch=1, seed=0)
    torch.manual_seed(0)
    model = build_model("convnet_small", 10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with HostReads() as reads:
        train_one_epoch(model, loader, CrossEntropy(), optimizer, check_every=1000)
    return reads.count


def test_decoding_on_the_device_reads_nothing_back_per_step(jpeg_dataset):
    few, many = _host_reads(jpeg_dataset, 8 * 3), _host_reads(jpeg_dataset, 8 * 15)
    assert few == many <= 3  # the end-of-epoch reads only


def _spec(dataset: str, decode: str) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "data": {
                "train": dataset,
                "val": dataset,
                "num_classes": 10,
                "image_size": 32,
                "channels": 1,
                "augment": {"crop_scale_min": 0.6},
                "loader_workers": 1,
                "decode": decode,
            },
            "model": {"arch": "convnet_small"},
            "loss": {"name": "noised_topk", "k": 2, "epsilon": 1.0, "n_samples": 5},
            "optim": {"name": "adamw", "lr": 0.005},
            "epochs": 2,
            "batch_size": 16,
            "metrics": {"ks": [1, 2], "select": "val_top2", "mode": "max"},
            "scaling": {"num_workers": 1},
        }
    )


def test_a_run_trains_and_evaluates_with_device_decoding(jpeg_dataset, tmp_path):
    """Both decode choices train the same seeded run: the same sample counts, and a first-epoch
    loss within what the few pixel-level differences of the two decoders can move (after that
    the runs drift apart, as any two runs do)."""
    results = {}
    for decode in ("cpu", "device"):
        result = run_training_in_process(
            _spec(jpeg_dataset, decode), decode, storage=str(tmp_path), device="cpu"
        )
        assert result["status"] == "succeeded"
        results[decode] = read_metrics(str(tmp_path / decode / "metrics.jsonl"))
    cpu, device = results["cpu"], results["device"]
    assert [e["epoch"] for e in device] == [1, 2]
    for cpu_epoch, device_epoch in zip(cpu, device, strict=True):
        assert device_epoch["samples"] == cpu_epoch["samples"] == 176  # 11 steps of 16
        assert device_epoch["skipped"] == 0
        assert np.isfinite(device_epoch["train_loss"])
        for key in ("val_top1", "val_top2", "val_macro_top2"):
            assert 0.0 <= device_epoch[key] <= 1.0
    assert device[0]["train_loss"] == pytest.approx(cpu[0]["train_loss"], rel=0.05)


def test_evaluation_counts_every_val_sample_once_either_way(jpeg_dataset):
    spec = _spec(jpeg_dataset, "cpu").data
    torch.manual_seed(0)
    model = build_model("convnet_small", 10, in_channels=1)
    counts = {}
    for decode in ("cpu", "device"):
        data = spec.model_copy(update={"decode": decode})
        for world_size in (1, 2):
            total = None
            for rank in range(world_size):
                loader = build_eval_loader(data, batch_size=16, rank=rank, world_size=world_size)
                part = evaluate(model, loader, [1, 2], 10)
                total = part if total is None else total + part
            counts[decode, world_size] = total
    for total in counts.values():
        assert total.support.sum() == 60 and total.support.tolist() == [6] * 10
    for k in (1, 2):  # the same model scores nearly the same pixels
        assert counts["device", 1].accuracy(k) == pytest.approx(
            counts["cpu", 1].accuracy(k), abs=2 / 60
        )
        assert counts["device", 2].accuracy(k) == counts["device", 1].accuracy(k)
