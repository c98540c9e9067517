"""Bad data is skipped and counted per reason, fails past max_bad_fraction naming the shard, and
`inspect` lists it. Every case is a crafted tar written to tmp_path."""

from __future__ import annotations

import pytest
from reference_data import ID_CLASSES, ID_IMAGE_SIZE, id_image, ids_from_batch, png_bytes, tar_bytes

from jobs.contract.data import DataSpec
from jobs.contract.dataset_info import DatasetInfo, ShardEntry, write_dataset_info
from jobs.data.inspection import inspect_dataset
from jobs.data.pipeline import DataPipelineError, build_eval_loader, build_train_loader
from jobs.data.shard_format import SKIP_REASONS

GOOD = 10  # good samples per crafted shard, ids 0..9


def good_members(first_id: int = 0, count: int = GOOD) -> list[tuple[str, bytes]]:
    members = []
    for i in range(first_id, first_id + count):
        members += [(f"s{i:03d}.png", png_bytes(id_image(i))), (f"s{i:03d}.cls", b"%d" % (i % 5))]
    return members


def truncated_png() -> bytes:
    data = png_bytes(id_image(999))
    return data[: len(data) // 2]


BAD_CASES = {
    "bad_image": [("bad.png", truncated_png()), ("bad.cls", b"1")],
    "missing_image": [("bad.cls", b"1")],
    "missing_label": [("bad.png", png_bytes(id_image(998)))],
    "bad_label": [("bad.png", png_bytes(id_image(998))), ("bad.cls", b"one")],
    "label_out_of_range": [("bad.png", png_bytes(id_image(998))), ("bad.cls", b"7")],
}


def spec_for(urls: list[str], **overrides) -> DataSpec:
    fields = {
        "train": urls,
        "val": urls,
        "num_classes": ID_CLASSES,
        "image_size": ID_IMAGE_SIZE,
        "channels": 1,
        "augment": {"random_resized_crop": False, "hflip": False, "mean": [0.0], "std": [1.0]},
        "loader_workers": 0,
        "max_bad_fraction": 1.0,
        "samples_per_epoch": 10,
    }
    return DataSpec(**{**fields, **overrides})


def evaluate(spec: DataSpec):
    loader = build_eval_loader(spec, batch_size=4, rank=0, world_size=1)
    ids = [i for images, _ in loader for i in ids_from_batch(images)]
    return ids, loader.stats


def only(reason: str, count: int = 1) -> dict[str, int]:
    return {r: (count if r == reason else 0) for r in SKIP_REASONS}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_sample_is_skipped_and_counted(tmp_path, reason):
    shard = tmp_path / "shard.tar"
    members = good_members(0, 5) + BAD_CASES[reason] + good_members(5, 5)
    shard.write_bytes(tar_bytes(members))
    ids, stats = evaluate(spec_for([str(shard)]))
    assert sorted(ids) == list(range(GOOD)) and stats.samples == GOOD
    assert stats.skipped == only(reason)

    # 1 bad of 11 is past a 5 % threshold: the pass fails, naming the shard and the reason
    with pytest.raises(DataPipelineError, match=f"data.val: shard {shard}: 1 of 11 .*{reason}=1"):
        evaluate(spec_for([str(shard)], max_bad_fraction=0.05))
    assert evaluate(spec_for([str(shard)], max_bad_fraction=0.1))[1].skipped == only(reason)


def test_non_contiguous_key(tmp_path):
    shard = tmp_path / "shard.tar"
    members = good_members(0, 10)
    members.append(("s003.png", png_bytes(id_image(3))))  # s003 again, after other keys
    shard.write_bytes(tar_bytes(members))
    ids, stats = evaluate(spec_for([str(shard)]))
    assert sorted(ids) == list(range(10)) and stats.skipped == only("non_contiguous_key")


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    data = tar_bytes(good_members(0, 10))
    shard = tmp_path / "shard.tar"
    # cut inside member data, inside a header, and exactly at a member boundary
    for cut in (len(data) // 2 + 100, len(data) // 2 + 512 * 3 + 7, 512 * 4 * 4):
        shard.write_bytes(data[:cut])
        ids, stats = evaluate(spec_for([str(shard)]))
        assert ids and sorted(ids) == list(range(len(ids))) and len(ids) < 10, cut
        assert stats.skipped == only("truncated_tar"), cut

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive" * 50)
    with pytest.raises(DataPipelineError, match=f"shard {garbage}: .*truncated_tar"):
        evaluate(spec_for([str(garbage)], max_bad_fraction=0.5))


def test_shard_shorter_than_dataset_json_counts_the_lost_samples(tmp_path):
    (tmp_path / "val-0.tar").write_bytes(tar_bytes(good_members(0, 6)))
    info = DatasetInfo(
        num_classes=ID_CLASSES,
        class_names=[str(i) for i in range(ID_CLASSES)],
        class_counts={"val": [2] * ID_CLASSES},
        num_samples={"val": 10},
        shards={"val": [ShardEntry("val-0.tar", 10)]},
    )
    write_dataset_info(info, str(tmp_path))
    ids, stats = evaluate(spec_for([], val=str(tmp_path), train=str(tmp_path)))
    assert sorted(ids) == list(range(6)) and stats.skipped == only("truncated_tar", 4)
    with pytest.raises(DataPipelineError, match="4 of 10 samples are bad"):
        evaluate(spec_for([], val=str(tmp_path), train=str(tmp_path), max_bad_fraction=0.2))
    report = inspect_dataset(str(tmp_path))
    assert not report.ok and report.bad[0].reason == "truncated_tar"


def test_counts_are_summed_across_dataloader_workers(tmp_path):
    """One bad sample of each kind, spread over 5 shards read by 2 worker processes."""
    urls = []
    for n, reason in enumerate(sorted(BAD_CASES)):
        shard = tmp_path / f"shard-{n}.tar"
        shard.write_bytes(tar_bytes(good_members(10 * n, 10) + BAD_CASES[reason]))
        urls.append(str(shard))
    ids, stats = evaluate(spec_for(urls, loader_workers=2))
    assert sorted(ids) == list(range(50))
    assert stats.skipped == {r: int(r in BAD_CASES) for r in SKIP_REASONS}

    loader = build_train_loader(
        spec_for(urls, loader_workers=2, samples_per_epoch=50),
        batch_size=5,
        rank=0,
        world_size=1,
        epoch=0,
        seed=0,
    )
    assert sum(1 for _ in loader) == 10
    # a worker short of samples reads its shards again, counting their bad samples again
    assert loader.stats.samples == 50
    assert {r for r, n in loader.stats.skipped.items() if n} <= set(BAD_CASES)
    assert 1 <= loader.stats.skipped_total <= 2 * len(BAD_CASES)


def test_train_fails_past_the_threshold_through_a_worker(tmp_path):
    shard = tmp_path / "shard.tar"
    shard.write_bytes(tar_bytes(good_members(0, 3) + BAD_CASES["label_out_of_range"]))
    loader = build_train_loader(
        spec_for([str(shard)], loader_workers=1, max_bad_fraction=0.1),
        batch_size=2,
        rank=0,
        world_size=1,
        epoch=0,
        seed=0,
    )
    with pytest.raises(DataPipelineError, match=f"data.train: shard {shard}: 1 of 4"):
        list(loader)


@pytest.mark.parametrize("reason", ["missing_label", "bad_image"])
def test_shard_without_any_good_sample_fails_training(tmp_path, reason):
    """Even when every bad sample is tolerated (max_bad_fraction 1), training cannot hang."""
    shard = tmp_path / "shard.tar"
    shard.write_bytes(tar_bytes(BAD_CASES[reason]))
    loader = build_train_loader(
        spec_for([str(shard)]), batch_size=2, rank=0, world_size=1, epoch=0, seed=0
    )
    with pytest.raises(DataPipelineError, match="no readable samples"):
        list(loader)


def test_inspect_lists_every_bad_sample_with_shard_and_key(tmp_path):
    members = good_members(0, 3)
    for reason, bad in BAD_CASES.items():
        members += [(name.replace("bad", f"bad_{reason}"), data) for name, data in bad]
    (tmp_path / "val-0.tar").write_bytes(tar_bytes(members))
    count = 3 + len(BAD_CASES)
    info = DatasetInfo(
        num_classes=ID_CLASSES,
        class_names=[str(i) for i in range(ID_CLASSES)],
        class_counts={"val": [1, 1, 1, 0, 0]},
        num_samples={"val": count},
        shards={"val": [ShardEntry("val-0.tar", count)]},
    )
    write_dataset_info(info, str(tmp_path))
    report = inspect_dataset(str(tmp_path))
    assert report.splits["val"].samples == 3
    assert {(b.key, b.reason) for b in report.bad} == {(f"bad_{r}", r) for r in BAD_CASES}
    assert all(b.shard == str(tmp_path / "val-0.tar") for b in report.bad)


def test_gzipped_shards_read_through_a_brace_pattern(tmp_path):
    import gzip

    for n in range(3):
        (tmp_path / f"part-{n}.tar.gz").write_bytes(gzip.compress(tar_bytes(good_members(10 * n))))
    pattern = str(tmp_path / "part-{0..2}.tar.gz")
    ids, stats = evaluate(spec_for(pattern))
    assert sorted(ids) == list(range(30)) and stats.skipped_total == 0
