"""The shard format: plain tars of consecutive members `<key>.<image ext>` + `<key>.cls`.

Writing (`ShardWriter`, with `tarfile`) and streaming reads (`read_shard_records`) of one
shard, as bytes: no decoding here and nothing that runs code from the data (no pickle, no
`pipe:`). Reads use our own forward-only tar member reader (`TarMemberReader`), so any fsspec
file object works and a cut-off archive is told apart from a whole one.
"""

from __future__ import annotations

import gzip
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


class TarFormatError(Exception):
    """The bytes are not a whole tar archive (cut short, bad header)."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR_FILE_TYPES = (b"0", b"\0", b"7")


class _Prefixed:
    """A read-only stream: `head` bytes, then the rest of `stream` (for gzip sniffing)."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data if len(data) == size else data + self.stream.read(size - len(data))


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r} in a tar header") from None


class TarMemberReader:
    """A forward-only reader of tar members, ustar/GNU/pax names, plain or gzip-compressed.

    `next_member()` returns (name, size) of the next regular file, or None at the end-of-archive
    block; `read_data()` returns that member's bytes (call it at most once per member; unread
    data is skipped). Raises TarFormatError when the archive is cut short or a header is
    corrupt, so a caller can tell a whole archive from a truncated one: `tarfile` in stream
    mode ends quietly at a cut-off header. This costs about a third of `tarfile`'s time per
    member, which is most of the per-sample cost of reading small images.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream: IO[bytes] | _Prefixed = stream
        self._skip = 0  # bytes of data and padding before the next header
        self._size = 0
        self._first = True

    def _read_exact(self, size: int) -> bytes:
        data = self._stream.read(size)
        while len(data) < size:  # some remote streams return short reads before the end
            more = self._stream.read(size - len(data))
            if not more:
                break
            data += more
        return data

    def _header(self) -> bytes:
        if self._skip:
            if len(self._read_exact(self._skip)) < self._skip:
                raise TarFormatError("unexpected end of data")
            self._skip = 0
        header = self._read_exact(_BLOCK)
        if self._first:
            self._first = False
            if header[:2] == b"\x1f\x8b":  # a .tar.gz: decompress on the fly
                self._stream = gzip.GzipFile(fileobj=_Prefixed(header, self._stream))  # type: ignore[arg-type]
                header = self._read_exact(_BLOCK)
        if len(header) < _BLOCK:
            raise TarFormatError(
                "the archive ends without its end-of-archive block"
                if not header
                else "truncated header"
            )
        return header

    def next_member(self) -> tuple[str, int] | None:
        long_name: str | None = None
        while True:
            header = self._header()
            if header == _ZERO_BLOCK:
                return None
            stored = _octal(header[148:156])
            if stored != sum(header) - sum(header[148:156]) + 8 * 32:
                raise TarFormatError("bad tar header checksum (not a tar archive, or corrupt)")
            size = _octal(header[124:136])
            padded = -(-size // _BLOCK) * _BLOCK
            kind = header[156:157]
            if kind in (b"L", b"x"):  # GNU long name / pax extended header for the next member
                data = self._read_exact(padded)
                if len(data) < padded:
                    raise TarFormatError("unexpected end of data")
                long_name = _long_name(kind, data[:size]) or long_name
                continue
            if kind not in _REGULAR_FILE_TYPES:
                self._skip = padded
                long_name = None
                continue
            name = long_name or _header_name(header)
            self._size, self._skip = size, padded
            return name, size

    def read_data(self) -> bytes:
        data = self._read_exact(self._size)
        if len(data) < self._size:
            raise TarFormatError("unexpected end of data")
        self._skip -= self._size
        self._size = 0
        return data


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: a path prefix field (GNU uses it otherwise)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _long_name(kind: bytes, data: bytes) -> str | None:
    if kind == b"L":
        return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    for record in data.split(b"\n"):  # pax records: b"<length> <key>=<value>"
        _, _, item = record.partition(b" ")
        key, _, value = item.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


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
    reader = TarMemberReader(stream)

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
        while (member := reader.next_member()) is not None:
            member_key, ext = split_member_name(member[0])
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
                members[ext] = reader.read_data()
    except (TarFormatError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # The group being read may have lost members, so it is not used.
        if offset == 0:
            what = "not a tar archive" if index < 0 else "archive ends early"
            yield BadRecord(key or "", max(index, 0), "truncated_tar", f"{what}: {exc}")
        return
    except OSError as exc:
        raise ShardReadError(f"reading failed: {exc}") from exc
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
