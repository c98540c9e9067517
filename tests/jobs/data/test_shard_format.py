"""Our tar member reader against `tarfile` (the reference) on every header flavour it writes."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from jobs.data.shard_format import TarFormatError, TarMemberReader, split_member_name


def archive_bytes(members: list[tuple[str, bytes]], tar_format: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as archive:
        folder = tarfile.TarInfo("some/folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a-link")
        link.type, link.linkname = tarfile.SYMTYPE, "x"
        archive.addfile(link)
    return out.getvalue()


def read_all(data: bytes, read_every: int = 1) -> list[tuple[str, bytes | None]]:
    reader = TarMemberReader(io.BytesIO(data))
    found = []
    while (member := reader.next_member()) is not None:
        name, _ = member
        found.append((name, reader.read_data() if len(found) % read_every == 0 else None))
    return found


MEMBERS = [
    ("k1.png", b"\x89PNG" * 300),
    ("k1.cls", b"3"),
    ("dir/" + "long-" * 30 + "name.png", b"x" * 513),  # > 100 characters
    ("d" * 120 + "/k2.cls", b""),  # a long folder: ustar prefix field / GNU / pax
    ("ünïcode.jpg", b"\xff\xd8" * 1000),
]


@pytest.mark.parametrize(
    "tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
)
def test_reader_matches_tarfile(tar_format):
    # ustar cannot hold a name > 100 characters without a folder to put in its prefix field
    members = [m for m in MEMBERS if tar_format != tarfile.USTAR_FORMAT or "long-" not in m[0]]
    data = archive_bytes(members, tar_format)
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        expected = [
            (m.name, reference.extractfile(m).read()) for m in reference.getmembers() if m.isreg()
        ]
    assert read_all(data) == expected
    # members left unread are skipped correctly
    assert [n for n, _ in read_all(data, read_every=2)] == [n for n, _ in expected]
    assert read_all(gzip.compress(data)) == expected


def test_reader_tells_cut_archives_from_whole_ones():
    data = archive_bytes(MEMBERS[:2], tarfile.USTAR_FORMAT)
    for cut in (512 + 512 + 100, 512 * 3, 512 * 4 + 7, 512 * 5):  # in data, at boundaries, ...
        with pytest.raises(TarFormatError):
            read_all(data[:cut])
    with pytest.raises(TarFormatError, match="header"):
        read_all(b"definitely not a tar archive" * 40)
    with pytest.raises(TarFormatError):
        read_all(b"")


def test_split_member_name():
    assert split_member_name("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    assert split_member_name("abc") == ("abc", "")
    assert split_member_name("a.b/c.cls") == ("a.b/c", "cls")
