"""The shard format: WebDataset tars, read and written with the `webdataset` package.

A sample is a run of consecutive tar members `<key>.<ext>`: an image (`jpg`/`jpeg`/`png`/`webp`)
and its label, either `<key>.cls` (the integer as text, what our writer makes) or a field of
`<key>.json` (`label_key`, default "label"), the two conventions of shards made by other tools.
webdataset iterates the tar members (`tar_file_iterator`), groups them into samples
(`group_by_keys`) and writes them (`TarWriter`). This module adds what the project needs on top:

- the bytes come from our own opener (`jobs.contract.urls.open_url`, with its protocol allow-list);
  webdataset gets an open stream, never a URL, so its `gopen` (and `pipe:`) is never reached;
- every sample comes back as a RawSample or as a BadRecord with a reason from SKIP_REASONS;
- a cut-off archive is told apart from a whole one (`tarfile`'s stream mode, under webdataset,
  ends quietly at a missing header, so the end-of-archive block is checked here);
- several readers can split one shard by sample index (`stride`, `offset`) without reading
  the members of each other's samples.

No decoding here and nothing that runs code from the data: no pickle, no webdataset decoders.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import tarfile
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.writer import TarWriter

from jobs.contract.urls import join_url, open_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
JSON_EXTENSION = "json"
DEFAULT_LABEL_KEY = "label"
_READ_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, LABEL_EXTENSION, JSON_EXTENSION))

# Why a sample was skipped; the order is the layout of the per-batch counters in the pipeline.
SKIP_REASONS = (
    "bad_image",  # undecodable or truncated image bytes
    "missing_image",
    "missing_label",  # no `.cls`, and no `.json` with the label field
    "bad_label",  # the label is not an integer (or the `.json` is not JSON)
    "label_out_of_range",
    "non_contiguous_key",  # a key's members are split by another key's
    "duplicate_member",  # one member name twice in a sample
    "truncated_tar",  # the archive ends early or is not a tar
)


class ShardReadError(RuntimeError):
    """A shard cannot be opened or read at all (missing object, I/O failure)."""


@dataclass(frozen=True, slots=True)
class RawSample:
    """One good sample as stored: `index` counts the samples of its shard from 0."""

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


def split_member_name(name: str) -> tuple[str | None, str]:
    """`dir/abc.seg.PNG` -> ("dir/abc", "seg.png"): the key ends at the first dot of the base
    name, the extension is lower-cased. (None, "") for a name that has no key and extension
    (no dot, or a base name starting with one): such a member belongs to no sample, as in
    webdataset's own `base_plus_ext`."""
    start = name.rfind("/") + 1
    dot = name.find(".", start)
    if dot <= start:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _decompressor(head: bytes) -> Any:
    """The reader class for a compressed stream starting with `head` (magic numbers as
    `tarfile` tells them), or None for a plain one."""
    if head.startswith(b"\x1f\x8b\x08"):
        return lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh") and head[4:10] == b"1AY&SY":
        return lambda raw: bz2.BZ2File(raw, "rb")
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return lambda raw: lzma.LZMAFile(raw, "rb")
    return None


_BROKEN_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


class _Prefixed:
    """A read-only stream: `head`, then the rest of `stream` (to sniff compression)."""

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


class _TarBytes:
    """The uncompressed tar bytes of a shard, as webdataset's reader gets them.

    Decompresses gzip, bzip2 and xz itself, so that `tarfile` sees a plain archive whose end
    can be checked (`end_problem`) and a cut-off compressed stream raises instead of ending.
    """

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self._name = name
        head = stream.read(_BLOCK)
        self._source: Any = _Prefixed(head, stream)
        decompressor = _decompressor(head)
        if decompressor is not None:
            self._source = decompressor(self._source)
        self.length = 0
        self._tail = b""  # the last _BLOCK bytes read

    def __str__(self) -> str:  # webdataset names the stream in its error messages
        return self._name

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.length += len(data)
        self._tail = data[-_BLOCK:] if len(data) >= _BLOCK else (self._tail + data)[-_BLOCK:]
        return data

    def end_problem(self) -> str:
        """'' when the archive ended with its end-of-archive block, else what is wrong.

        Called after the tar reader stopped without an error; reads what it left. The tar
        reader stops quietly at a cut inside or before a header, and at a corrupt header; then
        the stream does not end with a zero block (a cut) or holds data after the point where
        the reader stopped (a corrupt header, unless it is in the last 10 KiB that the reader
        had already buffered). Decompressors check their own end marker and checksum here.
        """
        data_left = False
        while chunk := self.read(1 << 16):
            data_left = data_left or chunk.count(0) != len(chunk)
        if self.length % _BLOCK or self._tail != _ZERO_BLOCK:
            return "the archive ends without its end-of-archive block"
        if data_left:
            return "unreadable member header before the end of the archive"
        return ""


class _SampleNumbers:
    """Numbers the samples of one shard for one reader, between webdataset's two stages.

    `tar_file_iterator` asks `select(name)` before it reads a member, and `group_by_keys` asks
    `keys(name)` for each member selected, before the next `select`; so both see the members
    in order. A sample is a run of members with one key; samples are numbered from 0, and this
    reader keeps those whose number % stride == offset: the members of other samples, and of
    extensions no sample uses, are not even read. The key handed to group_by_keys carries the
    number, so a key that comes back after another one makes a second sample (reported as
    non_contiguous_key) instead of joining the first.
    """

    def __init__(self, stride: int, offset: int) -> None:
        self.stride, self.offset = stride, offset
        self.index = -1
        self.key: str | None = None
        self.seen: set[str] = set()
        self.split: set[int] = set()  # samples whose key came before (this reader's only)
        self.duplicated: set[int] = set()
        self.unread: deque[tuple[int, str]] = deque()  # this reader's samples with nothing read
        self._mine = False
        self._read_any = False
        self._extensions: set[str] = set()
        self._extension = ""

    def _close_sample(self) -> None:
        if self._mine and not self._read_any and self.key is not None:
            self.unread.append((self.index, self.key))

    def select(self, name: str) -> bool:
        key, extension = split_member_name(name)
        if key is None:
            return False
        if key != self.key:
            self._close_sample()
            self.index += 1
            self.key = key
            self._mine = self.index % self.stride == self.offset
            if self._mine and key in self.seen:
                self.split.add(self.index)
            self.seen.add(key)
            self._read_any = False
            self._extensions = set()
        if not self._mine or extension not in _READ_EXTENSIONS:
            return False
        if extension in self._extensions:
            self.duplicated.add(self.index)
        self._extensions.add(extension)
        self._extension = extension
        self._read_any = True
        return True

    def keys(self, name: str) -> tuple[tuple[int, str], str]:
        assert self.key is not None
        return (self.index, self.key), self._extension

    def on_group_error(self, exc: Exception) -> bool:
        """group_by_keys' handler: a repeated member name is reported with its sample (True:
        go on without the repeat); anything else is raised."""
        if isinstance(exc, ValueError) and self.index in self.duplicated:
            return True
        raise exc

    def finish(self) -> None:
        self._close_sample()
        self._mine = False


def _with_url(members: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """group_by_keys wants each member to name its shard, as webdataset's URL stage does."""
    for member in members:
        member["__url__"] = url
        yield member


def _label(sample: dict[str, Any], num_classes: int, label_key: str) -> int | tuple[str, str]:
    """The sample's label, or (reason, detail) when it has none that can be used."""
    if LABEL_EXTENSION in sample:
        text = sample[LABEL_EXTENSION].decode("ascii", errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            return "bad_label", f"label {text[:20]!r} is not an integer"
    elif JSON_EXTENSION in sample:
        try:
            document = json.loads(sample[JSON_EXTENSION])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return "bad_label", f".json is not valid JSON ({exc})"
        if not isinstance(document, dict) or label_key not in document:
            return "missing_label", f"no .cls member and no {label_key!r} field in .json"
        value = document[label_key]
        if not isinstance(value, int) or isinstance(value, bool):
            return "bad_label", f".json field {label_key!r} is {str(value)[:20]!r}, not an integer"
        label = value
    else:
        return "missing_label", f"no .cls member and no .json with a {label_key!r} field"
    if not 0 <= label < num_classes:
        return "label_out_of_range", f"label {label} not in [0, {num_classes})"
    return label


def _record(
    sample: dict[str, Any], numbers: _SampleNumbers, num_classes: int, label_key: str
) -> RawSample | BadRecord:
    index, key = sample["__key__"]
    if index in numbers.split:
        return BadRecord(key, index, "non_contiguous_key", "members of this key are not adjacent")
    if index in numbers.duplicated:
        return BadRecord(key, index, "duplicate_member", "a member name appears twice")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None:
        return BadRecord(key, index, "missing_image", "no .jpg/.jpeg/.png/.webp member")
    label = _label(sample, num_classes, label_key)
    if isinstance(label, tuple):
        return BadRecord(key, index, *label)
    return RawSample(key, index, sample[image_ext], image_ext, label)


def _unread(numbers: _SampleNumbers, below: int | None = None) -> Iterator[BadRecord]:
    """The samples of this reader that had no member to read (numbered below `below`)."""
    while numbers.unread and (below is None or numbers.unread[0][0] < below):
        index, key = numbers.unread.popleft()
        yield BadRecord(key, index, "missing_image", "no .jpg/.jpeg/.png/.webp member")


def _error_text(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.partition(" @ ")[0]  # webdataset appends " @ <stream>"


def read_shard_records(
    stream: IO[bytes],
    *,
    num_classes: int,
    label_key: str = DEFAULT_LABEL_KEY,
    expected_samples: int | None = None,
    stride: int = 1,
    offset: int = 0,
    url: str = "",
) -> Iterator[RawSample | BadRecord]:
    """Stream the samples of one tar shard (plain or compressed), in order, as RawSample or
    BadRecord; `stream` is already open (`url` only names it).

    Only samples with `index % stride == offset` are yielded (and have their bytes read), so
    several readers can split one shard by sample index. A truncated or non-tar stream yields
    one BadRecord("truncated_tar") to the reader with offset 0 (the sample just before the cut
    may be lost with the one it cuts), as does a shard that holds fewer samples than
    `expected_samples`. Raises ShardReadError on I/O errors of the stream itself.
    """
    numbers = _SampleNumbers(stride, offset)
    problem = ""
    try:
        archive = _TarBytes(stream, url or "the shard")
        members = tar_file_iterator(archive, skip_meta=None, select_files=numbers.select)
        samples = group_by_keys(
            _with_url(members, url), keys=numbers.keys, handler=numbers.on_group_error
        )
        # Each sample is held back until the next one starts: the last one is used only once
        # the archive turns out whole, since a cut may have taken some of its members.
        held: dict[str, Any] | None = None
        for sample in samples:
            if held is not None:
                yield from _unread(numbers, below=held["__key__"][0])
                yield _record(held, numbers, num_classes, label_key)
            held = sample
        problem = archive.end_problem()
        if not problem:
            if held is not None:
                yield from _unread(numbers, below=held["__key__"][0])
                yield _record(held, numbers, num_classes, label_key)
            numbers.finish()
            yield from _unread(numbers)
    except _BROKEN_ARCHIVE as exc:
        what = "not a tar archive" if numbers.index < 0 else "archive ends early"
        problem = f"{what}: {_error_text(exc)}"
    except OSError as exc:
        raise ShardReadError(f"reading failed: {exc}") from exc
    key, index = numbers.key or "", max(numbers.index, 0)
    if problem:
        if offset == 0:
            yield BadRecord(key, index, "truncated_tar", problem)
        return
    if expected_samples is not None and numbers.index + 1 < expected_samples and offset == 0:
        yield BadRecord(
            key,
            numbers.index + 1,
            "truncated_tar",
            f"{numbers.index + 1} samples where dataset.json lists {expected_samples}",
        )


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
