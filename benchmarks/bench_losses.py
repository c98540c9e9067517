"""Forward+backward time and peak extra memory of every registered loss, as ratios to cross-entropy.

"x CE" is relative to torch.nn.functional.cross_entropy on the same scores (no input checks): the
registered cross_entropy row shows what our input checks add.

Usage: python benchmarks/bench_losses.py [--quick] [--B 256] [--C 1000 100000] [--k 5]
           [--loss noised_topk materialising] [--sampler lazy] [--realistic] [--dtype bfloat16]
           [--threads 1] [--budget 2]

For each (B, C, k) the program builds one batch of scores [B, C] and labels and measures, for each
loss, forward + backward of the scalar loss:
- time: the median over repetitions, each repetition timing the loss and cross-entropy back to back
  on the same inputs (so the ratio survives the load of a shared machine), default allocator.
  With one CPU thread (the default) the clock is the process's CPU time (user + system, page
  faults included), which other processes' load does not inflate; otherwise wall time;
- peak extra memory: in a child process per (B, C, k), the peak resident set size during a
  forward + backward (after a warm-up one) minus the resident size just before (Linux: writing 5 to
  /proc/self/clear_refs resets the peak, VmHWM in /proc/self/status). The child runs with glibc's
  mmap threshold fixed at 64 KiB, so every tensor is its own mapping, returned to the system when
  freed: the peak counts what the loss allocates (the scores' gradient included), not memory
  that an earlier case left in malloc's free lists;
  with --device cuda, torch.cuda.max_memory_allocated above the allocated bytes before;
- finite: the loss and the gradient are finite.
"materialising" is the noised top-K loss written from the math the way the public reference does:
(B, C, n_samples) noise and perturbed tensors, kthvalue, and a (B, C, n_samples) zeros tensor
scattered with the one-hot indices, kept for the backward. Noised losses use n_samples=5.
Scores: N(0, 1) like an untrained model's, or N(0, 5^2) with --realistic (a trained model's
spread; epsilon is 1 either way). The cosine losses get (scores / (3 std)).clamp(-1, 1), and the
class-count losses Zipf counts 1000 / (j + 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import topk

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
DEFAULT_B = [64, 256]
DEFAULT_C = [100, 1000, 10000, 100000]
DEFAULT_K = [1, 5, 20]
QUICK = {"B": [64], "C": [100, 1000], "k": [5]}
N_SAMPLES = 5
MATERIALISING = "materialising"
# The denominator of every ratio: torch's own cross-entropy, with no input checks.
REFERENCE = "torch_cross_entropy"
K_FREE = {"cross_entropy", "focal", "ldam", "logit_adjusted"}  # losses without a k


class MaterialisingKthLargest(torch.autograd.Function):
    """The smoothed (k)-th largest entry per row, materialising (B, C, n_samples) tensors."""

    @staticmethod
    def forward(ctx, scores, kth, epsilon, n_samples):  # type: ignore[override]
        batch, num_classes = scores.shape
        noise = torch.randn(batch, num_classes, n_samples, dtype=scores.dtype, device=scores.device)
        perturbed = scores[:, :, None] + epsilon * noise
        # the kth largest is the (C - kth + 1)-th smallest
        values, indices = perturbed.kthvalue(num_classes - kth + 1, dim=1)  # [B, n_samples]
        one_hot = torch.zeros_like(noise)
        one_hot.scatter_(1, indices[:, None, :], 1.0)
        ctx.save_for_backward(one_hot)
        return values.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (one_hot,) = ctx.saved_tensors
        return grad_output[:, None] * one_hot.mean(dim=2), None, None, None


def materialising_noised_topk(scores, labels, *, k: int, epsilon: float = 1.0):
    """mean over the batch of (1 + top_{k+1,eps}(s) - s_y)_+, the reference's way."""
    kth = MaterialisingKthLargest.apply(scores, k + 1, epsilon, N_SAMPLES)
    true_scores = scores.gather(1, labels[:, None]).squeeze(1)
    return torch.relu(1.0 + kth - true_scores).mean()


def build_loss(name: str, *, num_classes: int, k: int, sampler: str) -> Callable:
    if name == MATERIALISING:
        return lambda scores, labels: materialising_noised_topk(scores, labels, k=k)
    if name == REFERENCE:
        return lambda scores, labels: torch.nn.functional.cross_entropy(scores, labels)
    cls = topk.get_loss_class(name)
    params: dict[str, object] = {}
    if name not in K_FREE:
        params["k"] = k
    if name in ("noised_topk", "noised_topk_imbalanced"):
        params.update(n_samples=N_SAMPLES, sampler=sampler)
    if name == "noised_topk":
        params["epsilon"] = 1.0
    if cls.needs_class_counts:
        params["class_counts"] = [max(1, 1000 // (j + 1)) for j in range(num_classes)]
    loss = topk.create_loss(name, **params)
    return lambda scores, labels: loss(scores, labels)


def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_extra(step: Callable[[], None]) -> int:
    """Bytes of peak memory above the level before `step` runs (after one warm-up run, so
    one-time initialisation is not counted)."""
    step()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # the --device cuda run
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current resident size
    before = read_status_kib("VmRSS")
    step()
    return (read_status_kib("VmHWM") - before) * 1024


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# The clock for timings: wall time by default; main() switches to the process's CPU time for
# single-threaded CPU runs, which other processes' load on a shared machine does not inflate.
CLOCK = {"now": time.perf_counter}


def time_once(step: Callable[[], None], inner: int) -> float:
    synchronize()
    start = CLOCK["now"]()
    for _ in range(inner):
        step()
    synchronize()
    return (CLOCK["now"]() - start) / inner


def prepare_step(name, templates, labels, *, k, sampler):
    """A closure running forward + backward of `name` once, and a dict it records finiteness in."""
    is_cosine = name in topk.list_losses() and topk.get_loss_class(name).needs_cosine_head
    base = templates["cosine" if is_cosine else "plain"]
    loss_fn = build_loss(name, num_classes=base.shape[1], k=k, sampler=sampler)
    scores = base.clone().requires_grad_()
    outcome = {"finite": True}

    def step():
        scores.grad = None
        value = loss_fn(scores, labels)
        value.backward()
        finite = bool(torch.isfinite(value)) and bool(torch.isfinite(scores.grad).all())
        outcome["finite"] = outcome["finite"] and finite

    return step, outcome


def time_case(name, templates, labels, *, k, sampler, budget_s):
    """Median seconds of `name` and of cross-entropy (timed back to back), and finiteness."""
    step, outcome = prepare_step(name, templates, labels, k=k, sampler=sampler)
    ce_step, _ = prepare_step(REFERENCE, templates, labels, k=k, sampler=sampler)
    warm_up = time_once(step, 1)
    time_once(ce_step, 1)
    if warm_up > budget_s:  # a slow case: one more call is all the budget allows
        return time_once(step, 1), statistics.median(time_once(ce_step, 1) for _ in range(3)), \
            outcome["finite"]  # fmt: skip
    once, ce_once = time_once(step, 1), time_once(ce_step, 1)
    # ~10 ms per timing (below that it is timer and scheduler noise), ~budget_s in all.
    inner = max(1, min(100, int(0.01 / max(once, 1e-6))))
    ce_inner = max(1, min(100, int(0.01 / max(ce_once, 1e-6))))
    reps = max(3, min(15, int(budget_s / max(once * inner + ce_once * ce_inner, 1e-6))))
    times, ce_times = [], []
    for _ in range(reps):
        times.append(time_once(step, inner))
        ce_times.append(time_once(ce_step, ce_inner))
    return statistics.median(times), statistics.median(ce_times), outcome["finite"]


def measure_peaks(names, batch, num_classes, k, args) -> dict[str, list]:
    """In a child process with the fixed mmap threshold: {name: [peak extra bytes, finite]}."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--peaks-only",
        "--B", str(batch),
        "--C", str(num_classes),
        "--k", str(k),
        "--sampler", args.sampler,
        "--dtype", args.dtype,
        "--loss", *names,
    ]  # fmt: skip
    if args.realistic:
        command.append("--realistic")
    command += ["--threads", str(args.threads)]
    result = subprocess.run(
        command, env={**os.environ, **MALLOC_ENV}, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_scores(batch, num_classes, *, realistic, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    std = 5.0 if realistic else 1.0
    plain = torch.randn(batch, num_classes, generator=gen) * std
    cosine = (plain / (3 * std)).clamp(-1.0, 1.0)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return {
        "plain": plain.to(device, dtype),
        "cosine": cosine.to(device, dtype),
    }, labels.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B=64, C in {100, 1000}, k=5")
    parser.add_argument("--B", type=int, nargs="+", help="batch sizes (default 64 256)")
    parser.add_argument("--C", type=int, nargs="+", help="class counts (default 100 .. 100000)")
    parser.add_argument("--k", type=int, nargs="+", help="k values (default 1 5 20)")
    parser.add_argument(
        "--loss",
        nargs="+",
        choices=[*topk.list_losses(), MATERIALISING, REFERENCE],
        help="losses to run (default: all registered + materialising)",
    )
    parser.add_argument("--sampler", choices=["full", "lazy"], default="full")
    parser.add_argument("--realistic", action="store_true", help="scores with std 5, not 1")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds of timing per loss and size"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more threads mostly measure the "
        "other processes' load; 0 = torch's default)",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: peak from torch.cuda"
    )
    parser.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and torch.get_num_threads() == 1:
        CLOCK["now"] = time.process_time
    batches = args.B or (QUICK["B"] if args.quick else DEFAULT_B)
    classes = args.C or (QUICK["C"] if args.quick else DEFAULT_C)
    ks = args.k or (QUICK["k"] if args.quick else DEFAULT_K)
    losses = args.loss or [*topk.list_losses(), MATERIALISING]
    dtype = getattr(torch, args.dtype)
    if args.peaks_only:  # the child of measure_peaks: one (B, C, k), JSON out
        templates, labels = make_scores(
            batches[0], classes[0], realistic=args.realistic, dtype=dtype
        )
        peaks = {}
        for name in losses:
            step, outcome = prepare_step(name, templates, labels, k=ks[0], sampler=args.sampler)
            peaks[name] = [measure_peak_extra(step), outcome["finite"]]
            del step
        print(json.dumps(peaks))
        return 0

    print(
        f"# torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads "
        f"({'CPU' if CLOCK['now'] is time.process_time else 'wall'} time), "
        f"dtype {args.dtype}, "
        f"sampler {args.sampler}, scores std {5 if args.realistic else 1}, epsilon 1, "
        f"n_samples {N_SAMPLES}"
    )
    print(
        f"{'B':>5} {'C':>7} {'k':>3} {'loss':<24} {'ms':>10} {'x CE':>7} "
        f"{'extra MB':>9} {'x CE mem':>8} {'finite':>6}"
    )
    for batch in batches:
        for num_classes in classes:
            templates, labels = make_scores(
                batch, num_classes, realistic=args.realistic, dtype=dtype, device=args.device
            )
            done_k_free: set[str] = set()
            for k in ks:
                if k + 1 > num_classes:
                    continue
                names = [n for n in losses if not (n in K_FREE and n in done_k_free)]
                done_k_free.update(n for n in names if n in K_FREE)
                if args.device == "cpu":
                    peaks = measure_peaks([REFERENCE, *names], batch, num_classes, k, args)
                else:  # the CUDA caching allocator counts its own peak: no child needed
                    peaks = {}
                    for name in [REFERENCE, *names]:
                        step, outcome = prepare_step(
                            name, templates, labels, k=k, sampler=args.sampler
                        )
                        peaks[name] = [measure_peak_extra(step), outcome["finite"]]
                        del step
                ce_peak = peaks[REFERENCE][0]
                for name in names:
                    seconds, ce_seconds, finite = time_case(
                        name, templates, labels, k=k, sampler=args.sampler, budget_s=args.budget
                    )
                    peak, peak_finite = peaks[name]
                    k_text = "-" if name in K_FREE else str(k)
                    # Below a MiB the page-granular peak is noise; no ratio then.
                    mem_ratio = f"{peak / ce_peak:>8.2f}" if ce_peak >= 2**20 else f"{'-':>8}"
                    print(
                        f"{batch:>5} {num_classes:>7} {k_text:>3} {name:<24} "
                        f"{seconds * 1e3:>10.2f} {seconds / ce_seconds:>7.2f} "
                        f"{peak / 2**20:>9.1f} {mem_ratio} "
                        f"{str(finite and peak_finite):>6}",
                        flush=True,
                    )
                    gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
