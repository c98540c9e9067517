"""Where a shard writer reads from: an image folder, a zip of one, or arrays (IDX or .npz).

Each source is a list of labelled items whose bytes load lazily, so capping and splitting
happen before any image is read. Class folders may nest (`Alphabet/character01`): every folder
that directly holds images is one class, named by its path below the deepest common ancestor.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Extensions a folder source reads; formats the shard format does not carry are re-encoded.
SOURCE_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
_IDX_IMAGES = re.compile(r"^(?P<stem>.*)images[-.]idx3-ubyte(\.gz)?$")


@dataclass
class ImageSource:
    """Labelled items of a source: `labels[i]` indexes `class_names`; `load(i)` gives the item.

    `load(i)` returns either (encoded bytes, lower-case extension) or a uint8 array
    ([H, W] or [H, W, C]) for array sources. `names[i]` identifies the item in messages.
    """

    kind: str
    class_names: list[str]
    labels: np.ndarray
    names: list[str]
    load: Callable[[int], tuple[bytes, str] | np.ndarray]


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


def _group_by_class(paths: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """Image paths (posix, relative) -> (class names, labels, kept paths), sorted by path."""
    images = sorted(
        p
        for p in paths
        if not _is_hidden(p) and p.rpartition(".")[2].lower() in SOURCE_IMAGE_EXTENSIONS
    )
    folders = sorted({p.rpartition("/")[0] for p in images})
    if len(folders) < 2:
        raise ValueError(
            f"found {len(folders)} class folder(s) with images; need at least 2 "
            "(layout: root/<class>/<image>, class folders may nest)"
        )
    ancestor = os.path.commonpath([f.rpartition("/")[0] or "." for f in folders])
    ancestor = "" if ancestor == "." else ancestor
    names = [f[len(ancestor) :].lstrip("/") if ancestor else f for f in folders]
    index = {folder: i for i, folder in enumerate(folders)}
    labels = np.array([index[p.rpartition("/")[0]] for p in images], dtype=np.int64)
    return names, labels, images


def _extension(path: str) -> str:
    ext = path.rpartition(".")[2].lower()
    return "jpg" if ext == "jpeg" else ext


def folder_source(root: str) -> ImageSource:
    paths = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        paths.extend(f"{rel}/{f}" if rel != "." else f for f in filenames)
    class_names, labels, images = _group_by_class(paths)

    def load(i: int) -> tuple[bytes, str]:
        with open(os.path.join(root, images[i]), "rb") as handle:
            return handle.read(), _extension(images[i])

    return ImageSource("folder", class_names, labels, images, load)


def zip_source(path: str) -> ImageSource:
    archive = zipfile.ZipFile(path)
    entries = [info.filename for info in archive.infolist() if not info.is_dir()]
    class_names, labels, images = _group_by_class(entries)

    def load(i: int) -> tuple[bytes, str]:
        return archive.read(images[i]), _extension(images[i])

    return ImageSource("zip", class_names, labels, images, load)


def read_idx(path: str) -> np.ndarray:
    """An IDX array file (MNIST format, gzip or not) as a NumPy array. Raises ValueError."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _array_source(kind: str, images: np.ndarray, labels: np.ndarray, where: str) -> ImageSource:
    if images.ndim not in (3, 4) or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{where}: expected images [N, H, W] or [N, H, W, C] and labels [N], "
            f"got {images.shape} and {labels.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8, got {images.dtype}")
    labels = labels.astype(np.int64).reshape(-1)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: negative labels")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if num_classes < 2:
        raise ValueError(f"{where}: need at least 2 classes, found {num_classes}")
    names = [f"{kind}[{i}]" for i in range(labels.size)]
    return ImageSource(
        kind, [str(c) for c in range(num_classes)], labels, names, lambda i: images[i]
    )


def idx_source(folder: str) -> ImageSource:
    """Every `<stem>images-idx3-ubyte[.gz]` with its `<stem>labels-idx1-ubyte[.gz]`, concatenated
    (Fashion-MNIST: train- and t10k-); the writer makes its own splits."""
    image_files = sorted(f for f in os.listdir(folder) if _IDX_IMAGES.match(f))
    images, labels = [], []
    for name in image_files:
        stem = _IDX_IMAGES.match(name).group("stem")  # type: ignore[union-attr]
        label_name = next(
            (
                f
                for f in (f"{stem}labels-idx1-ubyte.gz", f"{stem}labels-idx1-ubyte")
                if os.path.exists(os.path.join(folder, f))
            ),
            None,
        )
        if label_name is None:
            raise ValueError(f"{folder}: {name} has no matching {stem}labels-idx1-ubyte[.gz]")
        images.append(read_idx(os.path.join(folder, name)))
        labels.append(read_idx(os.path.join(folder, label_name)))
    return _array_source("idx", np.concatenate(images), np.concatenate(labels), folder)


def npz_source(path: str) -> ImageSource:
    """A .npz with arrays `images` (uint8) and `labels` (ints); loaded without pickle."""
    with np.load(path, allow_pickle=False) as arrays:
        if "images" not in arrays or "labels" not in arrays:
            raise ValueError(f"{path}: expected arrays 'images' and 'labels'")
        return _array_source("npz", arrays["images"], arrays["labels"], path)


def open_source(path: str) -> ImageSource:
    """Pick the source kind from `path`: .zip, .npz, a folder of IDX files, or an image folder.

    Raises ValueError when the path is none of these or holds fewer than 2 classes.
    """
    if not os.path.exists(path):
        raise ValueError(f"source {path} does not exist")
    if os.path.isdir(path):
        if any(_IDX_IMAGES.match(f) for f in os.listdir(path)):
            return idx_source(path)
        return folder_source(path)
    lower = path.lower()
    if lower.endswith(".zip"):
        try:
            return zip_source(path)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"source {path}: {exc}") from None
    if lower.endswith(".npz"):
        return npz_source(path)
    raise ValueError(
        f"source {path}: expected an image folder, a .zip of one, a .npz or a folder of IDX files"
    )
