"""Reading one shard through webdataset's tar iteration and grouping: every tar header flavour,
every cut point, compression, splitting a shard between readers, and malformed samples.

The reference for what a tar holds is the standard library's `tarfile` (non-streaming mode)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_data import id_image, png_bytes, tar_bytes

from jobs.data.shard_format import BadRecord, RawSample, split_member_name
from jobs.data.shard_reader import read_shard_records
from jobs.data.shard_writer import ShardWriter


def read(data: bytes, **options) -> list[RawSample | BadRecord]:
    options.setdefault("num_classes", 10)
    return list(read_shard_records(io.BytesIO(data), **options))


def bad(records) -> list[tuple[str, str]]:
    return [(r.key, r.reason) for r in records if isinstance(r, BadRecord)]


def good(records) -> list[tuple[str, bytes, str, int]]:
    return [(r.key, r.image, r.image_ext, r.label) for r in records if isinstance(r, RawSample)]


def archive_bytes(members: list[tuple[str, bytes]], tar_format: int) -> bytes:
    """A tar with a folder and a symlink member around the given files."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format) as archive:
        folder = tarfile.TarInfo("some/folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a-link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "x"
        archive.addfile(link)
    return out.getvalue()


LONG_FOLDER = "d" * 120  # > 100 characters: the ustar prefix field, GNU long names, pax
MEMBERS = [
    ("k1.png", png_bytes(id_image(1))),
    ("k1.cls", b"3"),
    ("dir/" + "long-" * 30 + "name.PNG", png_bytes(id_image(2))),  # name > 100 characters
    ("dir/" + "long-" * 30 + "name.cls", b" 4\n"),
    (f"{LONG_FOLDER}/k2.webp", b"RIFF" * 200),
    (f"{LONG_FOLDER}/k2.cls", b"5"),
    ("ünïcode.jpg", b"\xff\xd8" * 1000),
    ("ünïcode.cls", b"6"),
]


@pytest.mark.parametrize(
    "tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
)
def test_header_flavours_read_as_tarfile_reads_them(tar_format):
    # ustar cannot hold a name > 100 characters without a folder to put in its prefix field
    members = [m for m in MEMBERS if tar_format != tarfile.USTAR_FORMAT or "long-" not in m[0]]
    data = archive_bytes(members, tar_format)
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        stored = {
            m.name: reference.extractfile(m).read() for m in reference.getmembers() if m.isreg()
        }
    expected = []
    for name, _ in members[::2]:  # each image, then its label
        key, ext = split_member_name(name)
        label = int(stored[name.rpartition(".")[0] + ".cls"])
        expected.append((key, stored[name], ext, label))
    records = read(data)
    assert bad(records) == []
    assert good(records) == expected
    assert [r.index for r in records] == list(range(len(expected)))
    # gzip-compressed, as .tar.gz shards are
    assert read(gzip.compress(data)) == records


def webdataset_shard(count: int) -> bytes:
    """`count` samples written by webdataset's own TarWriter: ids 0.., label id % 5."""
    out = io.BytesIO()
    with wds.TarWriter(out) as sink:
        for i in range(count):
            sink.write({"__key__": f"s{i:04d}", "png": png_bytes(id_image(i)), "cls": i % 5})
    return out.getvalue()


def test_every_cut_is_told_from_a_whole_archive():
    """Cut anywhere, a shard yields a prefix of its samples, intact, and one truncated_tar;
    only a cut in the zero padding after the end-of-archive block leaves the shard whole."""
    data = webdataset_shard(6)
    whole = read(data)
    assert len(good(whole)) == 6 and bad(whole) == []
    # where the members end: the end-of-archive block starts at the last member's padded end
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        last = reference.getmembers()[-1]
        archive_end = last.offset_data + -(-last.size // 512) * 512
        sample_ends = [m.offset_data + m.size for m in reference.getmembers()[2::3]]
    cuts = sorted({*range(0, len(data), 512), *range(7, len(data), 331), len(data) - 1})
    for cut in cuts:
        records = read(data[:cut])
        intact = len(good(records))
        if cut >= archive_end + 512 and cut % 512 == 0:
            assert records == whole, cut
            continue
        assert bad(records) == [(bad(records)[0][0], "truncated_tar")], cut
        assert good(records) == good(whole)[:intact], cut  # never a changed or partial sample
        # at most the sample before the cut is lost with the one the cut goes through
        assert intact >= sum(end <= cut for end in sample_ends) - 1, cut


def test_not_a_tar_archive():
    for data in (b"", b"definitely not a tar archive" * 40, gzip.compress(b"not a tar" * 99)):
        records = read(data)
        assert [(r.reason, r.detail.split(":")[0]) for r in records] == [
            ("truncated_tar", "not a tar archive")
        ]


def test_corrupt_header_inside_the_archive_is_reported():
    whole = webdataset_shard(40)
    with tarfile.open(fileobj=io.BytesIO(whole)) as reference:
        header = reference.getmembers()[30].offset  # the first member of sample 15
    data = bytearray(whole)
    data[header : header + 8] = b"garbage!"  # its checksum no longer matches
    records = read(bytes(data))
    assert [reason for _, reason in bad(records)] == ["truncated_tar"]
    assert good(records) == good(read(whole))[: len(good(records))]
    assert len(good(records)) in (14, 15)
    assert "unreadable member header" in records[-1].detail


@pytest.mark.parametrize(
    "compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gz", "bz2", "xz"]
)
def test_compressed_shards_whole_and_cut(compress):
    data = webdataset_shard(20)
    packed = compress(data)
    assert read(packed) == read(data)
    cut = read(packed[: len(packed) * 2 // 3])
    assert bad(cut) == [(bad(cut)[0][0], "truncated_tar")]
    assert good(cut) == good(read(data))[: len(good(cut))]


def test_malformed_samples_are_classified():
    members = [
        ("a.png", b"img"),
        ("a.cls", b"1"),
        ("b.png", b"img"),
        ("b.png", b"img"),  # the same member twice
        ("b.cls", b"1"),
        ("c.cls", b"2"),  # no image
        ("d.jpg", b"img"),  # no label
        ("e.webp", b"img"),
        ("e.cls", b"x"),
        ("f.jpeg", b"img"),
        ("f.cls", b"10"),
        ("g.txt", b"only a caption"),  # no member that a sample uses
        ("a.json", b"{}"),  # key a again, after others
        ("README", b"no extension: belongs to no sample"),
        ("h.png", b"img"),
        ("h.cls", b"9"),
    ]
    records = read(tar_bytes(members))
    assert bad(records) == [
        ("b", "duplicate_member"),
        ("c", "missing_image"),
        ("d", "missing_label"),
        ("e", "bad_label"),
        ("f", "label_out_of_range"),
        ("g", "missing_image"),
        ("a", "non_contiguous_key"),
    ]
    assert good(records) == [("a", b"img", "png", 1), ("h", b"img", "png", 9)]
    assert [r.index for r in records] == list(range(9))


def test_json_labels():
    def label_of(document: bytes, **options) -> object:
        (record,) = read(tar_bytes([("k.png", b"img"), ("k.json", document)]), **options)
        return record.label if isinstance(record, RawSample) else record.reason

    assert label_of(b'{"label": 3, "caption": "x"}') == 3
    assert label_of(b'{"class_id": 7}', label_key="class_id") == 7
    assert label_of(b'{"class_id": 7}') == "missing_label"
    assert label_of(b"[3]") == "missing_label"
    for value in (b'"3"', b"3.0", b"true", b"null"):
        assert label_of(b'{"label": %s}' % value) == "bad_label", value
    assert label_of(b'{"label": 12}') == "label_out_of_range"
    assert label_of(b"{not json") == "bad_label"
    # a .cls member is the label when both are there
    (record,) = read(tar_bytes([("k.png", b"i"), ("k.cls", b"2"), ("k.json", b'{"label": 4}')]))
    assert record.label == 2


def test_short_shard_against_dataset_json_count():
    data = webdataset_shard(5)
    assert bad(read(data, expected_samples=5)) == []
    (last,) = [r for r in read(data, expected_samples=8) if isinstance(r, BadRecord)]
    assert (last.index, last.reason, last.detail) == (
        5,
        "truncated_tar",
        "5 samples where dataset.json lists 8",
    )
    assert bad(read(data, expected_samples=8, stride=2, offset=1)) == []  # reported once


LAYOUT_EXTENSIONS = ["png", "cls", "json", "txt", "jpg"]


@settings(max_examples=150, deadline=None)
@given(
    samples=st.lists(
        st.tuples(
            st.integers(0, 6),  # key (repeats make non-contiguous keys)
            st.lists(st.sampled_from(LAYOUT_EXTENSIONS), min_size=1, max_size=4),
        ),
        max_size=25,
    ),
    stride=st.integers(1, 5),
)
def test_readers_split_a_shard_into_disjoint_exact_shares(samples, stride):
    """Whatever the layout (malformed samples included), `stride` readers together yield each
    of the shard's samples exactly once, as a single reader does."""
    members, previous = [], None
    for n, (key, extensions) in enumerate(samples):
        if key == previous:  # two runs of one key side by side would be one sample
            key += 7
        previous = key
        for ext in extensions:
            members.append((f"k{key}.{ext}", b"%d" % (n % 3) if ext == "cls" else b"x%d" % n))
    data = tar_bytes(members)
    alone = read(data)
    shares = [read(data, stride=stride, offset=offset) for offset in range(stride)]
    assert sorted((r.index, repr(r)) for records in shares for r in records) == sorted(
        (r.index, repr(r)) for r in alone
    )
    for offset, records in enumerate(shares):
        indices = [r.index for r in records]
        assert indices == sorted(set(indices))  # in shard order
        assert all(index % stride == offset for index in indices)


def test_shard_writer_writes_webdataset_tars(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_samples=3, max_bytes=1 << 20) as writer:
        for i in range(7):
            writer.write(f"{i:08d}", png_bytes(id_image(i)), "png", i % 5)
    assert [(name, samples) for name, samples, _ in writer.shards] == [
        ("train-000000.tar", 3),
        ("train-000001.tar", 3),
        ("train-000002.tar", 1),
    ]
    assert all(size == (tmp_path / name).stat().st_size for name, _, size in writer.shards)
    # webdataset's own pipeline reads them as a WebDataset
    urls = [str(tmp_path / name) for name, _, _ in writer.shards]
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(7)]
    assert [int(s["cls"]) for s in samples] == [i % 5 for i in range(7)]
    assert [s["png"] for s in samples] == [png_bytes(id_image(i)) for i in range(7)]


def test_split_member_name():
    assert split_member_name("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    assert split_member_name("a.b/c.cls") == ("a.b/c", "cls")
    assert split_member_name("abc") == (None, "")
    assert split_member_name("dir/.hidden") == (None, "")
