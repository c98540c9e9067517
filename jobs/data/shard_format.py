"""The shard format: plain tars of consecutive members `<key>.<image ext>` + `<key>.cls`.

Writing (`ShardWriter`) and streaming reads (`read_shard_records`) of one shard, as bytes: no
decoding here and nothing that runs code from the data (no pickle, no `pipe:`). Reads use
`tarfile` in stream mode ("r|*"), so any forward-only fsspec file object works.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from jobs.data.urls import join_url, open_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"

# Why a sample was skipped; the order is the layout of the per-batch counters in the pipeline.
SKIP_REASONS = (
    "bad_image",  # undecodable or truncated image bytes
    "missing_image",
    "missing_label",
    "bad_label",  # `.cls` is not an integer
    "label_out_of_range",
    "non_contiguous_key",  # a key's members are split by another key's
    "truncated_tar",  # the archive ends early or is not a tar
)


class ShardReadError(RuntimeError):
    """A shard cannot be opened or read at all (missing object, I/O failure)."""


@dataclass(frozen=True, slots=True)
class RawSample:
    """One good sample as stored: `index` counts the sample groups of its shard from 0."""

    key: str
    index: int
    image: bytes
    image_ext: str
    label: int


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A skipped sample (or a broken shard tail), with the reason from SKIP_REASONS."""

    key: str
    index: int
    reason: str
    detail: str = ""


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records on the archive how its member list ended: `tarfile` in stream mode ends quietly
    both at the end-of-archive zero block and at a cut-off header; only the first is a whole tar."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.topk_complete = True  # type: ignore[attr-defined]
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            archive.topk_complete = False  # type: ignore[attr-defined]
            raise


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.seg.png` -> ("dir/abc", "seg.png"): the key ends at the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


def read_shard_records(
    stream: IO[bytes],
    *,
    num_classes: int,
    expected_samples: int | None = None,
    stride: int = 1,
    offset: int = 0,
) -> Iterator[RawSample | BadRecord]:
    """Stream the samples of one tar shard, in order, as RawSample or BadRecord.

    Only sample groups with `index % stride == offset` are yielded (and have their bytes read),
    so several readers can split one shard by sample index. A truncated or non-tar stream yields
    one BadRecord("truncated_tar") to the reader with offset 0, as does a shard that holds fewer
    samples than `expected_samples`. Raises ShardReadError on I/O errors of the stream itself.
    """
    seen_keys: set[str] = set()
    index = -1
    key: str | None = None
    members: dict[str, bytes] = {}
    split_key = False
    try:
        archive = tarfile.open(  # noqa: SIM115 (closed below)
            fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo
        )
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        if offset == 0:
            yield BadRecord("", 0, "truncated_tar", f"not a readable tar archive ({exc})")
        return

    def finish_group() -> RawSample | BadRecord | None:
        if key is None or index % stride != offset:
            return None
        if split_key:
            return BadRecord(
                key, index, "non_contiguous_key", "members of this key are not adjacent"
            )
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image_ext is None:
            return BadRecord(key, index, "missing_image", "no .jpg/.jpeg/.png/.webp member")
        if LABEL_EXTENSION not in members:
            return BadRecord(key, index, "missing_label", "no .cls member")
        text = members[LABEL_EXTENSION].decode("ascii", errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            return BadRecord(key, index, "bad_label", f"label {text[:20]!r} is not an integer")
        if not 0 <= label < num_classes:
            return BadRecord(
                key, index, "label_out_of_range", f"label {label} not in [0, {num_classes})"
            )
        return RawSample(key, index, members[image_ext], image_ext, label)

    try:
        with archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = split_member_name(member.name)
                if member_key != key:
                    record = finish_group()
                    if record is not None:
                        yield record
                    index += 1
                    key, members = member_key, {}
                    split_key = member_key in seen_keys
                    seen_keys.add(member_key)
                wanted = ext in IMAGE_EXTENSIONS or ext == LABEL_EXTENSION
                if wanted and index % stride == offset and not split_key:
                    handle = archive.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    members[ext] = data
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        if offset == 0:
            yield BadRecord(
                key or "", max(index, 0), "truncated_tar", f"archive ends early ({exc})"
            )
        return
    except OSError as exc:
        raise ShardReadError(f"reading failed: {exc}") from exc
    if not getattr(archive, "topk_complete", True):
        # Cut at a member boundary: the last group may have lost members, so it is not used.
        if offset == 0:
            yield BadRecord(key or "", max(index, 0), "truncated_tar", "archive ends early")
        return
    record = finish_group()
    if record is not None:
        yield record
    if expected_samples is not None and index + 1 < expected_samples and offset == 0:
        yield BadRecord(
            key or "",
            index + 1,
            "truncated_tar",
            f"{index + 1} samples where dataset.json lists {expected_samples}",
        )


class ShardWriter:
    """Writes samples into numbered tar shards `<prefix>-NNNNNN.tar` under a folder URL.

    A new shard starts when the current one holds `max_samples` samples or `max_bytes` bytes.
    Members get fixed metadata (mtime 0, root owner), so the same input gives identical bytes.
    `shards` lists (relative path, samples, bytes) of every finished shard.
    """

    def __init__(self, folder_url: str, prefix: str, *, max_samples: int, max_bytes: int) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.folder_url, self.prefix = folder_url, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[tuple[str, int, int]] = []
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._samples = 0
        self._bytes = 0

    def _open_next(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = open_url(join_url(self.folder_url, name), "wb")
        self._tar = tarfile.open(  # noqa: SIM115 (closed by _close_current)
            fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT
        )
        self._samples = self._bytes = 0
        self.shards.append((name, 0, 0))

    def _close_current(self) -> None:
        if self._tar is None or self._file is None:
            return
        self._tar.close()
        size = self._file.tell()
        self._file.close()
        name, _, _ = self.shards[-1]
        self.shards[-1] = (name, self._samples, size)
        self._tar = self._file = None

    def _add_member(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self._bytes += len(data) + 1024  # data plus header and padding, roughly

    def write(self, key: str, image: bytes, image_ext: str, label: int) -> None:
        """Append one sample; `key` must not contain '.'."""
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.'")
        if self._tar is None or self._samples >= self.max_samples or self._bytes >= self.max_bytes:
            self._close_current()
            self._open_next()
        self._add_member(f"{key}.{image_ext}", image)
        self._add_member(f"{key}.{LABEL_EXTENSION}", str(label).encode("ascii"))
        self._samples += 1

    def close(self) -> list[tuple[str, int, int]]:
        self._close_current()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
