"""Writing shards: numbered WebDataset tars through webdataset's TarWriter on our opener."""

from __future__ import annotations

from typing import IO

from webdataset.writer import TarWriter

from jobs.contract.urls import join_url, open_url
from jobs.data.shard_format import LABEL_EXTENSION


class ShardWriter:
    """Writes samples into numbered tar shards `<prefix>-NNNNNN.tar` under a folder URL, with
    webdataset's TarWriter on streams from `open_url`.

    A sample is `<key>.<image ext>` + `<key>.cls`. A new shard starts when the current one holds
    `max_samples` samples or `max_bytes` bytes. Members get fixed metadata (mtime 0, root owner),
    so the same input gives identical bytes. `shards` lists (relative path, samples, bytes) of
    every finished shard.
    """

    def __init__(self, folder_url: str, prefix: str, *, max_samples: int, max_bytes: int) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.folder_url, self.prefix = folder_url, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[tuple[str, int, int]] = []
        self._file: IO[bytes] | None = None
        self._tar: TarWriter | None = None
        self._samples = 0
        self._bytes = 0

    def _open_next(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = open_url(join_url(self.folder_url, name), "wb")
        self._tar = TarWriter(
            self._file, user="root", group="root", mode=0o644, mtime=0, encoder=False
        )
        self._samples = self._bytes = 0
        self.shards.append((name, 0, 0))

    def _close_current(self) -> None:
        if self._tar is None or self._file is None:
            return
        self._tar.close()  # ends the archive; the stream is ours to close
        size = self._file.tell()
        self._file.close()
        name, _, _ = self.shards[-1]
        self.shards[-1] = (name, self._samples, size)
        self._tar = self._file = None

    def write(self, key: str, image: bytes, image_ext: str, label: int) -> None:
        """Append one sample; `key` must not contain '.'."""
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.'")
        if self._tar is None or self._samples >= self.max_samples or self._bytes >= self.max_bytes:
            self._close_current()
            self._open_next()
        assert self._tar is not None
        sample = {"__key__": key, image_ext: image, LABEL_EXTENSION: str(label).encode("ascii")}
        # data plus a header and padding per member, roughly
        self._bytes += self._tar.write(sample) + 2 * 1024
        self._samples += 1

    def close(self) -> list[tuple[str, int, int]]:
        self._close_current()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
