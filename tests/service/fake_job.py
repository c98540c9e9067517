"""A stand-in for `python -m jobs train|sweep` in the service's Ray tests (the launcher and
reconciler paths, crash/restart and queue tests), so they run in seconds. It writes what the
training runtime writes (ROOT/RUN/metrics.jsonl, result.json; for sweeps sweep.json and each
trial's trials/trial-<id>/metrics.jsonl) and behaves as the spec's `name` asks:

- name starting "sleep<N>": run N seconds (one epoch per second) before succeeding;
- a name ending "-collapse" ("sleep3-collapse"): every epoch is flagged for rank-1 collapse,
  as the worker's live check flags it;
- "flaky": the first attempt exits 1 without result.json (an infrastructure-like death),
  the next one succeeds;
- "userfail": write result.json {"status": "failed"} and exit 1;
- "specfail": refuse the spec as `python -m jobs` does (field-path lines on stderr, exit 3);
- a sweep whose name starts with "live" ("livesleep8"): sweep.json is also rewritten each epoch
  with the live trial table, and the running trial's metrics.jsonl grows, as jobs/sweep.py
  does while a sweep runs (the rest of the name is read as above).

Like the real entrypoint it checks its spec URL and storage root against the process's URL
limits (jobs.contract.urls.check_url, TOPK_ALLOWED_*), exiting 2 when refused, and it records the
limits it was given in ROOT/RUN/env.json.

Invoked as: python fake_job.py -m jobs {train|sweep} --spec URL --run-name RUN --storage ROOT
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jobs.contract import exit_codes
from jobs.contract.urls import check_url

parser = argparse.ArgumentParser()
parser.add_argument("-m")
parser.add_argument("kind")
parser.add_argument("--spec", required=True)
parser.add_argument("--run-name", required=True)
parser.add_argument("--storage", required=True)
args = parser.parse_args()

try:
    check_url(args.spec)
    check_url(args.storage)
except ValueError as exc:
    print(f"error: cannot read spec {args.spec}: {exc}", file=sys.stderr, flush=True)
    sys.exit(exit_codes.USAGE)
run_dir = Path(args.storage) / args.run_name
limits = {name: os.environ.get(name) for name in ("TOPK_ALLOWED_PROTOCOLS", "TOPK_ALLOWED_ROOTS")}
(run_dir / "env.json").write_text(json.dumps(limits))
spec = json.loads((run_dir / "spec.json").read_text())
name = (spec.get("train", spec) if args.kind == "sweep" else spec).get("name") or ""
print(f"fake job {args.run_name} starting ({args.kind}, name={name!r})", flush=True)
print("\x1b[36m(FakeWorker pid=0)\x1b[0m a line coloured as Ray colours its workers'", flush=True)
with open(run_dir / "attempts.log", "a") as log:
    log.write(f"{time.time()}\n")
attempts = len((run_dir / "attempts.log").read_text().splitlines())
# Which Ray submission started this driver (the launcher's metadata): the crash tests count them.
job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
submission = (job_config.get("metadata") or {}).get("topk_submission", "?")
with open(run_dir / "submissions.log", "a") as log:
    log.write(f"{submission}\n")

if name == "specfail":
    print(f"{args.spec}: invalid spec (1 problem(s)):", file=sys.stderr)
    print("  loss.k: k + 1 must be at most data.num_classes", file=sys.stderr, flush=True)
    sys.exit(exit_codes.INVALID_SPEC)
if name == "flaky" and attempts == 1:
    print("simulated node loss", flush=True)
    sys.exit(1)
if name == "userfail":
    (run_dir / "result.json").write_text(
        json.dumps(
            {
                "status": "failed",
                "epochs": 0,
                "best": {},
                "best_epoch": None,
                "error": "data.train: no shards found",
            }
        )
    )
    sys.exit(1)

live_table = args.kind == "sweep" and name.startswith("live")
name = name.removeprefix("live") if live_table else name
collapsing = name.endswith("-collapse")  # "sleep3-collapse": every epoch flagged rank-1 collapse
name = name.removesuffix("-collapse")
seconds = int(name[5:]) if name.startswith("sleep") and name[5:].isdigit() else 1
for epoch in range(1, seconds + 1):
    time.sleep(1)
    record = {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "skipped": 0,
        "samples_per_second": 100.0,
        "val_top1": 0.1 * epoch,
        "val_top5": 0.2 * epoch,
        "val_macro_top5": 0.15 * epoch,
        "val_collapse_share": 0.95 if collapsing else 0.12,
        "val_collapse_class": 4,
        "collapse_warning": collapsing,
        "time": time.time(),
    }
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps(record) + "\n")
    if live_table:  # the live trial table, as jobs/sweep.py rewrites it while it runs
        live = [
            {"trial_id": "t0", "params": {"optim.lr": 0.1}, "status": "running",
             "metrics": {"epoch": epoch, "val_top5": 0.1 * epoch}},
            {"trial_id": "t1", "params": {"optim.lr": 0.01}, "status": "pending", "metrics": {}},
        ]  # fmt: skip
        table = {"metric": "val_top5", "mode": "max", "complete": False, "trials": live,
                 "best_params": None, "best_config": None}  # fmt: skip
        (run_dir / "sweep.json.tmp").write_text(json.dumps(table))
        (run_dir / "sweep.json.tmp").replace(run_dir / "sweep.json")
        running_trial = run_dir / "trials" / "trial-t0"  # its epochs so far, as at the end
        running_trial.mkdir(parents=True, exist_ok=True)
        with open(running_trial / "metrics.jsonl", "a") as metrics:
            line = {"epoch": epoch, "train_loss": 1.0 / epoch, "val_top5": 0.5 * epoch / seconds}
            metrics.write(json.dumps(line) + "\n")
    print(f"epoch {epoch} done", flush=True)
if args.kind == "sweep":
    trials = [
        {
            "trial_id": f"t{i}",
            "params": {"optim.lr": lr},
            "status": "TERMINATED",
            "metrics": {
                "epoch": seconds,
                "train_loss": 1.0 / (seconds + i),
                "val_top5": 0.5 + i / 10,
            },
        }
        for i, lr in enumerate((0.1, 0.01))
    ]
    for i, trial in enumerate(trials):  # each trial's own run, as jobs/sweep.py lays it out
        trial_dir = run_dir / "trials" / f"trial-{trial['trial_id']}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        epochs = [
            {
                "epoch": epoch,
                "train_loss": 1.0 / (epoch + i),
                "val_top5": (0.5 + i / 10) * epoch / seconds,
            }
            for epoch in range(1, seconds + 1)
        ]
        (trial_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (run_dir / "sweep.json").write_text(
        json.dumps(
            {
                "metric": "val_top5",
                "mode": "max",
                "trials": trials,
                "best_params": {"optim.lr": 0.01},
                "best_config": spec["train"],
            }
        )
    )
(run_dir / "result.json").write_text(
    json.dumps(
        {
            "status": "succeeded",
            "epochs": seconds,
            "best": {"val_top5": 0.2 * seconds},
            "best_epoch": seconds,
            "error": None,
        }
    )
)
print("fake job done", flush=True)
