"""Images per second of ``PanopticEvaluator`` vs a plain per-pixel reference PQ, same inputs.

    python -m benchmarks.evaluation [--images 200] [--height 480] [--width 640] [--reference-images N]

Inputs: random 640x480 panoptic GT / prediction pairs (about 40 painted rectangles each, 80 things + 53
stuff, a VOID patch, a few crowd segments, in a third of the pairs all of one class; the prediction is
the GT with repainted patches and some relabelled segments). Ours: ``PanopticEvaluator.process_id_maps``
over all images, then ``evaluate``. Reference: panopticapi's rules counted pixel by pixel in Python (the
textbook way), by default on the same images (about 0.2 s per 640x480 image on one core, so 200 take
under a minute); ``--reference-images N`` limits it to the first N and says so. Both PQs on the images
the reference saw are printed, so the comparison is between equal results.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from knet.evaluation import PanopticEvaluator

NUM_THINGS, NUM_STUFF = 80, 53


def random_pair(rng: np.random.Generator, height: int, width: int, num_segments: int = 40):
    """(gt_ids, gt_labels, gt_iscrowd, pred_ids, pred_labels) with ids 0 = VOID, s + 1 = segment s."""

    def paint(ids: np.ndarray, value: int, scale: float) -> None:
        h = int(rng.integers(8, max(9, int(height * scale))))
        w = int(rng.integers(8, max(9, int(width * scale))))
        y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        ids[y : y + h, x : x + w] = value

    gt = np.zeros((height, width), dtype=np.int64)
    for segment in range(1, num_segments + 1):
        paint(gt, segment, 0.5)
    paint(gt, 0, 0.2)
    present = np.unique(gt)
    present = present[present > 0]
    remap = np.zeros(num_segments + 1, dtype=np.int64)
    remap[present] = np.arange(1, len(present) + 1)
    gt = remap[gt]  # renumber the visible segments 1..G
    gt_labels = rng.integers(0, NUM_THINGS + NUM_STUFF, len(present))
    gt_crowd = (rng.random(len(present)) < 0.05) & (gt_labels < NUM_THINGS)
    if rng.random() < 1 / 3 and gt_crowd.any():  # several crowd segments of one class
        gt_labels = np.where(gt_crowd, gt_labels[gt_crowd][0], gt_labels)
    pred = gt.copy()
    num_pred = len(present)
    for _ in range(8):
        num_pred += 1
        paint(pred, num_pred, 0.3)
    pred_labels = np.concatenate(
        [gt_labels, rng.integers(0, NUM_THINGS + NUM_STUFF, num_pred - len(present))]
    )
    flip = rng.random(num_pred) < 0.15
    pred_labels = np.where(flip, rng.integers(0, NUM_THINGS + NUM_STUFF, num_pred), pred_labels)
    return gt, gt_labels, gt_crowd, pred, pred_labels


def reference_pq(pairs: list) -> float:
    """panopticapi's PQ with every overlap counted by a Python loop over pixels, in percent."""
    tp, fp, fn, iou_sum = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(float)
    for gt, gt_labels, gt_crowd, pred, pred_labels in pairs:
        overlap: dict[tuple[int, int], int] = defaultdict(int)
        gt_area: dict[int, int] = defaultdict(int)
        pred_area: dict[int, int] = defaultdict(int)
        for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
            overlap[(g, p)] += 1
            gt_area[g] += 1
            pred_area[p] += 1
        matched_gt, matched_pred = set(), set()
        for (g, p), inter in overlap.items():
            if g == 0 or p == 0 or gt_crowd[g - 1] or gt_labels[g - 1] != pred_labels[p - 1]:
                continue
            iou = inter / (pred_area[p] + gt_area[g] - inter - overlap.get((0, p), 0))
            if iou > 0.5:
                tp[gt_labels[g - 1]] += 1
                iou_sum[gt_labels[g - 1]] += iou
                matched_gt.add(g)
                matched_pred.add(p)
        # panopticapi keeps ONE crowd segment per class: the last one listed (crowd_labels_dict[c] = g)
        crowd_of = {int(gt_labels[g - 1]): g for g in range(1, len(gt_labels) + 1) if gt_crowd[g - 1]}
        for g in gt_area:
            if g and g not in matched_gt and not gt_crowd[g - 1]:
                fn[gt_labels[g - 1]] += 1
        for p in pred_area:
            if p == 0 or p in matched_pred:
                continue
            label = int(pred_labels[p - 1])
            ignored = overlap.get((0, p), 0) + (
                overlap.get((crowd_of[label], p), 0) if label in crowd_of else 0
            )
            if ignored / pred_area[p] <= 0.5:
                fp[label] += 1
    classes = [k for k in range(NUM_THINGS + NUM_STUFF) if tp[k] + fp[k] + fn[k]]
    return 100 * sum(iou_sum[k] / (tp[k] + 0.5 * fp[k] + 0.5 * fn[k]) for k in classes) / len(classes)


def ours_pq(pairs: list) -> float:
    evaluator = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
    for gt, gt_labels, gt_crowd, pred, pred_labels in pairs:
        evaluator.process_id_maps(
            torch.from_numpy(gt),
            torch.from_numpy(gt_labels),
            torch.from_numpy(gt_crowd),
            torch.from_numpy(pred),
            torch.from_numpy(pred_labels),
        )
    return float(evaluator.evaluate()["pq"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument(
        "--reference-images",
        type=int,
        default=None,
        help="time the per-pixel reference on the first N images only (default: all of them)",
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    pairs = [random_pair(rng, args.height, args.width) for _ in range(args.images)]

    start = time.perf_counter()
    pq_all = ours_pq(pairs)
    ours_seconds = time.perf_counter() - start
    subset = pairs if args.reference_images is None else pairs[: args.reference_images]
    start = time.perf_counter()
    pq_reference = reference_pq(subset)
    reference_seconds = time.perf_counter() - start
    pq_ours_subset = ours_pq(subset)

    ours_rate = len(pairs) / ours_seconds
    reference_rate = len(subset) / reference_seconds
    print(f"inputs: {len(pairs)} images {args.height}x{args.width}, {NUM_THINGS}+{NUM_STUFF} classes")
    print(f"PanopticEvaluator: {ours_rate:8.1f} images/s  (PQ over all images {pq_all:.3f})")
    if len(subset) == len(pairs):
        print(f"per-pixel reference: {reference_rate:6.2f} images/s  (on the same {len(subset)} images)")
    else:
        print(
            f"per-pixel reference: {reference_rate:6.2f} images/s  (on the first {len(subset)} of "
            f"{len(pairs)} images only, as --reference-images={args.reference_images} asked)"
        )
    multi_crowd = sum(
        len(set(labels[crowd].tolist())) < int(crowd.sum()) for _, labels, crowd, _, _ in subset
    )
    print(f"images with 2+ crowd segments of one class among them: {multi_crowd}")
    agree = "equal" if abs(pq_ours_subset - pq_reference) < 1e-9 else "DIFFERENT"
    print(f"PQ on those images: ours {pq_ours_subset:.6f}, reference {pq_reference:.6f} ({agree})")
    print(f"speed-up: {ours_rate / reference_rate:.1f}x")


if __name__ == "__main__":
    main()
