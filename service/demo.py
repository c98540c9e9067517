"""`topk demo`: the whole product in one command, on long-tailed Fashion-MNIST.

1. finds Fashion-MNIST (Debian's dataset-fashion-mnist, else downloads the official files and
   checks their checksums) and writes long-tailed shards with the data layer's writer;
2. starts the embedded service (`topk serve`: local Ray head, SQLite, local storage);
3. submits over HTTP a cross-entropy job and a noised_topk_imbalanced job (with the
   cross-entropy warm-up the evidence report supports), at the settings and learning rates of the
   report's long-tail arm (docs/results.md), follows them, and prints top-1, top-K, macro top-K
   and the rank-1 collapse share side by side, then what the study concluded.
Sized to finish in under 10 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jobs.contract import exit_codes
from jobs.contract.cli import whole_number
from service.job_status import TERMINAL

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# sha256 of the decompressed IDX files (the official .gz files and Debian's recompressed ones
# differ, their contents do not).
IDX_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# The settings of the evidence report's long-tail arm (docs/results.md, experiments/paper-cpu.yaml:
# Fashion-MNIST-LT at ratio 100, K = 2, convnet_small, 12 epochs), each loss at the learning
# rate the study selected for it on the validation split of seed 0.
K = 2
IMBALANCE_RATIO = 100
MAX_PER_CLASS = 2000  # 1,800 down to 18 training images a class, 200 validation images a class
VAL_FRACTION = 0.1
EPOCHS = 12
# (label, loss, learning rate). Trained from scratch on this long tail, the paper's imbalanced
# loss alone collapsed or never trained in 2 of the study's 3 seeds at its selected rate; two
# epochs of cross-entropy first (`ce_warmup_epochs`, the remedy the study tested) avoided it in
# all 3. Cross-entropy beside it, as the baseline to beat.
LOSSES = (
    ("cross_entropy", {"name": "cross_entropy"}, 1.0),
    (
        "noised_topk_imbalanced",
        {
            "name": "noised_topk_imbalanced", "k": K, "epsilon": 0.01, "max_m": 0.2,
            "scale": 60.0, "n_samples": 5, "ce_warmup_epochs": 2,
        },
        0.01,
    ),
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="long-tailed Fashion-MNIST: cross-entropy vs noised_topk_imbalanced, end to end",
    )
    demo.add_argument("--data-dir", default=".topk-demo", help="default: %(default)s")
    demo.add_argument(
        "--epochs",
        type=whole_number(3, 200),
        default=EPOCHS,
        help="default: %(default)s (at least 3: the imbalanced loss starts after 2 epochs of "
        "cross-entropy)",
    )
    demo.add_argument("--port", type=int, default=0, help="service port (default: a free one)")
    demo.set_defaults(handler=run_demo)


def locate_fashion_mnist(cache_dir: Path, log=print) -> Path:
    """A folder holding the four Fashion-MNIST IDX files, checked; downloads when needed.
    Raises RuntimeError when they can be neither found nor downloaded intact."""
    import urllib.request

    if all((DEBIAN_DIR / name).exists() for name in IDX_SHA256):
        log(f"Fashion-MNIST: {DEBIAN_DIR} (Debian's dataset-fashion-mnist)")
        return DEBIAN_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, expected in IDX_SHA256.items():
        target = cache_dir / name
        if target.exists() and _idx_sha256(target) == expected:
            continue
        log(f"downloading {OFFICIAL_URL}{name} ...")
        partial = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(OFFICIAL_URL + name, timeout=60) as response:  # noqa: S310
                partial.write_bytes(response.read())
        except OSError as exc:
            raise RuntimeError(
                f"cannot download Fashion-MNIST ({exc}); install it with "
                "`apt-get install dataset-fashion-mnist`"
            ) from None
        if _idx_sha256(partial) != expected:
            partial.unlink()
            raise RuntimeError(f"{name}: checksum mismatch, download refused")
        partial.rename(target)
    log(f"Fashion-MNIST: {cache_dir} (downloaded, checksums verified)")
    return cache_dir


def _idx_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with gzip.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_shards(source: Path, out: Path, log=print) -> Path:
    """Long-tailed train split (class 0 keeps 1,800 images, the last one 1/100 of that) and a
    balanced validation split of 200 per class. Reuses shards already written."""
    dataset_json = out / "dataset.json"
    if dataset_json.exists():
        log(f"shards: {out} (already written)")
        return dataset_json
    # The runtime's own command writes them (`topk shards build`, an argument list, no shell):
    # the service reaches the runtime through its commands and the contract package only.
    command = [
        sys.executable, "-m", "service.cli", "shards", "build", str(source), str(out),
        "--seed", "0", "--val-fraction", str(VAL_FRACTION), "--max-per-class", str(MAX_PER_CLASS),
        "--imbalance-ratio", str(IMBALANCE_RATIO),
        "--class-names", ",".join(FASHION_MNIST_CLASSES), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"writing the demo's shards failed: {reason}")
    log(done.stdout.strip())
    return dataset_json


def demo_spec(dataset_json: Path, name: str, loss: dict, lr: float, epochs: int) -> dict:
    """The training spec of one demo job: the study's long-tail arm (its `training` block)."""
    return {
        "name": name,
        "data": {
            "train": str(dataset_json), "val": str(dataset_json), "num_classes": 10,
            "image_size": 28, "channels": 1, "loader_workers": 0, "shuffle_buffer": 2000,
            "augment": {"random_resized_crop": True, "crop_scale_min": 0.7, "hflip": False},
        },
        "model": {"arch": "convnet_small"},
        "loss": loss,
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "epochs": epochs,
        "batch_size": 64,
        "metrics": {"ks": [1, K], "select": f"val_macro_top{K}"},
        "scaling": {"num_workers": 1},
    }  # fmt: skip


def run_demo(args) -> int:
    from service.client import ServiceClient, ServiceError
    from service.local_ray import free_port
    from service.settings import Settings
    from service.store import Store

    started = time.monotonic()
    data_dir = Path(args.data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        source = locate_fashion_mnist(data_dir / "fashion-mnist")
        dataset_json = make_shards(
            source, data_dir / "shards" / f"fashion_mnist_lt{IMBALANCE_RATIO}"
        )
    except (RuntimeError, ValueError) as exc:
        print(f"topk: error: {exc}", file=sys.stderr)
        return exit_codes.FAILED

    settings = Settings.from_env({"TOPK_DATA_DIR": str(data_dir)})
    store = Store.from_url(settings.database_url)
    store.migrate()
    token = store.create_token("demo")
    store.close()
    port = args.port or free_port()
    log_path = data_dir / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPK_")}
    env["TOPK_DATA_DIR"] = str(data_dir)
    print(f"starting the service on port {port} (local Ray head; log: {log_path}) ...")
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
             "--data-dir", str(data_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        with ServiceClient(f"http://127.0.0.1:{port}", token) as client:
            if not _wait_ready(client, server):
                print(f"topk: error: the service did not start; see {log_path}", file=sys.stderr)
                return exit_codes.FAILED
            jobs = {}
            for label, loss, lr in LOSSES:
                name = f"demo-{label.replace('_', '-')}"
                spec = demo_spec(dataset_json, name, loss, lr, args.epochs)
                jobs[label] = client.submit(spec)["id"]
                print(f"submitted {label:<24} as {jobs[label]}")
            final = _follow(client, jobs, args.epochs)
    except ServiceError as exc:
        print(f"topk: error: {exc}", file=sys.stderr)
        return exit_codes.FAILED
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn stops, then `serve` stops its Ray head
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    _print_comparison(final)
    print(
        f"\ndemo finished in {time.monotonic() - started:.0f} s; the runs are in {data_dir / 'runs'}"
    )
    succeeded = all(job["status"] == "succeeded" for job in final.values())
    return exit_codes.OK if succeeded else exit_codes.FAILED


def _wait_ready(client, server: subprocess.Popen, timeout: float = 180.0) -> bool:
    from service.client import ServiceError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            client.ready()
            return True
        except ServiceError:
            time.sleep(1.0)
    return False


def _follow(client, jobs: dict[str, str], epochs: int) -> dict[str, dict]:
    """Poll until both jobs end, printing each new epoch."""
    shown: dict[str, tuple] = {}
    final: dict[str, dict] = {}
    while len(final) < len(jobs):
        for label, job_id in jobs.items():
            if label in final:
                continue
            job = client.get(job_id)
            metrics = job.get("latest_metrics") or {}
            state = (job["status"], metrics.get("epoch"))
            if state != shown.get(label):
                shown[label] = state
                line = f"{label:<24} {job['status']:<9}"
                if metrics:
                    line += (
                        f" epoch {metrics['epoch']}/{epochs}  top-1 {metrics.get('val_top1', 0):.3f}"
                        f"  top-{K} {metrics.get(f'val_top{K}', 0):.3f}"
                        f"  macro top-{K} {metrics.get(f'val_macro_top{K}', 0):.3f}"
                        f"  collapse {metrics.get('val_collapse_share', float('nan')):.2f}"
                    )
                    if metrics.get("collapse_warning"):
                        line += "  <- rank-1 collapse warning"
                print(line, flush=True)
            if job["status"] in TERMINAL:
                if job["status"] != "succeeded":
                    print(f"{label}: {job['status_reason']}", file=sys.stderr)
                final[label] = job
        time.sleep(3.0)
    return final


def _print_comparison(final: dict[str, dict]) -> None:
    print(
        f"\nFashion-MNIST-LT (imbalance {IMBALANCE_RATIO}), balanced validation split, last epoch "
        "(collapse: the share of images whose top-1 is the most-predicted class; 0.1 is even):"
    )
    header = f"{'loss':<24} {'top-1':>7} {f'top-{K}':>7} {f'macro top-{K}':>13} {'collapse':>9}"
    print(header)
    print("-" * len(header))
    for label in [label for label, _, _ in LOSSES if label in final]:
        job = final[label]
        metrics = job.get("latest_metrics") or {}
        if job["status"] != "succeeded" or not metrics:
            print(f"{label:<24} {job['status']}")
            continue
        print(
            f"{label:<24} {metrics.get('val_top1', float('nan')):>7.3f} "
            f"{metrics.get(f'val_top{K}', float('nan')):>7.3f} "
            f"{metrics.get(f'val_macro_top{K}', float('nan')):>13.3f} "
            f"{metrics.get('val_collapse_share', float('nan')):>9.2f}"
        )
    for label, job in final.items():
        for warning in job.get("warnings") or []:
            print(f"{label}: {warning}")
    print(EVIDENCE)


EVIDENCE = """
What the study behind this demo found (docs/results.md; `make results` reruns it):
- on this long tail, trained from scratch, noised_topk_imbalanced alone collapses or trails;
  two epochs of cross-entropy first (loss.ce_warmup_epochs: 2, used above) keep it from
  collapsing, but it still ends below cross-entropy at this budget;
- logit-adjusted cross-entropy (loss.name: logit_adjusted) was the strongest loss there;
- with label noise on Omniglot (top-5 of 136), noised_topk matched cross-entropy on clean labels
  and fell behind it under noise;
- the paper's own setting fine-tunes a pretrained ResNet-50 for 30 epochs
  (examples/plantnet300k_*.yaml), which this demo does not test.
Watch `collapse` in your own runs: the service warns when one class takes over top-1."""
