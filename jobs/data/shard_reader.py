"""Reading a shard: webdataset's tar iteration (`tar_file_iterator`) and grouping
(`group_by_keys`) on the stream of our own opener, turned into RawSample / BadRecord.

What this adds to webdataset:
- the bytes come from `jobs.contract.urls.open_url` (with its protocol allow-list); webdataset
  gets an open stream, never a URL, so its `gopen` (and `pipe:`) is never reached;
- every sample comes back as a RawSample or as a BadRecord with a reason from SKIP_REASONS;
- a cut-off archive is told apart from a whole one (`tarfile`'s stream mode, under webdataset,
  ends quietly at a missing header, so the end-of-archive block is checked: tar_bytes.py);
- several readers can split one shard by sample index (`stride`, `offset`) without reading
  the members of each other's samples.

No decoding here and nothing that runs code from the data: no pickle, no webdataset decoders.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import IO, Any

from webdataset.tariterators import group_by_keys, tar_file_iterator

from jobs.data.shard_format import (
    DEFAULT_LABEL_KEY,
    IMAGE_EXTENSIONS,
    READ_EXTENSIONS,
    BadRecord,
    RawSample,
    ShardReadError,
    parse_label,
    split_member_name,
)
from jobs.data.tar_bytes import BROKEN_ARCHIVE, TarBytes


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
        if not self._mine or extension not in READ_EXTENSIONS:
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
    label = parse_label(sample, num_classes, label_key)
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
        archive = TarBytes(stream, url or "the shard")
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
    except BROKEN_ARCHIVE as exc:
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
