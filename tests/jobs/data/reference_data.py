"""Reference data for the data-layer tests: where the real datasets are, an IDX reader written
from the format's documentation, images that encode their own sample id, crafted tars."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from shared_paths import OMNIGLOT_ZIP

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ID_CLASSES = 5
ID_IMAGE_SIZE = 8


def require_fashion_mnist() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): "
            "run `apt-get install -y dataset-fashion-mnist`"
        )
    return FASHION_MNIST_DIR


def require_omniglot() -> Path:
    if not OMNIGLOT_ZIP.is_file():
        pytest.fail(f"the Omniglot zip is missing: {OMNIGLOT_ZIP}")
    return OMNIGLOT_ZIP


def read_idx_reference(path: Path) -> np.ndarray:
    """Independent IDX reader: MNIST's documented layout (magic 0x0801 labels, 0x0803 images)."""
    raw = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(raw[:4], "big")
    if magic == 0x0801:
        count = int.from_bytes(raw[4:8], "big")
        return np.frombuffer(raw, np.uint8, count, 8)
    assert magic == 0x0803
    count, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, count * rows * cols, 16).reshape(count, rows, cols)


def id_image(sample_id: int) -> np.ndarray:
    """An 8x8 grey image whose first two pixels spell `sample_id` (little end first)."""
    image = np.full((ID_IMAGE_SIZE, ID_IMAGE_SIZE), 128, np.uint8)
    image[0, 0], image[0, 1] = sample_id % 256, sample_id // 256
    return image


def ids_from_batch(images) -> list[int]:
    """Recover sample ids from eval-pipeline images normalised with mean 0, std 1."""
    pixels = (images[:, 0, 0, :2] * 255).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()
