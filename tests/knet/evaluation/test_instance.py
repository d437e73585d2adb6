from __future__ import annotations

import contextlib
import io
import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from knet.evaluation import InstanceEvaluator
from knet.structures import InstancePrediction, Prediction

NUM_THINGS, NUM_STUFF = 3, 2
KEYS = ("mask_ap", "mask_ap50", "mask_ap75", "mask_aps", "mask_apm", "mask_apl")


def _box_mask(generator: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
    height, width = size
    h = int(torch.randint(2, height // 2 + 1, (1,), generator=generator))
    w = int(torch.randint(2, width // 2 + 1, (1,), generator=generator))
    y = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    x = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y : y + h, x : x + w] = True
    return mask


def random_image(generator: torch.Generator, image_id: int, size: tuple[int, int] = (48, 64)):
    """A target with thing instances (some crowd), one stuff segment, and noisy predictions."""
    num_gt = int(torch.randint(1, 6, (1,), generator=generator))
    masks = [_box_mask(generator, size) for _ in range(num_gt)]
    labels = torch.randint(0, NUM_THINGS, (num_gt,), generator=generator)
    iscrowd = torch.rand(num_gt, generator=generator) < 0.15
    stuff = torch.ones(size, dtype=torch.bool)
    target = {
        "labels": torch.cat([labels, torch.tensor([NUM_THINGS + 1])]),
        "masks": torch.stack([*masks, stuff]),
        "iscrowd": torch.cat([iscrowd, torch.tensor([False])]),
        "image_id": image_id,
    }
    pred_masks, pred_labels = [], []
    for mask, label in zip(masks, labels):
        if torch.rand(1, generator=generator) < 0.8:
            jittered = mask.roll(int(torch.randint(-2, 3, (1,), generator=generator)), dims=1)
            pred_masks.append(jittered)
            flip = torch.rand(1, generator=generator) < 0.2
            pred_labels.append(
                int(torch.randint(0, NUM_THINGS, (1,), generator=generator)) if flip else int(label)
            )
    for _ in range(int(torch.randint(0, 3, (1,), generator=generator))):
        pred_masks.append(_box_mask(generator, size))
        pred_labels.append(int(torch.randint(0, NUM_THINGS, (1,), generator=generator)))
    scores = torch.rand(len(pred_masks), generator=generator)
    order = scores.argsort(descending=True)
    instance = InstancePrediction(
        masks=torch.stack(pred_masks)[order] if pred_masks else torch.zeros((0, *size), dtype=torch.bool),
        labels=torch.tensor(pred_labels, dtype=torch.int64)[order],
        scores=scores[order],
    )
    return Prediction(size, instance=instance), target


def cocoeval_reference(predictions: list[Prediction], targets: list[dict]) -> dict[str, float]:
    """COCOeval on COCO objects built here, with dataset-style category ids (not label + 1)."""

    def rle(mask: torch.Tensor) -> dict:
        return mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))

    dataset_id = {k: 10 + 7 * k for k in range(NUM_THINGS)}
    images, annotations, results = [], [], []
    for prediction, target in zip(predictions, targets):
        height, width = target["masks"].shape[1:]
        images.append({"id": target["image_id"], "height": height, "width": width})
        for mask, label, crowd in zip(target["masks"], target["labels"], target["iscrowd"]):
            if int(label) >= NUM_THINGS:
                continue
            encoded = rle(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": target["image_id"],
                    "category_id": dataset_id[int(label)],
                    "segmentation": encoded,
                    "area": float(mask.sum()),
                    "bbox": list(mask_utils.toBbox(encoded)),
                    "iscrowd": int(crowd),
                }
            )
        for mask, label, score in zip(
            prediction.instance.masks, prediction.instance.labels, prediction.instance.scores
        ):
            results.append(
                {
                    "image_id": target["image_id"],
                    "category_id": dataset_id[int(label)],
                    "segmentation": rle(mask),
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i} for i in dataset_id.values()],
        }
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {
        key: 100 * coco_eval.stats[i] if coco_eval.stats[i] >= 0 else float("nan")
        for i, key in enumerate(KEYS)
    }


def _dataset(seed: int, num_images: int) -> tuple[list[Prediction], list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    pairs = [random_image(generator, image_id=100 + i) for i in range(num_images)]
    return [p for p, _ in pairs], [t for _, t in pairs]


@pytest.mark.parametrize("seed", range(5))
def test_mask_ap_equals_cocoeval_on_the_same_rles(seed: int) -> None:
    predictions, targets = _dataset(seed, num_images=8)
    evaluator = InstanceEvaluator(num_thing_classes=NUM_THINGS)
    evaluator.process(predictions, targets)
    ours = evaluator.evaluate()
    expected = cocoeval_reference(predictions, targets)
    assert 0 < ours["mask_ap"] < 100
    for key in KEYS:
        assert ours[key] == pytest.approx(expected[key], abs=1e-9, nan_ok=True), key
    assert set(ours["per_class"]) <= {f"class_{k}" for k in range(NUM_THINGS)}


def test_merged_states_of_two_halves_equal_one_pass() -> None:
    predictions, targets = _dataset(11, num_images=10)
    one_pass = InstanceEvaluator(num_thing_classes=NUM_THINGS)
    one_pass.process(predictions, targets)
    states = []
    for part in (slice(0, 5), slice(5, 10)):
        evaluator = InstanceEvaluator(num_thing_classes=NUM_THINGS)
        evaluator.process(predictions[part], targets[part])
        states.append(pickle.loads(pickle.dumps(evaluator.state())))
    merged = InstanceEvaluator(num_thing_classes=NUM_THINGS)
    merged.merge(states)
    expected, got = one_pass.evaluate(), merged.evaluate()
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], nan_ok=True), key
    assert got["per_class"] == expected["per_class"]


def test_merging_states_without_image_ids_is_refused() -> None:
    predictions, targets = _dataset(12, num_images=4)
    for target in targets:
        del target["image_id"]
    states = []
    for part in (slice(0, 2), slice(2, 4)):
        evaluator = InstanceEvaluator(num_thing_classes=NUM_THINGS)
        evaluator.process(predictions[part], targets[part])
        states.append(evaluator.state())
    with pytest.raises(ValueError, match="image_id"):
        InstanceEvaluator(num_thing_classes=NUM_THINGS).merge(states)


def test_perfect_predictions_give_100_ap_and_no_predictions_give_0() -> None:
    predictions, targets = _dataset(13, num_images=4)
    perfect = []
    for target in targets:
        keep = (target["labels"] < NUM_THINGS) & ~target["iscrowd"]
        count = int(keep.sum())
        perfect.append(
            Prediction(
                tuple(target["masks"].shape[1:]),
                instance=InstancePrediction(target["masks"][keep], target["labels"][keep], torch.ones(count)),
            )
        )
    evaluator = InstanceEvaluator(num_thing_classes=NUM_THINGS)
    evaluator.process(perfect, targets)
    assert evaluator.evaluate()["mask_ap"] == pytest.approx(100.0)
    empty = [
        Prediction(
            p.image_size,
            instance=InstancePrediction(p.instance.masks[:0], p.instance.labels[:0], p.instance.scores[:0]),
        )
        for p in perfect
    ]
    evaluator.reset()
    evaluator.process(empty, targets)
    assert evaluator.evaluate()["mask_ap"] == 0.0


def test_stuff_labels_in_instance_predictions_are_refused() -> None:
    predictions, targets = _dataset(14, num_images=1)
    instance = predictions[0].instance
    bad = InstancePrediction(instance.masks[:1], torch.tensor([NUM_THINGS]), instance.scores[:1])
    with pytest.raises(ValueError, match="thing classes"):
        InstanceEvaluator(num_thing_classes=NUM_THINGS).process(
            [Prediction(predictions[0].image_size, instance=bad)], targets
        )
