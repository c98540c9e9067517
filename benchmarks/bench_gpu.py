"""The losses on one GPU: forward + backward time and peak memory against cross-entropy.

    python benchmarks/bench_gpu.py              # the full table, a few minutes on one H200
    python benchmarks/bench_gpu.py --quick      # B=256 and fp32 only

For every batch size B in {256, 1024}, class count C in {1k, 10k, 100k} and dtype (fp32, bf16),
each registered loss and, when installed, the paper's own code (pytopk), the time of one forward
+ backward on the same scores is printed as a multiple of torch.nn.functional.cross_entropy's in
the same process (CUDA events, median of 20 calls after warm-up), with the peak memory the call
adds on top of its inputs. Then: host synchronisations and CUDA kernels per call (at B=256,
C=10k, fp32, after the first call), and a training step of ResNet-18 at 64 px (batch 256, bf16
autocast, channels_last, SGD) for each loss against cross-entropy at C = 1k and 10k.

Needs a CUDA device; prints one line and exits 0 without one. Timings are ratios: the machine
is shared and noisy, absolute milliseconds are given for orientation only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import topk
from topk.heads import CosineHead

K = 5
N_SAMPLES = 5
LOSSES = ["noised_topk", "noised_topk_imbalanced", "topk_hinge", "smooth_topk_svm", "cross_entropy"]
COSINE = {"noised_topk_imbalanced", "ldam"}


def long_tail_counts(classes: int) -> list[int]:
    """A 100:1 exponential profile, as on the long-tailed datasets the paper targets."""
    return [max(1, round(500 * 0.01 ** (c / max(1, classes - 1)))) for c in range(classes)]


def build_loss(name: str, classes: int) -> torch.nn.Module:
    cls = topk.get_loss_class(name)
    params: dict[str, object] = {}
    if cls.needs_class_counts:
        params["class_counts"] = long_tail_counts(classes)
    if name in ("noised_topk", "noised_topk_imbalanced"):
        params["n_samples"] = N_SAMPLES
    if name in ("noised_topk", "noised_topk_imbalanced", "topk_hinge", "smooth_topk_svm"):
        params["k"] = K
    return topk.create_loss(name, **params).cuda()


def build_pytopk(name: str, classes: int):
    """The paper's own losses (pip install pytopk), or None when not installed."""
    try:
        import pytopk
    except ImportError:
        return None
    if name == "pytopk_bal":
        return pytopk.BalNoisedTopK(k=K, epsilon=1.0, n_sample=N_SAMPLES).cuda()
    counts = long_tail_counts(classes)
    return pytopk.ImbalNoisedTopK(
        k=K, epsilon=0.01, max_m=0.2, cls_num_list=counts, scale=60, n_sample=N_SAMPLES
    ).cuda()


def make_scores(name: str, batch: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(0)
    raw = torch.randn(batch, classes, device="cuda", generator=gen)
    cosine = name in COSINE or name == "pytopk_imbal"
    raw = torch.tanh(0.3 * raw) if cosine else 3.0 * raw
    return raw.to(dtype).requires_grad_()


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def forward_backward(loss_fn, scores: torch.Tensor, labels: torch.Tensor):
    def call() -> None:
        scores.grad = None
        loss_fn(scores, labels).backward()

    return call


def peak_extra_mb(fn) -> float:
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def loss_table(batches, class_counts, dtypes, with_pytopk: bool) -> None:
    names = LOSSES + (["pytopk_bal", "pytopk_imbal"] if with_pytopk else [])
    header = "| B | C | dtype | F.cross_entropy ms | " + " | ".join(names) + " |"
    print("\nforward+backward, multiple of F.cross_entropy (ms) [peak extra MB]")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for batch in batches:
        for classes in class_counts:
            for dtype in dtypes:
                labels = torch.randint(0, classes, (batch,), device="cuda")
                base_scores = make_scores("cross_entropy", batch, classes, dtype)
                base_call = forward_backward(F.cross_entropy, base_scores, labels)
                base_ms = median_ms(base_call)
                base_mb = peak_extra_mb(base_call)
                cells = []
                for name in names:
                    if name.startswith("pytopk"):
                        loss_fn = build_pytopk(name, classes)
                    else:
                        loss_fn = build_loss(name, classes)
                    scores = make_scores(name, batch, classes, dtype)
                    call = forward_backward(loss_fn, scores, labels)
                    try:
                        call()  # first call: compile, host checks
                        torch.cuda.synchronize()
                        first = time.perf_counter()
                        call()
                        torch.cuda.synchronize()
                        once = time.perf_counter() - first
                        iters = 20 if once < 0.05 else 3
                        ms = median_ms(call, iters=iters, warmup=1)
                        mb = peak_extra_mb(call)
                        cells.append(f"{ms / base_ms:.2f}x ({ms:.2f}) [{mb:.0f}]")
                    except (RuntimeError, ValueError, torch.OutOfMemoryError) as exc:
                        cells.append(f"failed: {type(exc).__name__}")
                    del scores, call, loss_fn
                    torch.cuda.empty_cache()
                print(
                    f"| {batch} | {classes:,} | {str(dtype).removeprefix('torch.')} | "
                    f"{base_ms:.3f} [{base_mb:.0f}] | " + " | ".join(cells) + " |",
                    flush=True,
                )


def syncs_and_kernels(batch: int = 256, classes: int = 10_000) -> None:
    print(f"\nhost syncs and CUDA kernels per forward+backward (B={batch}, C={classes:,}, fp32)")
    print(
        "| loss | host syncs (first call) | host syncs (later calls) | CUDA kernels "
        "| GPU busy ms | wall ms |"
    )
    print("|---|---|---|---|---|---|")
    from torch.profiler import ProfilerActivity, profile

    for name in LOSSES + ["F.cross_entropy"]:
        loss_fn = F.cross_entropy if name == "F.cross_entropy" else build_loss(name, classes)
        scores = make_scores(name, batch, classes, torch.float32)
        labels = torch.randint(0, classes, (batch,), device="cuda")
        call = forward_backward(loss_fn, scores, labels)
        counts = []
        for _ in range(2):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    call()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = sum(
            1
            for event in prof.events()
            if event.device_type == torch.autograd.DeviceType.CUDA
            and "memcpy" not in event.name.lower()
            and "memset" not in event.name.lower()
        )
        busy_us = sum(
            getattr(avg, "self_device_time_total", 0.0) or getattr(avg, "self_cuda_time_total", 0.0)
            for avg in prof.key_averages()
        )
        wall = median_ms(call)
        print(
            f"| {name} | {counts[0]} | {counts[1]} | {kernels} | {busy_us / 1000:.3f} "
            f"| {wall:.3f} |",
            flush=True,
        )


def make_step(model, optimizer, loss_fn, images, labels):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            scores = model(images)
        loss_fn(scores, labels).backward()
        optimizer.step()

    return step


def training_steps(class_counts, steps: int = 30, rounds: int = 3) -> None:
    import torchvision

    print("\ntraining step, ResNet-18 at 64 px, batch 256, bf16 autocast, channels_last, SGD")
    print(f"(median ms per step over {steps} steps, best of {rounds} interleaved rounds)")
    print("| C | loss | ms per step | x cross_entropy |")
    print("|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(256, 3, 64, 64, device="cuda", generator=gen)
    images = images.contiguous(memory_format=torch.channels_last)
    names = ["cross_entropy"] + [n for n in LOSSES if n != "cross_entropy"]
    for classes in class_counts:
        labels = torch.randint(0, classes, (256,), device="cuda", generator=gen)
        best: dict[str, float] = {}
        for _ in range(rounds):  # interleaved, so that a slow spell of the machine hits all
            for name in names:
                torch.manual_seed(0)
                model = torchvision.models.resnet18(num_classes=classes)
                if name in COSINE:
                    model.fc = CosineHead(model.fc.in_features, classes)
                model = model.cuda().to(memory_format=torch.channels_last)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                step = make_step(model, optimizer, build_loss(name, classes), images, labels)
                ms = median_ms(step, iters=steps, warmup=3)
                best[name] = min(ms, best.get(name, float("inf")))
                del model, optimizer, step
        for name in names:
            ratio = best[name] / best["cross_entropy"]
            print(f"| {classes:,} | {name} | {best[name]:.2f} | {ratio:.3f}x |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=256, fp32, no training step")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    try:
        import pytopk  # noqa: F401

        with_pytopk = True
    except ImportError:
        with_pytopk = False
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"pytopk {'installed' if with_pytopk else 'not installed'}; k={K}, n_samples={N_SAMPLES}"
    )
    started = time.perf_counter()
    batches = [256] if args.quick else [256, 1024]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    loss_table(batches, [1_000, 10_000, 100_000], dtypes, with_pytopk)
    syncs_and_kernels()
    if not (args.quick or args.skip_training):
        training_steps([1_000, 10_000])
    print(f"\nbench_gpu: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
