"""The uncompressed bytes of a tar shard, as webdataset's tar iteration reads them, with a
check that the archive was whole (`TarBytes.end_problem`)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from typing import IO, Any

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


BROKEN_ARCHIVE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


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


class TarBytes:
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
