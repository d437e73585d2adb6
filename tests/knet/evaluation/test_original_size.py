"""process_at_original_size scores a batch the model saw resized against targets at the original size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from knet.data import TransformConfig, build_dataset, collate_batch, synthesize
from knet.data.transforms import eval_transform, resize
from knet.evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator, process_at_original_size
from knet.evaluation._common import masks_to_id_map
from knet.structures import InstancePrediction, PanopticPrediction, Prediction, SemanticPrediction

HALF = TransformConfig(test_short_side=32, test_max_size=96)  # 64x80 -> 32x40


def as_prediction(target: dict, num_thing_classes: int) -> Prediction:
    """The target itself as a prediction with every part, at the size of its masks."""
    masks, labels = target["masks"], target["labels"]
    size = tuple(masks.shape[-2:])
    things = labels < num_thing_classes
    label_map = torch.full(size, 0, dtype=torch.int64)
    for label, mask in zip(labels, masks):
        label_map[mask] = label
    return Prediction(
        size,
        panoptic=PanopticPrediction(masks_to_id_map(masks), labels, torch.ones(len(labels)), things),
        instance=InstancePrediction(masks[things], labels[things], torch.ones(int(things.sum()))),
        semantic=SemanticPrediction(label_map),
    )


def evaluators(things: int, stuff: int) -> tuple[PanopticEvaluator, InstanceEvaluator, SemanticEvaluator]:
    return PanopticEvaluator(things, stuff), InstanceEvaluator(things), SemanticEvaluator(things + stuff)


def test_a_halved_val_batch_is_scored_with_targets_and_predictions_at_the_original_size(tmp_path) -> None:
    synthetic = synthesize(tmp_path, num_images=4, seed=3, image_size=(64, 80), val_fraction=0.5)
    ds = build_dataset(synthetic.source("coco_panoptic", "val"), HALF, train=False)
    things, stuff = ds.categories.num_thing_classes, ds.categories.num_stuff_classes
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_batch)))
    assert batch.images.shape[-2:] == (32, 40) and batch.image_sizes == [(32, 40), (32, 40)]
    assert [tuple(t["masks"].shape[-2:]) for t in batch.targets] == [(64, 80), (64, 80)]
    assert [m["orig_size"] for m in batch.metas] == [(64, 80), (64, 80)]
    # What a model gives at the test size: here the targets sampled at half resolution.
    halved = [{**t, "masks": t["masks"][:, 1::2, 1::2]} for t in batch.targets]
    predictions = [as_prediction(t, things) for t in halved]
    assert [p.image_size for p in predictions] == batch.image_sizes
    panoptic, instance, semantic = evaluators(things, stuff)
    process_at_original_size([panoptic, instance, semantic], predictions, batch.targets, batch.metas)
    state = instance.state()
    assert [(i["height"], i["width"]) for i in state.images] == [(64, 80), (64, 80)]
    assert state.detections and all(d["segmentation"]["size"] == [64, 80] for d in state.detections)
    labelled_pixels = sum(int(t["masks"].sum()) for t in batch.targets)  # at the original size
    assert int(semantic.state().sum()) == labelled_pixels
    # Mapped back by nearest neighbour, the half-resolution masks are close to the originals, not equal.
    assert 50.0 < panoptic.evaluate()["pq"] < 100.0
    assert 50.0 < semantic.evaluate()["miou"] < 100.0


def test_a_perfect_prediction_at_the_original_size_scores_100_where_halving_would_lose_a_segment() -> None:
    # 16x24: a thing (class 0) on the right, a stuff region (class 2) on the left, cut by a thin stuff
    # line (class 1) one pixel wide at column 4, which halving (columns 1, 3, 5, ...) never samples.
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(24), indexing="ij")
    line = xs == 4
    thing = xs >= 12
    rest = ~line & ~thing
    target = {
        "labels": torch.tensor([0, 1, 2]),
        "masks": torch.stack([thing, line, rest]),
        "iscrowd": torch.zeros(3, dtype=torch.bool),
        "image_id": 7,
    }
    image = (torch.stack([thing, line, rest]) * 255).to(torch.uint8)  # (3, 16, 24)
    cfg = TransformConfig(test_short_side=8, test_max_size=100)
    assert resize(image, target, (8, 12))[1]["labels"].tolist() == [0, 2]  # resized targets lose the line

    resized_image, eval_target, _ = eval_transform(image, target, cfg)
    assert resized_image.shape == (3, 8, 12)
    assert eval_target["labels"].tolist() == [0, 1, 2] and torch.equal(eval_target["masks"], target["masks"])
    panoptic, instance, semantic = evaluators(1, 2)
    prediction = as_prediction(target, num_thing_classes=1)
    process_at_original_size(
        [panoptic, instance, semantic], [prediction], [eval_target], [{"orig_size": (16, 24)}]
    )
    pq, miou = panoptic.evaluate(), semantic.evaluate()
    assert pq["pq"] == pytest.approx(100.0) and miou["miou"] == pytest.approx(100.0)
    assert set(pq["per_class"]) == {"class_0", "class_1", "class_2"}  # the thin line was scored
    assert instance.evaluate()["mask_ap"] == pytest.approx(100.0)


def test_a_target_not_at_the_original_size_is_refused() -> None:
    target = {"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 12, dtype=torch.bool)}
    prediction = as_prediction(target, num_thing_classes=1)
    with pytest.raises(
        ValueError, match=r"target masks are \(8, 12\) but the image's orig_size is \(16, 24\)"
    ):
        process_at_original_size([SemanticEvaluator(2)], [prediction], [target], [{"orig_size": (16, 24)}])
