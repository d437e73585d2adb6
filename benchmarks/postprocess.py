"""K-Net panoptic post-processing at COCO size: its parts, the whole call, and its share of the model forward.

    python -m benchmarks.postprocess [--height 800] [--width 1200] [--reps 5] [--threads 2]
                                     [--baseline 337c39b] [--no-model] [--peer-size 512] [--peer-batch 2]

Case: 153 kernels (100 proposals + 53 stuff), 80 + 53 classes, mask logits at stride 8 of the padded input
(800x1216 for an 800x1200 image), upsampled x2 to stride 4 as the model does; panoptic, instance and
semantic outputs all on (the panoptic config's defaults). The logits are synthetic but shaped like a
trained model's: 25 confident thing kernels and 10 present stuff classes with blob and band masks, the
rest low, so the merge finds segments. The timings barely depend on the values. Peak memory: the growth of
the peak RSS over one steady-state call, in a fresh subprocess per version.

``--baseline REV`` loads ``knet/postprocess.py`` as it was at git revision REV and times it in the same
rounds (A, B, A, B, ...), so before and after meet the same load. Parts are each version's public
functions on full-resolution inputs; the current ``PostProcessor`` does not call them one after the other
but fuses them in ``full_resolution_pass``, whose own split comes from its ``record_function`` labels.
The model rows run ``build_model(KNetConfig.coco_panoptic_r50())`` (random weights) in eval mode on one
image, once with each post-processor; the post-processing share is timed inside the same forward. The last
table repeats the docs' peers case (512x512, batch 2) with each post-processor next to K-Net instance
inference and the 3x3 conv probe of ``benchmarks.peers``, so "% conv" is comparable with
docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import knet.postprocess as current_postprocess

NUM_PROPOSALS, NUM_THINGS, NUM_STUFF = 100, 80, 53
FUSED_LABELS = (
    "knet.postprocess.resize",
    "knet.postprocess.instance_masks",
    "knet.postprocess.mask_areas",
    "knet.postprocess.owner",
)


def synthetic_outputs(padded_size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> cls_logits (1, 153, 133), mask_logits (1, 153, Hp/8, Wp/8) shaped like a trained model's."""
    generator = torch.Generator().manual_seed(seed)
    num_kernels = NUM_PROPOSALS + NUM_STUFF
    height, width = padded_size[0] // 8, padded_size[1] // 8
    cls_logits = torch.full((num_kernels, NUM_THINGS + NUM_STUFF), -6.0)
    cls_logits += torch.rand(cls_logits.shape, generator=generator)
    confident = torch.randperm(NUM_PROPOSALS, generator=generator)[:25]
    cls_logits[confident, torch.randint(0, NUM_THINGS, (25,), generator=generator)] = 2.0
    present = torch.randperm(NUM_STUFF, generator=generator)[:10]
    cls_logits[NUM_PROPOSALS + present, NUM_THINGS + present] = 1.0
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    mask_logits = torch.empty(num_kernels, height, width)
    for kernel in range(NUM_PROPOSALS):  # an elliptic blob per thing kernel
        cy, cx = torch.rand(2, generator=generator) * torch.tensor([height, width])
        ry, rx = 2 + torch.rand(2, generator=generator) * torch.tensor([height, width]) / 10
        distance = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2
        mask_logits[kernel] = 6.0 * (1.0 - distance.sqrt())
    for stuff in range(NUM_STUFF):  # a horizontal band per stuff kernel, present classes tile the image
        rank = int((present == stuff).nonzero()[0]) if (present == stuff).any() else stuff % 10
        centre = (rank + 0.5) * height / 10
        band = 6.0 * (1.0 - (ys - centre).abs() / (height / 20))  # prob >= 0.5 on its tenth of the rows
        mask_logits[NUM_PROPOSALS + stuff] = band.expand(-1, width)
    mask_logits += 0.5 * torch.randn(mask_logits.shape, generator=generator)
    return cls_logits[None], mask_logits[None]


def load_revision(revision: str) -> types.ModuleType:
    """knet/postprocess.py as it was at git ``revision``, as a module of its own (it imports the current
    ``knet.structures``)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:knet/postprocess.py"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"knet_postprocess_at_{revision}")
    exec(compile(source, f"{revision}:knet/postprocess.py", "exec"), module.__dict__)
    return module


def build_postprocessor(module: types.ModuleType) -> Callable:
    return module.PostProcessor(
        task="panoptic",
        num_thing_classes=NUM_THINGS,
        num_stuff_classes=NUM_STUFF,
        num_proposals=NUM_PROPOSALS,
        panoptic_on=True,
        instance_on=True,
        semantic_on=True,
    )


def same_settings(module: types.ModuleType, post: object) -> Callable:
    """``module``'s PostProcessor with the settings of ``post`` (a model's own post-processor)."""
    names = (
        "task", "num_thing_classes", "num_stuff_classes", "num_proposals", "max_per_image", "mask_thr",
        "instance_score_thr", "overlap_thr", "panoptic_on", "instance_on", "semantic_on", "mask_upsample_stride",
    )  # fmt: skip
    return module.PostProcessor(**{name: getattr(post, name) for name in names})


def part_steps(
    module: types.ModuleType, cls_logits, mask_logits, image_size, padded_size
) -> dict[str, Callable]:
    """The post-processing parts as separate calls of ``module``'s public functions (one image)."""
    post = build_postprocessor(module)
    class_probs = cls_logits[0].sigmoid()
    things = class_probs[:NUM_PROPOSALS, :NUM_THINGS]
    scores, labels, is_thing = post._kernel_scores(class_probs, things)
    probs = module.mask_probabilities(mask_logits[0], image_size, padded_size, 2)
    owner = module.pixel_owner(scores, probs)
    thresholds = dict(mask_thr=0.5, instance_score_thr=0.3, overlap_thr=0.6)
    coarse = mask_logits[0].sigmoid()
    num_classes = NUM_THINGS + NUM_STUFF
    return {
        "mask probabilities (153 x H x W)": lambda: module.mask_probabilities(
            mask_logits[0], image_size, padded_size, 2
        ),
        "pixel owner (argmax of score x prob)": lambda: module.pixel_owner(scores, probs),
        "panoptic merge (owner given)": lambda: module.panoptic_merge(
            scores, labels, is_thing, probs, owner=owner, **thresholds
        ),
        "instance top-100 masks": lambda: module.instance_topk(
            things, probs[:NUM_PROPOSALS], max_per_image=100, mask_thr=0.5
        ),
        "semantic from kernels (owner given)": lambda: module.semantic_from_kernels(
            scores, labels, probs, coarse, num_classes, owner=owner
        ),
    }


def seconds(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run_rounds(steps: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time every step once per round, interleaved, after ``warmup`` untimed rounds."""
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + reps):
        for name, step in steps.items():
            elapsed = seconds(step)
            if round_index >= warmup:
                timings[name].append(elapsed)
    return timings


def fused_split(post: Callable, arguments: tuple) -> dict[str, float]:
    """Seconds per ``full_resolution_pass`` label in one call of the current PostProcessor (profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        post(*arguments)
    totals = {event.key: event.cpu_time_total / 1e6 for event in prof.key_averages()}
    return {label: totals.get(label, 0.0) for label in FUSED_LABELS}


class TimedPostProcessor:
    """Wraps a post-processor and keeps the wall time of its last call."""

    def __init__(self, post: Callable) -> None:
        self.post, self.last = post, 0.0

    def __call__(self, **arguments: object) -> object:
        start = time.perf_counter()
        result = self.post(**arguments)
        self.last = time.perf_counter() - start
        return result


def model_rounds(
    modules: dict[str, types.ModuleType], image_size: tuple[int, int], reps: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Model forward with each module's post-processor: name -> (forward seconds, post-processing seconds)."""
    from knet import KNetConfig, build_model

    model = build_model(KNetConfig.coco_panoptic_r50()).eval()
    images = torch.randn(1, 3, *image_size, generator=torch.Generator().manual_seed(1))
    wrapped = {name: TimedPostProcessor(same_settings(m, model.postprocessor)) for name, m in modules.items()}
    forward: dict[str, list[float]] = {name: [] for name in modules}
    post_seconds: dict[str, list[float]] = {name: [] for name in modules}
    with torch.no_grad():
        for round_index in range(1 + reps):
            for name, post in wrapped.items():
                model.postprocessor = post
                elapsed = seconds(lambda: model(images))
                if round_index >= 1:
                    forward[name].append(elapsed)
                    post_seconds[name].append(post.last)
    return {name: (forward[name], post_seconds[name]) for name in modules}


def peer_case_rounds(modules: dict[str, types.ModuleType], size: int, batch: int, reps: int) -> list[str]:
    """The docs' peers case (``benchmarks.peers``: random images, size x size, batch, 2 warm-up steps):
    K-Net panoptic inference with each post-processor, K-Net instance inference and the 3x3 conv probe,
    interleaved; -> table rows with median seconds, GFLOP/s and % of the conv probe's rate."""
    from benchmarks.peer_models import build_case
    from benchmarks.peers import CONV_PROBE, conv_probe, count_flops, time_interleaved

    device = torch.device("cpu")
    panoptic = build_case("knet_panoptic_infer", size=(size, size), batch=batch, device=device, amp=False)
    instance = build_case("knet_instance_infer", size=(size, size), batch=batch, device=device, amp=False)
    posts = {name: same_settings(module, panoptic.model.postprocessor) for name, module in modules.items()}

    def with_post(post: Callable) -> Callable[[], None]:
        def step() -> None:
            panoptic.model.postprocessor = post
            panoptic.step()

        return step

    steps = {f"K-Net panoptic, inference ({name} post-processing)": with_post(p) for name, p in posts.items()}
    steps["K-Net instance, inference"] = instance.step
    steps[CONV_PROBE] = conv_probe(device)
    flops = {name: count_flops(step) for name, step in steps.items()}
    timings = time_interleaved(steps, device, warmup=2, reps=reps, log=lambda message: None)
    conv_rate = flops[CONV_PROBE] / statistics.median(timings[CONV_PROBE])
    rows = []
    for name, values in timings.items():
        rate = flops[name] / statistics.median(values)
        rows.append(
            f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {flops[name] / 1e9:.1f} | "
            f"{rate / 1e9:.1f} | {rate / conv_rate:.0%} |"
        )
    return rows


def _row(name: str, values: list[list[float]], ratio: bool) -> str:
    cells = [f"{statistics.median(v):.3f} ({min(v):.3f})" for v in values]
    if ratio and len(values) == 2:
        cells.append(f"{statistics.median(values[0]) / statistics.median(values[1]):.2f}x")
    return f"| {name} | " + " | ".join(cells) + " |"


def peak_memory_mb(revision: str | None, image_size: tuple[int, int], threads: int) -> float:
    """Peak RSS growth (MB) of one PostProcessor call, in a fresh subprocess (``None`` = current code)."""
    cmd = [sys.executable, "-m", "benchmarks.postprocess", "--probe-memory", revision or "current"]
    cmd += ["--height", str(image_size[0]), "--width", str(image_size[1]), "--threads", str(threads)]
    root = Path(__file__).resolve().parent.parent
    output = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def run_memory_probe(revision: str, image_size: tuple[int, int], padded_size: tuple[int, int]) -> None:
    """Print the peak RSS growth of a steady-state call (the kernel's high-water mark, reset just before)."""
    from benchmarks.peers import _reset_peak_rss, _status_mb

    module = current_postprocess if revision == "current" else load_revision(revision)
    post = build_postprocessor(module)
    cls_logits, mask_logits = synthetic_outputs(padded_size)
    post(cls_logits, mask_logits, [image_size], padded_size)
    before = _status_mb("VmRSS")
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); no memory figure")
    predictions = post(cls_logits, mask_logits, [image_size], padded_size)
    print(_status_mb("VmHWM") - before)
    del predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", help="git revision of knet/postprocess.py to compare with")
    parser.add_argument("--no-model", action="store_true", help="skip the model forward rows")
    parser.add_argument("--peer-size", type=int, default=512, help="image size of the peers case")
    parser.add_argument("--peer-batch", type=int, default=2, help="batch of the peers case")
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image_size = (args.height, args.width)
    padded_size = (-(-args.height // 32) * 32, -(-args.width // 32) * 32)
    if args.probe_memory:
        run_memory_probe(args.probe_memory, image_size, padded_size)
        return
    cls_logits, mask_logits = synthetic_outputs(padded_size)
    modules = {"current": current_postprocess}
    if args.baseline:
        modules = {f"baseline {args.baseline}": load_revision(args.baseline), **modules}
    posts = {name: build_postprocessor(module) for name, module in modules.items()}
    arguments = (cls_logits, mask_logits, [image_size], padded_size)

    header = "| | " + " | ".join(modules) + (" | baseline / current |" if len(modules) == 2 else " |")
    rule = "| --- |" + " ---: |" * (len(modules) + (len(modules) == 2))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {image_size}, "
          f"padded {padded_size}, {args.reps} rounds; seconds: median (min)")  # fmt: skip

    whole = run_rounds(
        {name: (lambda post=post: post(*arguments)) for name, post in posts.items()}, args.reps
    )
    print("\nPostProcessor, one image (panoptic + instance + semantic)\n")
    print(header, rule, _row("whole call", list(whole.values()), True), sep="\n")
    revisions = {name: (args.baseline if name != "current" else None) for name in modules}
    memory = [f"{peak_memory_mb(rev, image_size, args.threads):.0f}" for rev in revisions.values()]
    print("| peak memory growth, MB |", " | ".join(memory), "|" + (" |" if len(modules) == 2 else ""))
    current_result = posts["current"](*arguments)[0]
    print(f"\n{current_result.panoptic.labels.numel()} panoptic segments, "
          f"{current_result.instance.masks.shape[0]} instance masks")  # fmt: skip

    parts = {
        (name, part): step
        for name, module in modules.items()
        for part, step in part_steps(module, cls_logits, mask_logits, image_size, padded_size).items()
    }
    part_times = run_rounds(parts, args.reps)
    print("\nParts, each version's public functions called one by one (not how the current version runs)\n")
    print(header, rule, sep="\n")
    for part in dict.fromkeys(part for _, part in parts):
        print(_row(part, [part_times[(name, part)] for name in modules], True))

    split = fused_split(posts["current"], arguments)
    print("\nInside the current PostProcessor (full_resolution_pass, profiler, one call)\n")
    print("| label | seconds |\n| --- | ---: |")
    for label, value in split.items():
        print(f"| {label} | {value:.3f} |")

    if args.no_model:
        return
    rows = model_rounds(modules, image_size, args.reps)
    print("\nModel forward, KNetConfig.coco_panoptic_r50(), eval, batch 1 (random weights)\n")
    print(header, rule, sep="\n")
    print(_row("forward incl. post-processing", [rows[name][0] for name in modules], True))
    print(_row("of which post-processing", [rows[name][1] for name in modules], True))
    shares = " | ".join(
        f"{statistics.median(post) / statistics.median(forward):.0%}" for forward, post in rows.values()
    )
    print(f"| post-processing share | {shares} |" + (" |" if len(modules) == 2 else ""))

    print(f"\nThe peers case: {args.peer_size}x{args.peer_size}, batch {args.peer_batch}, interleaved with the "
          "3x3 conv probe of benchmarks.peers\n")  # fmt: skip
    print(
        "| case | median s | min s | GFLOP | GFLOP/s | % conv |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    print("\n".join(peer_case_rounds(modules, args.peer_size, args.peer_batch, args.reps)))


if __name__ == "__main__":
    main()
