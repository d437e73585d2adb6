from __future__ import annotations

import pickle
from collections import defaultdict

import pytest
import torch
from torchmetrics.detection import PanopticQuality

from knet.evaluation import PanopticEvaluator
from knet.evaluation.panoptic import image_pq_stats
from tests.knet.evaluation.random_cases import PanopticCase, random_case

NUM_THINGS, NUM_STUFF = 3, 2


def brute_force_pq(cases: list[PanopticCase], num_things: int, num_stuff: int) -> dict:
    """panopticapi's pq_compute_single_core + pq_average, pixel by pixel (fractions, not percent)."""
    num_classes = num_things + num_stuff
    tp, fp, fn = defaultdict(int), defaultdict(int), defaultdict(int)
    iou_sum = defaultdict(float)
    for case in cases:
        overlap: dict[tuple[int, int], int] = defaultdict(int)
        gt_area: dict[int, int] = defaultdict(int)
        pred_area: dict[int, int] = defaultdict(int)
        height, width = case.gt_ids.shape
        for y in range(height):
            for x in range(width):
                g, p = int(case.gt_ids[y, x]), int(case.pred_ids[y, x])
                overlap[(g, p)] += 1
                gt_area[g] += 1
                pred_area[p] += 1
        gt_label = {g: int(case.gt_labels[g - 1]) for g in gt_area if g}
        crowd = {g: bool(case.gt_iscrowd[g - 1]) for g in gt_area if g}
        pred_label = {p: int(case.pred_labels[p - 1]) for p in pred_area if p}
        matched_gt, matched_pred = set(), set()
        for (g, p), intersection in overlap.items():
            if g == 0 or p == 0 or crowd[g] or gt_label[g] != pred_label[p]:
                continue
            union = pred_area[p] + gt_area[g] - intersection - overlap.get((0, p), 0)
            iou = intersection / union
            if iou > 0.5:
                tp[gt_label[g]] += 1
                iou_sum[gt_label[g]] += iou
                matched_gt.add(g)
                matched_pred.add(p)
        # crowd_labels_dict[category_id] = gt_label, overwritten in segments_info order: a class's crowd
        # region is its LAST crowd segment, even when the image has several
        crowd_of_class = {}
        for g in range(1, len(case.gt_labels) + 1):
            if bool(case.gt_iscrowd[g - 1]):
                crowd_of_class[int(case.gt_labels[g - 1])] = g
        for g in gt_label:
            if g not in matched_gt and not crowd[g]:
                fn[gt_label[g]] += 1
        for p in pred_label:
            if p in matched_pred:
                continue
            ignored = overlap.get((0, p), 0)
            if pred_label[p] in crowd_of_class:
                ignored += overlap.get((crowd_of_class[pred_label[p]], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            fp[pred_label[p]] += 1

    def average(classes: range) -> tuple[float, float, float]:
        pq = sq = rq = 0.0
        n = 0
        for k in classes:
            if tp[k] + fp[k] + fn[k] == 0:
                continue
            n += 1
            pq += iou_sum[k] / (tp[k] + 0.5 * fp[k] + 0.5 * fn[k])
            sq += iou_sum[k] / tp[k] if tp[k] else 0.0
            rq += tp[k] / (tp[k] + 0.5 * fp[k] + 0.5 * fn[k])
        return (pq / n, sq / n, rq / n) if n else (0.0, 0.0, 0.0)

    result = {}
    for suffix, classes in (
        ("", range(num_classes)),
        ("_th", range(num_things)),
        ("_st", range(num_things, num_classes)),
    ):
        result[f"pq{suffix}"], result[f"sq{suffix}"], result[f"rq{suffix}"] = average(classes)
    result["per_class"] = {
        f"class_{k}": average(range(k, k + 1))[0] for k in range(num_classes) if tp[k] + fp[k] + fn[k]
    }
    return result


def evaluate_cases(cases: list[PanopticCase]) -> dict:
    evaluator = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
    evaluator.process([case.prediction() for case in cases], [case.target() for case in cases])
    return evaluator.evaluate()


@pytest.mark.parametrize("seed", range(60))
def test_pq_equals_brute_force_panopticapi_with_void_and_crowd(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    cases = [random_case(generator, NUM_THINGS, NUM_STUFF) for _ in range(1 + seed % 3)]
    ours = evaluate_cases(cases)
    expected = brute_force_pq(cases, NUM_THINGS, NUM_STUFF)
    for key in ("pq", "sq", "rq", "pq_th", "sq_th", "rq_th", "pq_st", "sq_st", "rq_st"):
        assert ours[key] == pytest.approx(100 * expected[key], abs=1e-9), key
    assert {name: v["pq"] for name, v in ours["per_class"].items()} == pytest.approx(
        {name: 100 * v for name, v in expected["per_class"].items()}, abs=1e-9
    )


def test_random_cases_exercise_crowd_void_and_misses() -> None:
    generator = torch.Generator().manual_seed(0)
    cases = [random_case(generator, NUM_THINGS, NUM_STUFF) for _ in range(60)]
    assert sum(bool(c.gt_iscrowd.any()) for c in cases) >= 5
    crowd_classes = [c.gt_labels[c.gt_iscrowd].tolist() for c in cases]
    assert sum(len(labels) > len(set(labels)) for labels in crowd_classes) >= 5  # 2+ crowds of a class
    assert sum(bool((c.gt_ids == 0).any()) for c in cases) >= 20
    assert sum(bool((c.pred_ids == 0).any()) for c in cases) >= 10
    pq = evaluate_cases(cases)["pq"]
    assert 5.0 < pq < 95.0


def test_only_the_last_listed_crowd_segment_of_a_class_excuses_a_prediction() -> None:
    # panopticapi: the class-0 prediction lies 3/8 on the last crowd (B) and 3/8 on the other crowd (A);
    # only B counts, 3/8 <= 0.5, so it is a false positive (summing both crowds would give 6/8 and no FP).
    # One row of 12 pixels: crowd A (class 0) pixels 0-3, crowd B (class 0) 4-7, segment C (class 1) 8-11.
    gt_ids = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]])
    pred_ids = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0]])  # 3 px of A, 3 of B, 2 of C
    case = PanopticCase(
        gt_ids, torch.tensor([0, 0, 1]), torch.tensor([True, True, False]), pred_ids, torch.tensor([0])
    )
    stats = image_pq_stats(
        case.gt_ids, case.gt_labels, case.gt_iscrowd, case.pred_ids, case.pred_labels, num_classes=2
    )
    assert (stats.tp.tolist(), stats.fp.tolist(), stats.fn.tolist()) == ([0, 0], [1, 0], [0, 1])
    assert brute_force_pq([case], 2, 0)["per_class"] == {"class_0": 0.0, "class_1": 0.0}


def test_the_crowd_listed_last_decides_whatever_the_overlap() -> None:
    # The prediction covers 5 pixels of crowd A and 1 of crowd B (plus 2 of C). Listed A then B: B is
    # the crowd region, 1/8 -> FP. Listed B then A: A is, 5/8 > 0.5 -> ignored.
    gt_ids = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]])
    pred_ids = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0]])
    labels, iscrowd = torch.tensor([0, 0, 1]), torch.tensor([True, True, False])
    a_then_b = image_pq_stats(gt_ids, labels, iscrowd, pred_ids, torch.tensor([0]), num_classes=2)
    swapped = torch.tensor([[2, 2, 2, 2, 2, 1, 1, 1, 3, 3, 3, 3]])  # same pixels, A listed second
    b_then_a = image_pq_stats(swapped, labels, iscrowd, pred_ids, torch.tensor([0]), num_classes=2)
    assert a_then_b.fp.tolist() == [1, 0] and b_then_a.fp.tolist() == [0, 0]
    for ids, fp in ((gt_ids, 1), (swapped, 0)):
        case = PanopticCase(ids, labels, iscrowd, pred_ids, torch.tensor([0]))
        expected_class_0 = brute_force_pq([case], 2, 0)["per_class"].get("class_0")
        assert expected_class_0 == (0.0 if fp else None)  # class 0 counted only when it has the FP


def _torchmetrics_input(ids: torch.Tensor, labels: torch.Tensor, void_category: int) -> torch.Tensor:
    """(H, W) id map -> (H, W, 2) (category, instance) pairs; VOID pixels get an unknown category."""
    lookup = torch.cat([torch.tensor([void_category]), labels])
    categories = lookup[ids]  # (H, W)
    return torch.stack([categories, ids], dim=-1)


@pytest.mark.parametrize("seed", range(50))
def test_pq_equals_torchmetrics_without_crowd_or_predicted_void(seed: int) -> None:
    # torchmetrics differs from panopticapi on predicted VOID (it also drops such pixels from the union
    # and never counts mostly-unpredicted GT as FN) and has no crowd: compare where both agree.
    generator = torch.Generator().manual_seed(1000 + seed)
    cases = [
        random_case(generator, NUM_THINGS, NUM_STUFF, with_crowd=False, pred_void=False)
        for _ in range(1 + seed % 3)
    ]
    assert all(not bool((c.pred_ids == 0).any()) for c in cases)
    metric = PanopticQuality(
        things=set(range(NUM_THINGS)),
        stuffs=set(range(NUM_THINGS, NUM_THINGS + NUM_STUFF)),
        return_sq_and_rq=True,
    )
    for case in cases:
        preds = _torchmetrics_input(case.pred_ids, case.pred_labels, 99)[None]
        target = _torchmetrics_input(case.gt_ids, case.gt_labels, 99)[None]
        metric.update(preds, target)
    pq, sq, rq = (100 * float(v) for v in metric.compute())
    ours = evaluate_cases(cases)
    assert (ours["pq"], ours["sq"], ours["rq"]) == pytest.approx(
        (pq, sq, rq), rel=1e-6
    )  # torchmetrics rq is float32


def test_merged_states_of_two_halves_equal_one_pass() -> None:
    generator = torch.Generator().manual_seed(7)
    cases = [random_case(generator, NUM_THINGS, NUM_STUFF) for _ in range(10)]
    halves = []
    for part in (cases[:5], cases[5:]):
        evaluator = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
        evaluator.process([c.prediction() for c in part], [c.target() for c in part])
        halves.append(pickle.loads(pickle.dumps(evaluator.state())))
    merged = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
    merged.merge(halves)
    assert _nested_close(merged.evaluate(), evaluate_cases(cases))


def _nested_close(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _nested_close(a[key], b[key])
        else:
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
    return True


def test_perfect_prediction_scores_100_and_reset_clears() -> None:
    generator = torch.Generator().manual_seed(3)
    case = random_case(generator, NUM_THINGS, NUM_STUFF, with_crowd=False)
    perfect = PanopticCase(case.gt_ids, case.gt_labels, case.gt_iscrowd, case.gt_ids, case.gt_labels)
    evaluator = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
    evaluator.process([perfect.prediction()], [perfect.target()])
    assert evaluator.evaluate()["pq"] == pytest.approx(100.0)
    evaluator.reset()
    assert evaluator.evaluate()["pq"] == 0.0 and evaluator.evaluate()["per_class"] == {}


def test_prediction_of_another_size_is_refused() -> None:
    generator = torch.Generator().manual_seed(4)
    case = random_case(generator, NUM_THINGS, NUM_STUFF)
    evaluator = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
    small = PanopticCase(case.gt_ids, case.gt_labels, case.gt_iscrowd, case.pred_ids[:-1], case.pred_labels)
    with pytest.raises(ValueError, match="Prediction.resized"):
        evaluator.process([small.prediction()], [case.target()])


def test_segment_ids_without_a_label_are_refused() -> None:
    evaluator = PanopticEvaluator(num_thing_classes=NUM_THINGS, num_stuff_classes=NUM_STUFF)
    gt_ids = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match="predicted id map"):
        evaluator.process_id_maps(
            gt_ids,
            torch.tensor([0]),
            torch.tensor([False]),
            torch.tensor([[1, 2], [3, 3]]),
            torch.tensor([0, 1]),
        )
