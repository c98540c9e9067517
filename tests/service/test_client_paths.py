"""`topk submit` sends specs whose relative local paths mean what they meant to the user."""

from service.client_cli import absolutize_local_paths


def test_relative_local_paths_become_absolute_against_the_client_directory():
    raw = {
        "data": {"train": "runs/data/o/dataset.json", "val": ["a/val-0.tar", "/abs/val-1.tar"]},
        "model": {"arch": "resnet18", "pretrained": "weights/r18.pt"},
        "storage": "./runs",
        "loss": {"name": "cross_entropy"},
    }
    out = absolutize_local_paths(raw, kind="train", cwd="/home/me/project")
    assert out["data"]["train"] == "/home/me/project/runs/data/o/dataset.json"
    assert out["data"]["val"] == ["/home/me/project/a/val-0.tar", "/abs/val-1.tar"]
    assert out["model"]["pretrained"] == "/home/me/project/weights/r18.pt"
    assert out["storage"] == "/home/me/project/runs"
    assert raw["data"]["train"] == "runs/data/o/dataset.json"  # the input is not modified


def test_urls_absolute_paths_and_sweeps():
    raw = {
        "train": {
            "data": {"train": "s3://bucket/train-{000..009}.tar", "val": "file:///x/val.tar"},
            "storage": "/srv/runs",
        },
        "search": {"loss.epsilon": {"grid": [0.1, 1.0]}},
    }
    out = absolutize_local_paths(raw, kind="sweep", cwd="/w")
    assert out == raw
    raw["train"]["data"]["train"] = "shards/train.tar"
    assert absolutize_local_paths(raw, kind="sweep", cwd="/w")["train"]["data"]["train"] == (
        "/w/shards/train.tar"
    )


def test_malformed_specs_pass_through_for_the_server_to_reject():
    for raw in ([1, 2], {"data": "nope"}, {"train": 3}, {"data": {"train": 5}}):
        assert absolutize_local_paths(raw, kind="train", cwd="/w") == raw
    assert absolutize_local_paths({"train": 3}, kind="sweep", cwd="/w") == {"train": 3}
