"""Written results, scored by evaluate_results from the files, give the in-memory evaluators' numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from knet.evaluation import (
    CocoInstanceResultsWriter,
    InstanceEvaluator,
    PanopticEvaluator,
    PanopticResultsWriter,
    SemanticEvaluator,
    evaluate_results,
    write_semantic_png,
)
from knet.structures import Prediction, SemanticPrediction
from tests.knet.evaluation.random_cases import random_case
from tests.knet.evaluation.test_instance import NUM_THINGS as INSTANCE_THINGS
from tests.knet.evaluation.test_instance import random_image

NUM_THINGS, NUM_STUFF = 3, 2
DATASET_IDS = [5, 9, 11, 20, 31]  # contiguous id k <-> dataset id DATASET_IDS[k]
PANOPTIC_KEYS = ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st")


def _rgb(ids: np.ndarray) -> np.ndarray:
    # written here independently of knet.evaluation.writers: id = R + 256 G + 256^2 B
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def test_panoptic_png_and_json_round_trip_through_evaluate_results(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    cases = [random_case(generator, NUM_THINGS, NUM_STUFF, size=(20, 24), num_segments=8) for _ in range(12)]
    gt_dir = tmp_path / "panoptic_val"
    gt_dir.mkdir()
    gt_annotations = []
    writer = PanopticResultsWriter(tmp_path / "pred", to_dataset_id=DATASET_IDS.__getitem__)
    for image_id, case in enumerate(cases, start=40):
        gt_ids = case.gt_ids.numpy() * 3  # GT segment ids need not be 1..G
        Image.fromarray(_rgb(gt_ids)).save(gt_dir / f"{image_id:06d}.png")
        segments = [
            {"id": 3 * (g + 1), "category_id": DATASET_IDS[int(label)], "iscrowd": int(crowd)}
            for g, (label, crowd) in enumerate(zip(case.gt_labels, case.gt_iscrowd))
        ]
        gt_annotations.append(
            {"image_id": image_id, "file_name": f"{image_id:06d}.png", "segments_info": segments}
        )
        writer.add(case.prediction(), image_id=image_id, file_name=f"{image_id:06d}.jpg")
    categories = [
        {"id": d, "name": f"c{d}", "isthing": int(k < NUM_THINGS)} for k, d in enumerate(DATASET_IDS)
    ]
    (tmp_path / "panoptic_val.json").write_text(
        json.dumps({"annotations": gt_annotations, "categories": categories})
    )
    writer.write(tmp_path / "pred.json")

    from_files = evaluate_results("panoptic", tmp_path / "panoptic_val.json", tmp_path / "pred.json")
    in_memory = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
    in_memory.process([c.prediction() for c in cases], [c.target() for c in cases])
    expected = in_memory.evaluate()
    assert 0 < expected["pq"] < 100
    for key in PANOPTIC_KEYS:
        assert from_files[key] == pytest.approx(expected[key], abs=1e-9), key
    written = json.loads((tmp_path / "pred.json").read_text())["annotations"][0]
    assert {s["category_id"] for s in written["segments_info"]} <= set(DATASET_IDS)


def test_coco_results_json_round_trips_through_evaluate_results(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(6)
    pairs = [random_image(generator, image_id=7 + i) for i in range(8)]
    to_dataset = [3, 8, 14]
    images, annotations = [], []
    writer = CocoInstanceResultsWriter(to_dataset_id=to_dataset.__getitem__)
    for prediction, target in pairs:
        height, width = target["masks"].shape[1:]
        images.append({"id": target["image_id"], "height": height, "width": width})
        for mask, label, crowd in zip(target["masks"], target["labels"], target["iscrowd"]):
            if int(label) >= INSTANCE_THINGS:
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": target["image_id"],
                    "category_id": to_dataset[int(label)],
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": int(crowd),
                }
            )
        writer.add(prediction, image_id=target["image_id"])
    gt = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": d, "name": str(d)} for d in to_dataset],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    writer.write(tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)

    from_files = evaluate_results("instance", tmp_path / "gt.json", tmp_path / "results.json")
    in_memory = InstanceEvaluator(num_thing_classes=INSTANCE_THINGS)
    in_memory.process([p for p, _ in pairs], [t for _, t in pairs])
    expected = in_memory.evaluate()
    assert 0 < expected["mask_ap"] < 100
    for key in ("mask_ap", "mask_ap50", "mask_ap75", "mask_aps", "mask_apm", "mask_apl"):
        assert from_files[key] == pytest.approx(expected[key], abs=1e-9, nan_ok=True), key


@pytest.mark.parametrize("reduce_zero_label", [False, True])
def test_semantic_pngs_round_trip_through_evaluate_results(tmp_path: Path, reduce_zero_label: bool) -> None:
    generator = torch.Generator().manual_seed(8)
    num_classes, size = 4, (13, 17)
    predictions, targets = [], []
    for index in range(5):
        gt = torch.randint(-1, num_classes, size, generator=generator)  # -1 = unlabelled
        pred = torch.where(
            torch.rand(size, generator=generator) < 0.7,
            gt.clamp(min=0),
            torch.randint(0, num_classes, size, generator=generator),
        )
        present = [c for c in range(num_classes) if bool((gt == c).any())]
        targets.append({"labels": torch.tensor(present), "masks": torch.stack([gt == c for c in present])})
        predictions.append(Prediction(size, semantic=SemanticPrediction(pred)))
        gt_png = np.where(
            gt.numpy() < 0, 0 if reduce_zero_label else 255, gt.numpy() + int(reduce_zero_label)
        )
        (tmp_path / "gt").mkdir(exist_ok=True)
        Image.fromarray(gt_png.astype(np.uint8)).save(tmp_path / "gt" / f"img{index}.png")
        write_semantic_png(
            predictions[-1], tmp_path / "pred" / f"img{index}.png", reduce_zero_label=reduce_zero_label
        )

    from_files = evaluate_results(
        "semantic",
        tmp_path / "gt",
        tmp_path / "pred",
        num_classes=num_classes,
        reduce_zero_label=reduce_zero_label,
    )
    in_memory = SemanticEvaluator(num_classes=num_classes)
    in_memory.process(predictions, targets)
    expected = in_memory.evaluate()
    assert 0 < expected["miou"] < 100
    for key in ("miou", "macc", "aacc"):
        assert from_files[key] == pytest.approx(expected[key], abs=1e-9), key


def test_semantic_png_maps_contiguous_ids_to_dataset_ids(tmp_path: Path) -> None:
    prediction = Prediction((2, 2), semantic=SemanticPrediction(torch.tensor([[0, 1], [2, 1]])))
    path = write_semantic_png(prediction, tmp_path / "x.png", to_dataset_id=[7, 8, 9].__getitem__)
    assert np.asarray(Image.open(path)).tolist() == [[7, 8], [9, 8]]


def test_missing_prediction_for_a_gt_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "gt" / "a.png")
    with pytest.raises(ValueError, match="no prediction"):
        evaluate_results("semantic", tmp_path / "gt", tmp_path / "pred", num_classes=2)
