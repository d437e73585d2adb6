from __future__ import annotations

import math
import pickle

import pytest
import torch

from knet.evaluation import SemanticEvaluator
from knet.structures import Prediction, SemanticPrediction

NUM_CLASSES = 5


def random_image(generator: torch.Generator, size: tuple[int, int] = (9, 11)) -> tuple[Prediction, dict]:
    """GT: one mask per class present (classes 0..3 only, so class 4 is never in GT), some pixels
    unlabelled; prediction: random labels in [0, 4) plus rarely 4, so some classes are absent."""
    gt = torch.randint(-1, NUM_CLASSES - 1, size, generator=generator)  # -1 = unlabelled
    present = [c for c in range(NUM_CLASSES) if bool((gt == c).any())]
    target = {
        "labels": torch.tensor(present, dtype=torch.int64),
        "masks": torch.stack([gt == c for c in present])
        if present
        else torch.zeros((0, *size), dtype=torch.bool),
    }
    pred = gt.clamp(min=0).clone()
    noise = torch.rand(size, generator=generator) < 0.3
    pred[noise] = torch.randint(0, NUM_CLASSES - 2, size, generator=generator)[noise]
    if torch.rand(1, generator=generator) < 0.3:
        pred[0, 0] = NUM_CLASSES - 1
    return Prediction(size, semantic=SemanticPrediction(pred)), target


def brute_force(pairs: list[tuple[Prediction, dict]]) -> dict[str, float]:
    """Per class: intersection / union and correct / GT pixels, counted pixel by pixel."""
    inter = [0] * NUM_CLASSES
    union = [0] * NUM_CLASSES
    gt_pixels = [0] * NUM_CLASSES
    correct = total = 0
    for prediction, target in pairs:
        height, width = prediction.image_size
        for y in range(height):
            for x in range(width):
                covering = [int(lab) for lab, m in zip(target["labels"], target["masks"]) if m[y, x]]
                if not covering:
                    continue
                g, p = covering[0], int(prediction.semantic.label_map[y, x])
                total += 1
                gt_pixels[g] += 1
                correct += g == p
                for c in range(NUM_CLASSES):
                    inter[c] += g == c and p == c
                    union[c] += g == c or p == c
    ious = [inter[c] / union[c] for c in range(NUM_CLASSES) if union[c]]
    accs = [inter[c] / gt_pixels[c] for c in range(NUM_CLASSES) if gt_pixels[c]]
    return {
        "miou": 100 * sum(ious) / len(ious),
        "macc": 100 * sum(accs) / len(accs),
        "aacc": 100 * correct / total,
    }


@pytest.mark.parametrize("seed", range(10))
def test_miou_macc_aacc_equal_per_class_brute_force_counts(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    pairs = [random_image(generator) for _ in range(3)]
    evaluator = SemanticEvaluator(num_classes=NUM_CLASSES)
    evaluator.process([p for p, _ in pairs], [t for _, t in pairs])
    ours = evaluator.evaluate()
    expected = brute_force(pairs)
    for key in ("miou", "macc", "aacc"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key


def test_class_absent_from_gt_and_prediction_is_left_out_of_the_mean() -> None:
    label_map = torch.tensor([[0, 0], [1, 1]])
    target = {"labels": torch.tensor([0, 1]), "masks": torch.stack([label_map == 0, label_map == 1])}
    evaluator = SemanticEvaluator(num_classes=3)
    evaluator.process(
        [Prediction((2, 2), semantic=SemanticPrediction(torch.tensor([[0, 0], [0, 1]])))], [target]
    )
    metrics = evaluator.evaluate()
    assert metrics["miou"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)  # class 2 excluded, not 0
    assert set(metrics["per_class"]) == {"class_0", "class_1"}
    assert not math.isnan(metrics["aacc"]) and metrics["aacc"] == pytest.approx(75.0)


def test_merged_states_of_two_halves_equal_one_pass() -> None:
    generator = torch.Generator().manual_seed(21)
    pairs = [random_image(generator) for _ in range(6)]
    one_pass = SemanticEvaluator(num_classes=NUM_CLASSES)
    one_pass.process([p for p, _ in pairs], [t for _, t in pairs])
    states = []
    for part in (pairs[:3], pairs[3:]):
        evaluator = SemanticEvaluator(num_classes=NUM_CLASSES)
        evaluator.process([p for p, _ in part], [t for _, t in part])
        states.append(pickle.loads(pickle.dumps(evaluator.state())))
    merged = SemanticEvaluator(num_classes=NUM_CLASSES)
    merged.merge(states)
    assert (merged.state() == one_pass.state()).all()
    got, expected = merged.evaluate(), one_pass.evaluate()
    assert [got[k] for k in ("miou", "macc", "aacc")] == [expected[k] for k in ("miou", "macc", "aacc")]
    for name, values in expected["per_class"].items():  # a class only predicted has a NaN accuracy
        assert got["per_class"][name] == pytest.approx(values, nan_ok=True)


def test_out_of_range_predictions_and_overlapping_masks_are_refused() -> None:
    evaluator = SemanticEvaluator(num_classes=2)
    target = {"labels": torch.tensor([0]), "masks": torch.ones((1, 2, 2), dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        evaluator.process([Prediction((2, 2), semantic=SemanticPrediction(torch.full((2, 2), 7)))], [target])
    overlapping = {"labels": torch.tensor([0, 1]), "masks": torch.ones((2, 2, 2), dtype=torch.bool)}
    with pytest.raises(ValueError, match="overlap"):
        evaluator.process([Prediction((2, 2), semantic=SemanticPrediction(torch.zeros(2, 2)))], [overlapping])
