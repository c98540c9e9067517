"""Shards made by other tools in the WebDataset convention, written here with webdataset's own
writers: `.cls` labels or a `.json` label field, no dataset.json (brace URLs); and proof that
webdataset's URL opener (`gopen`, which runs `pipe:` commands and curl) is never reached."""

from __future__ import annotations

import http.server
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from reference_data import ID_CLASSES, ID_IMAGE_SIZE, id_image, ids_from_batch, png_bytes

from jobs.contract.data import DataSpec
from jobs.contract.dataset_info import DatasetInfo, ShardEntry, write_dataset_info
from jobs.data.pipeline import build_eval_loader, build_train_loader
from jobs.data.writer import build_shards
from service.cli import main as topk_main

IDENTITY = {"random_resized_crop": False, "hflip": False, "mean": [0.0], "std": [1.0]}


def spec_for(train, val=None, **overrides) -> DataSpec:
    fields = {
        "train": train,
        "val": val if val is not None else train,
        "num_classes": ID_CLASSES,
        "image_size": ID_IMAGE_SIZE,
        "channels": 1,
        "augment": IDENTITY,
        "loader_workers": 0,
        "shuffle_buffer": 8,
    }
    return DataSpec(**{**fields, **overrides})


def write_with_shardwriter(folder: Path, count: int, per_shard: int) -> str:
    """`count` id samples as webdataset's ShardWriter writes them from Python objects (a PIL
    image, an int label); returns the brace URL of the shards. No dataset.json."""
    folder.mkdir()
    pattern = str(folder / "part-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            image = Image.fromarray(id_image(i))
            sink.write({"__key__": f"sample{i:05d}", "png": image, "cls": i % ID_CLASSES})
    last = -(-count // per_shard) - 1
    assert not (folder / "dataset.json").exists()
    return str(folder / f"part-{{000000..{last:06d}}}.tar")


def eval_ids(spec: DataSpec, world_size: int = 1) -> tuple[Counter, int]:
    seen, skipped = Counter(), 0
    for rank in range(world_size):
        loader = build_eval_loader(spec, batch_size=8, rank=rank, world_size=world_size)
        for images, labels in loader:
            ids = ids_from_batch(images)
            assert labels.tolist() == [i % ID_CLASSES for i in ids]
            seen.update(ids)
        skipped += loader.stats.skipped_total
    return seen, skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_a_brace_url_without_dataset_json(tmp_path, workers):
    """ShardWriter shards (.cls labels), 45 samples in 7 shards: a brace URL and
    samples_per_epoch say enough for DDP training; evaluation is exact across ranks."""
    pattern = write_with_shardwriter(tmp_path / "shards", 45, per_shard=7)
    spec = spec_for(pattern, samples_per_epoch=40, loader_workers=workers)
    seen = []
    for rank in range(2):
        loader = build_train_loader(spec, batch_size=5, rank=rank, world_size=2, epoch=0, seed=0)
        batches = 0
        for images, labels in loader:
            ids = ids_from_batch(images)
            assert labels.tolist() == [i % ID_CLASSES for i in ids]
            seen += ids
            batches += 1
        assert batches == len(loader) == 4  # 40 // (5 x 2), the same on both ranks
        assert loader.stats.skipped_total == 0
    assert len(seen) == 40 and set(seen) <= set(range(45))
    assert eval_ids(spec, world_size=3) == (Counter(range(45)), 0)


def test_json_labels_with_a_label_key(tmp_path):
    """TarWriter shards whose label is a field of `.json` (jpg and png images): read with
    data.label_key; the default key finds no label and says so, counted per sample."""
    folder = tmp_path / "json"
    folder.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(folder / f"shard-{shard}.tar")) as sink:
            for i in range(10 * shard, 10 * shard + 10):
                sample = {"__key__": f"{i:04d}", "json": {"class_id": i % 5, "caption": "x"}}
                if i % 2:
                    sample["jpg"] = Image.fromarray(np.full((16, 16), 40 * (i % 5), np.uint8))
                else:
                    sample["png"] = png_bytes(id_image(i))
                sink.write(sample)
    pattern = str(folder / "shard-{0..1}.tar")
    spec = spec_for(pattern, label_key="class_id", max_bad_fraction=0.0)
    loader = build_eval_loader(spec, batch_size=4, rank=0, world_size=1)
    labels = [label for _, batch in loader for label in batch.tolist()]
    assert Counter(labels) == Counter(i % 5 for i in range(20))
    assert loader.stats.samples == 20 and loader.stats.skipped_total == 0

    unlabelled = build_eval_loader(
        spec_for(pattern, max_bad_fraction=1.0), batch_size=4, rank=0, world_size=1
    )
    assert list(unlabelled) == []
    assert unlabelled.stats.skipped["missing_label"] == 20


def test_label_key_in_the_spec_and_in_inspect(tmp_path, capsys):
    assert spec_for("x.tar").label_key == "label"  # specs without it validate as before
    with pytest.raises(ValueError, match="label_key"):
        spec_for("x.tar", label_key="")
    # a dataset.json over TarWriter shards with .json labels: `topk shards inspect --label-key`
    with wds.TarWriter(str(tmp_path / "val-0.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"{i}", "png": png_bytes(id_image(i)), "json": {"y": i % 3}})
    info = DatasetInfo(
        num_classes=3,
        class_names=["a", "b", "c"],
        class_counts={"val": [2, 2, 2]},
        num_samples={"val": 6},
        shards={"val": [ShardEntry("val-0.tar", 6)]},
    )
    write_dataset_info(info, str(tmp_path))
    assert topk_main(["shards", "inspect", str(tmp_path), "--quiet", "--label-key", "y"]) == 0
    assert "6 good samples of 6 listed" in capsys.readouterr().out
    assert topk_main(["shards", "inspect", str(tmp_path), "--quiet"]) == 1
    assert "missing_label" in capsys.readouterr().out


def test_our_shards_and_webdataset_shards_read_alike(tmp_path, id_dataset):
    """The same samples through our writer and through webdataset's: the same ids."""
    ours = spec_for(str(id_dataset))
    ids, _ = eval_ids(ours)
    folder = tmp_path / "theirs"
    folder.mkdir()
    with wds.TarWriter(str(folder / "val-0.tar")) as sink:
        for i in sorted(ids):
            sink.write({"__key__": f"x{i}", "png": png_bytes(id_image(i)), "cls": i % 5})
    assert eval_ids(spec_for(str(folder / "val-0.tar"))) == (ids, 0)


# --- webdataset's gopen is never reached ------------------------------------------------------

_SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork"}
)
_spawned: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _spawned is not None and event in _SPAWN_EVENTS:
        _spawned.append(f"{event} {args!r}"[:200])


@pytest.fixture(scope="module", autouse=True)
def _audit_hook():
    sys.addaudithook(_audit)  # stays for the process; records only while a test asks


@pytest.fixture
def spawned():
    """The processes started (or forked, or exec'd) in this process during the test."""
    global _spawned
    _spawned = []
    yield _spawned
    _spawned = None


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (the http.server API)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on localhost serving tmp_path/www; yields (base URL, requests)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_RecordingHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", root, requests
    finally:
        server.shutdown()
        server.server_close()


def test_reads_run_no_process_and_pipe_urls_are_refused(tmp_path, id_dataset, spawned):
    # a whole read: train and eval, local shards, in process
    spec = spec_for(str(id_dataset))
    assert eval_ids(spec)[0]
    assert sum(
        1 for _ in build_train_loader(spec, batch_size=4, rank=0, world_size=1, epoch=0, seed=0)
    )
    assert spawned == []

    # `pipe:` in the spec: refused by the spec, and by the loader if the spec is not validated
    marker = tmp_path / "ran"
    command = f"pipe:touch {marker}"
    with pytest.raises(ValueError, match="pipe:"):
        spec_for([command])
    raw = spec_for(str(id_dataset)).model_copy(update={"val": [command], "train": [command]})
    with pytest.raises(ValueError, match="data.val: refused URL 'pipe:"):
        build_eval_loader(raw, batch_size=4, rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.train: refused URL 'pipe:"):
        build_train_loader(raw, batch_size=4, rank=0, world_size=1, epoch=0, seed=0)

    # `pipe:` as a shard of a dataset.json the spec points to
    folder = tmp_path / "hostile"
    info = DatasetInfo(
        num_classes=ID_CLASSES,
        class_names=[str(c) for c in range(ID_CLASSES)],
        class_counts={"val": [1] * ID_CLASSES},
        num_samples={"val": ID_CLASSES},
        shards={"val": [ShardEntry(command, ID_CLASSES)]},
    )
    write_dataset_info(info, str(folder))
    with pytest.raises(ValueError, match="data.val: refused URL 'pipe:"):
        build_eval_loader(spec_for(str(folder)), batch_size=4, rank=0, world_size=1)

    # and as the output of the shard writer
    with pytest.raises(ValueError, match="pipe:"):
        build_shards(str(id_dataset), f"pipe:cat > {marker}", progress=None)
    assert not marker.exists() and spawned == []


def test_a_url_that_gopen_would_fetch_is_refused_untouched(http_folder, spawned):
    """webdataset's gopen fetches http:// with a curl process; the allow-list has https only,
    so the request never leaves: no process, no request at the server."""
    base, root, requests = http_folder
    with wds.TarWriter(str(root / "val-0.tar")) as sink:
        sink.write({"__key__": "a", "png": png_bytes(id_image(1)), "cls": 1})
    url = f"{base}/val-0.tar"
    with pytest.raises(ValueError, match=f"data.val: refused URL '{url}': protocol 'http'"):
        build_eval_loader(spec_for([url]), batch_size=4, rank=0, world_size=1)
    assert requests == [] and spawned == []
    # the server works: the same file, fetched with the standard library
    from urllib.request import urlopen

    with urlopen(url) as response:
        assert response.read() == (root / "val-0.tar").read_bytes()
    assert requests == ["/val-0.tar"]
