"""K-Net next to the models our users would pick instead, timed in one process, interleaved.

    python -m benchmarks.peers --size 512 --batch 2 [--reps 5] [--threads 2] [--large] [--json out.json]
    python -m benchmarks.peers --device cuda          # AMP on, absolute images/s

Every case is timed in rounds (A, B, C, A, B, C, ...) after a warm-up, so slow drifts of the machine hit all
of them alike; the table prints median and min seconds, and the ratios the README quotes. The machine's
fp32 rate is measured the same way: a 3x3 convolution probe and a matmul probe run as two more cases inside
the rounds, so "% conv" compares medians taken under the same load. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and backward).
Peak memory is measured per case in a fresh subprocess: on CPU the peak RSS of one steady-state step (the
kernel's high-water mark, reset just before the step) minus the RSS before the model was built, so it holds
weights, gradients, optimizer state and activations, like CUDA's max allocated, which is used on CUDA.
The K-Net train step also reports its matcher time (cost matrices + assignment, hooks on the criterion's
``matcher``). ``--large`` adds inference at 800x1333, batch 1.
Needs the `bench` extra (transformers) for Mask2Former.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.peer_models import CASES, StepFn, build_case, import_libraries, maskrcnn_sizes

CONV_PROBE, MATMUL_PROBE = "probe_conv3x3", "probe_matmul"
LARGE_SIZE = (800, 1333)


@dataclass
class Timing:
    name: str
    seconds: list[float]
    flops: float
    images: int
    memory_mb: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def gflops_per_s(self) -> float:
        return self.flops / 1e9 / self.median


@dataclass
class MatcherClock:
    """Wall time spent inside a module's forward (the matcher), accumulated while ``running``."""

    seconds: float = 0.0
    calls: int = 0
    running: bool = False
    _start: list[float] = field(default_factory=list)

    def attach(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda *_: self._start.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self._stop())

    def _stop(self) -> None:
        elapsed = time.perf_counter() - self._start.pop()
        if self.running:
            self.seconds += elapsed
            self.calls += 1


def count_flops(step: StepFn) -> float:
    """FLOPs of one call of ``step`` as counted by torch (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def conv_probe(device: torch.device, repeats: int = 5) -> StepFn:
    """A ResNet-like 3x3 convolution (256 -> 256 channels, 64x64, batch 2), ``repeats`` times per call."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device)
    feats = torch.randn(2, 256, 64, 64, device=device)

    def step() -> None:
        with torch.no_grad():
            for _ in range(repeats):
                conv(feats)

    return step


def matmul_probe(device: torch.device, repeats: int = 5) -> StepFn:
    """A 1024 x 1024 fp32 matmul, ``repeats`` times per call."""
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)

    def step() -> None:
        for _ in range(repeats):
            a @ b

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, StepFn],
    device: torch.device,
    warmup: int,
    reps: int,
    log: Callable[[str], None],
    on_timed_start: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    for name, step in steps.items():
        log(f"warm-up {name}")
        for _ in range(warmup):
            step()
    on_timed_start()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
        log(f"round {rep + 1}/{reps} done (load average {os.getloadavg()[0]:.1f})")
    return seconds


def probe_memory(case: str, size: tuple[int, int], batch: int, args: argparse.Namespace) -> float:
    """Peak memory (MB) of one step of ``case``, measured in a fresh subprocess."""
    cmd = [sys.executable, "-m", "benchmarks.peers", "--probe-memory", case, "--probe-size", *map(str, size)]
    cmd += ["--batch", str(batch), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _status_mb(field_name: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field_name}:\s+(\d+)", status.read()).group(1)) / 1024  # kB


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def run_memory_probe(case: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    size = tuple(args.probe_size)
    import_libraries(case)
    inputs_and_libraries = _status_mb("VmRSS")
    step = build_case(case, size=size, batch=args.batch, device=device, amp=args.amp).step
    step()  # the first step allocates optimizer state and caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        print(torch.cuda.max_memory_allocated() / 2**20)
        return
    if _reset_peak_rss():
        step()
        peak = _status_mb("VmHWM")
    else:  # no clear_refs: the lifetime peak, which includes the first step (about the same)
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(max(peak - inputs_and_libraries, 0.0))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else "unknown CPU"


def versions() -> str:
    names = ("torch", "torchvision", "timm", "transformers")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES)
    )
    parser.add_argument(
        "--large", action="store_true", help="also time inference at 800x1333, batch 1 (1 warm-up)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    parser.add_argument("--json", help="write the ratios as JSON to this path")
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)
    parser.add_argument("--probe-size", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.amp = args.device == "cuda"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.probe_memory:
        run_memory_probe(args.probe_memory, args)
        return

    device = torch.device(args.device)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")

    def log(message: str) -> None:
        print(f"  .. {message}", file=sys.stderr, flush=True)

    size = (args.size, args.size)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, device {device}")
    print(f"{versions()}")
    print(
        f"threads {torch.get_num_threads()} (torch.set_num_threads), size {args.size}x{args.size}, "
        f"batch {args.batch}, {args.reps} timed rounds after {args.warmup} warm-up, AMP {args.amp}, "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    if "maskrcnn_infer" in cases:
        min_size, max_size = maskrcnn_sizes(size)
        print(
            f"Mask R-CNN: min_size={min_size}, max_size={max_size} (so it keeps the input size; torchvision's "
            "default resizes to 800), box_score_thresh=0.0, box_detections_per_img=100"
        )

    built = {
        name: build_case(name, size=size, batch=args.batch, device=device, amp=args.amp) for name in cases
    }
    clock = MatcherClock()
    matcher = getattr(getattr(built.get("knet_panoptic_train"), "model", None), "criterion", None)
    if isinstance(getattr(matcher, "matcher", None), torch.nn.Module):
        clock.attach(matcher.matcher)
    steps = {name: case.step for name, case in built.items()}
    steps[CONV_PROBE] = conv_probe(device)
    steps[MATMUL_PROBE] = matmul_probe(device)
    log("counting FLOPs")
    flops = {name: count_flops(step) for name, step in steps.items()}

    def start_clock() -> None:
        clock.running = True

    seconds = time_interleaved(steps, device, args.warmup, args.reps, log, on_timed_start=start_clock)
    clock.running = False
    images = {name: 1 if name.startswith("probe_") else args.batch for name in steps}
    timings = {name: Timing(name, seconds[name], flops[name], images[name]) for name in steps}
    if not args.no_memory:
        for name in cases:
            log(f"memory probe {name}")
            timings[name].memory_mb = probe_memory(name, size, args.batch, args)

    conv_rate = timings[CONV_PROBE].gflops_per_s
    print()
    print(
        f"machine fp32 rate (median of the interleaved probes): 3x3 conv {conv_rate:.1f} GFLOP/s "
        f"(best {flops[CONV_PROBE] / 1e9 / timings[CONV_PROBE].best:.1f}), 1024^2 matmul "
        f"{timings[MATMUL_PROBE].gflops_per_s:.1f} GFLOP/s "
        f"(best {flops[MATMUL_PROBE] / 1e9 / timings[MATMUL_PROBE].best:.1f})"
    )
    print(f"\n{args.size}x{args.size}, batch {args.batch}")
    print_table([timings[name] for name in cases], conv_rate)
    if clock.calls:
        per_step = clock.seconds / args.reps
        step_median = timings["knet_panoptic_train"].median
        print(
            f"\nK-Net matcher (cost matrices + assignment, {clock.calls // args.reps} calls per step): "
            f"{1e3 * per_step / args.batch:.1f} ms per image, {1e3 * per_step:.0f} ms per step = "
            f"{100 * per_step / step_median:.1f}% of the {step_median:.2f} s step (mean over the timed rounds)"
        )

    ratios = ratios_for(timings, conv_rate)
    print()
    for key, value in ratios.items():
        print(f"{key:<45}{value:>8.2f}")
    if args.large:
        large_inference(cases, device, args, log)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({k: (None if math.isnan(v) else v) for k, v in ratios.items()}, out, indent=2)
        print(f"wrote {args.json}")


def print_table(timings: list[Timing], conv_rate: float) -> None:
    print(
        f"{'case':<24}{'median s':>10}{'min s':>9}{'img/s':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'% conv':>8}"
        f"{'peak MB':>9}"
    )
    for timing in timings:
        memory = f"{timing.memory_mb:>9.0f}" if timing.memory_mb is not None else f"{'-':>9}"
        print(
            f"{timing.name:<24}{timing.median:>10.3f}{timing.best:>9.3f}{timing.images / timing.median:>8.2f}"
            f"{timing.flops / 1e9:>9.1f}{timing.gflops_per_s:>9.1f}{100 * timing.gflops_per_s / conv_rate:>7.0f}%"
            f"{memory}"
        )


def ratios_for(timings: dict[str, Timing], conv_rate: float) -> dict[str, float]:
    """The tracked figures (the JSON keys); NaN where a case was not run."""

    def ratio(a: str, b: str) -> float:
        return timings[a].median / timings[b].median if a in timings and b in timings else float("nan")

    def rate(name: str) -> float:
        return timings[name].gflops_per_s if name in timings else float("nan")

    train, m2f = timings.get("knet_panoptic_train"), timings.get("mask2former_train")
    mem_ratio = float("nan")
    if train is not None and m2f is not None and train.memory_mb is not None and m2f.memory_mb:
        mem_ratio = train.memory_mb / m2f.memory_mb
    return {
        "knet_train_over_mask2former_train": ratio("knet_panoptic_train", "mask2former_train"),
        "maskrcnn_infer_over_knet_instance_infer": ratio("maskrcnn_infer", "knet_instance_infer"),
        "knet_train_over_backbone_train": ratio("knet_panoptic_train", "backbone_train"),
        "knet_infer_over_backbone_infer": ratio("knet_panoptic_infer", "backbone_infer"),
        "knet_train_mem_over_mask2former_train_mem": mem_ratio,
        "knet_train_gflops_per_s": rate("knet_panoptic_train"),
        "knet_infer_gflops_per_s": rate("knet_panoptic_infer"),
        "machine_conv_gflops_per_s": conv_rate,
    }


def large_inference(cases: list[str], device: torch.device, args: argparse.Namespace, log) -> None:
    """Inference cases at 800x1333, batch 1, interleaved with the conv probe (fewer rounds: they are slow)."""
    infer = [c for c in cases if c.endswith("_infer")]
    if not infer:
        return
    steps = {
        name: build_case(name, size=LARGE_SIZE, batch=1, device=device, amp=args.amp).step for name in infer
    }
    steps[CONV_PROBE] = conv_probe(device)
    log("counting FLOPs at 800x1333")
    flops = {name: count_flops(step) for name, step in steps.items()}
    reps = max(3, args.reps)
    seconds = time_interleaved(steps, device, 1, reps, log)
    timings = {name: Timing(name, seconds[name], flops[name], 1) for name in steps}
    conv_rate = timings[CONV_PROBE].gflops_per_s
    print(
        f"\n{LARGE_SIZE[0]}x{LARGE_SIZE[1]}, batch 1, inference ({reps} rounds after 1 warm-up; "
        f"conv probe {conv_rate:.1f} GFLOP/s; Mask R-CNN min_size={min(LARGE_SIZE)}, max_size={max(LARGE_SIZE)})"
    )
    print_table([timings[name] for name in infer], conv_rate)
    if "maskrcnn_infer" in timings and "knet_instance_infer" in timings:
        value = timings["maskrcnn_infer"].median / timings["knet_instance_infer"].median
        print(f"{'maskrcnn_infer_over_knet_instance_infer (800x1333)':<52}{value:>8.2f}")
    if "mask2former_infer" in timings and "knet_panoptic_infer" in timings:
        value = timings["mask2former_infer"].median / timings["knet_panoptic_infer"].median
        print(f"{'mask2former_infer_over_knet_panoptic_infer (800x1333)':<52}{value:>8.2f}")


if __name__ == "__main__":
    main()
