"""One K-Net R50 panoptic training step on CPU: time, peak memory and where the time goes.

    python -m benchmarks.train_step [--size 512] [--batch 2] [--reps 3] [--threads 2]

Model: the paper's panoptic R-50 (100 proposals, 3 stages, 80 things + 53 stuff), random weights.
Time: wall-clock seconds of forward + backward (median over ``--reps`` steps after one warm-up).
Memory: peak RSS growth of this process over the first (warm-up) step, from ``ru_maxrss`` minus the RSS
before it (``/proc/self/statm``); CPU tensors live in malloc'd memory, so RSS sees them (tracemalloc does not).
Shares: one extra step under ``torch.profiler``; the model's ``record_function`` labels give the forward CPU
time of backbone, neck (FPN + localization FPN), kernel heads (initial head without the localization FPN +
update stages), matcher and losses (criterion minus matcher); backward is reported as one number because
autograd runs outside those labels.
The criterion's ``matcher`` sub-module gets the ``knet.matcher`` label through hooks.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from knet import KNetConfig
from knet.build import build_model
from knet.model import KNet

LABELS = (
    "knet.backbone",
    "knet.neck",
    "knet.localization_fpn",
    "knet.kernel_head",
    "knet.update_stages",
    "knet.criterion",
    "knet.matcher",
)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _batch(batch: int, size: int, cfg: KNetConfig) -> tuple[torch.Tensor, list[dict]]:
    """Random images; each with 5 thing squares and 3 stuff bands."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    targets = []
    for _ in range(batch):
        masks, labels = [], []
        for i in range(5):
            mask = torch.zeros(size, size, dtype=torch.bool)
            y, x = (int(v) for v in torch.randint(0, size - size // 8, (2,), generator=generator))
            mask[y : y + size // 8, x : x + size // 8] = True
            masks.append(mask)
            labels.append(i % cfg.num_thing_classes)
        for j in range(3):
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[j * size // 3 : (j + 1) * size // 3] = True
            masks.append(mask & ~torch.stack(masks[:5]).any(0))
            labels.append(cfg.num_thing_classes + j)
        targets.append({"labels": torch.tensor(labels), "masks": torch.stack(masks)})
    return images, targets


def _label_matcher(model: KNet) -> None:
    """Give the criterion's matcher module (if it has one) the ``knet.matcher`` profiler label."""
    matcher = getattr(model.criterion, "matcher", None)
    if not isinstance(matcher, torch.nn.Module):
        return
    open_labels: list[record_function] = []

    def enter(module: torch.nn.Module, args: object) -> None:
        label = record_function("knet.matcher")
        label.__enter__()
        open_labels.append(label)

    def leave(module: torch.nn.Module, args: object, output: object) -> None:
        open_labels.pop().__exit__(None, None, None)

    matcher.register_forward_pre_hook(enter)
    matcher.register_forward_hook(leave)


def _step(model: KNet, images: torch.Tensor, targets: list[dict]) -> float:
    start = time.perf_counter()
    losses = model(images, targets)
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = KNetConfig.coco_panoptic_r50()
    model = build_model(cfg).train()
    _label_matcher(model)
    images, targets = _batch(args.batch, args.size, cfg)

    rss_before = _rss_bytes()
    warmup = _step(model, images, targets)
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    times = [_step(model, images, targets) for _ in range(args.reps)]

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        losses = model(images, targets)
        forward = time.perf_counter() - start
        sum(losses.values()).backward()
        total = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    ms = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in LABELS}
    get = lambda key: ms.get(key, 0.0)  # noqa: E731
    parts = {
        "backbone": get("knet.backbone"),
        "neck (FPN + localization FPN)": get("knet.neck") + get("knet.localization_fpn"),
        "kernel heads (initial + update stages)": get("knet.kernel_head")
        - get("knet.localization_fpn")
        + get("knet.update_stages"),
        "matcher": get("knet.matcher"),
        "losses (criterion - matcher)": get("knet.criterion") - get("knet.matcher"),
    }

    print(f"K-Net R50 panoptic, batch {args.batch} x {args.size}x{args.size}, CPU threads {args.threads}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print(
        f"forward+backward: median {statistics.median(times):.2f} s over {args.reps} (warm-up {warmup:.2f} s)"
    )
    print(f"peak RSS growth over the first step: {peak_growth / 2**20:.0f} MiB (ru_maxrss - RSS before)")
    print(
        f"profiled step: forward {forward:.2f} s, backward {total - forward:.2f} s (profiler overhead included)"
    )
    forward_ms = forward * 1e3
    for name, value in parts.items():
        print(
            f"  {name:42s} {value:9.0f} ms  {100 * value / forward_ms:5.1f}% of forward, {100 * value / (total * 1e3):5.1f}% of step"
        )
    if get("knet.matcher") == 0:
        print("  (the criterion sets no 'knet.matcher' label: matcher time is inside 'losses')")


if __name__ == "__main__":
    main()
