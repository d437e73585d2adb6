"""knet.evaluation.evaluate: the one evaluation loop, alone or with evaluator states merged across processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from knet import KNetConfig, build_model
from knet.data import TransformConfig, build_dataset, collate_batch, synthesize
from knet.evaluation import (
    EvaluationResult,
    InstanceEvaluator,
    PanopticEvaluator,
    SemanticEvaluator,
    build_evaluators,
    evaluate,
    original_sizes,
    process_at_original_size,
)

SMALL = TransformConfig(test_short_side=48, test_max_size=64)  # 64x64 images seen at 48x48


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, KNetConfig, list, list[str]]:
    """A tiny random panoptic model and 4 val batches of one image each."""
    root: Path = tmp_path_factory.mktemp("synthetic")
    synthetic = synthesize(root, num_images=8, seed=1, image_size=(64, 64), val_fraction=0.5)
    dataset = build_dataset(synthetic.source("coco_panoptic", "val"), SMALL, train=False)
    categories = dataset.categories
    config = KNetConfig.for_task(
        "panoptic",
        num_thing_classes=categories.num_thing_classes,
        num_stuff_classes=categories.num_stuff_classes,
        backbone="resnet18",
        channels=32,
        num_proposals=4,
        num_stages=1,
        update={"feedforward_channels": 64, "num_heads": 4},
        inference={"instance_score_thr": 0.0},  # a random model's masks still count for mask AP
    )
    torch.manual_seed(0)
    model = build_model(config)
    batches = list(DataLoader(dataset, batch_size=1, collate_fn=collate_batch))
    assert len(batches) == 4
    return model, config, batches, categories.names


def by_hand(model: torch.nn.Module, batches: list, evaluators: dict[str, Any]) -> EvaluationResult:
    """The loop spelled out: predict at the original size, process, summarise."""
    model.eval()
    with torch.no_grad():
        for batch in batches:
            predictions = model(
                batch.images, image_sizes=batch.image_sizes, output_sizes=original_sizes(batch.metas)
            )
            process_at_original_size(evaluators.values(), predictions, batch.targets, batch.metas)
    result = EvaluationResult()
    for name, evaluator in evaluators.items():
        summary = evaluator.evaluate()
        result.per_class[name] = summary.pop("per_class")
        result.metrics.update({key: float(value) for key, value in summary.items()})
    return result


def test_build_evaluators_makes_one_evaluator_per_part_the_model_predicts() -> None:
    panoptic = KNetConfig.for_task("panoptic", num_thing_classes=2, num_stuff_classes=1, backbone="resnet18")
    evaluators = build_evaluators(panoptic, ["a", "b", "sky"])
    assert {name: type(e) for name, e in evaluators.items()} == {
        "panoptic": PanopticEvaluator,
        "instance": InstanceEvaluator,
        "semantic": SemanticEvaluator,
    }
    assert evaluators["instance"].class_names == ["a", "b"]  # things only
    instance = KNetConfig.for_task("instance", num_thing_classes=2, num_stuff_classes=0, backbone="resnet18")
    assert list(build_evaluators(instance)) == ["instance"]
    semantic = KNetConfig.for_task("semantic", num_thing_classes=0, num_stuff_classes=3, backbone="resnet18")
    assert list(build_evaluators(semantic)) == ["semantic"]


def test_build_evaluators_refuses_a_config_with_every_output_off() -> None:
    config = KNetConfig.for_task(
        "panoptic",
        num_thing_classes=2,
        num_stuff_classes=1,
        inference={"panoptic_on": False, "instance_on": False, "semantic_on": False},
    )
    with pytest.raises(ValueError, match="switches every output off"):
        build_evaluators(config)


def test_evaluate_equals_the_loop_written_by_hand(setup) -> None:  # noqa: ANN001
    model, config, batches, names = setup
    result = evaluate(model, batches, build_evaluators(config, names), device="cpu")
    expected = by_hand(model, batches, build_evaluators(config, names))
    assert set(result.metrics) == set(expected.metrics) >= {"pq", "pq_th", "pq_st", "mask_ap", "miou"}
    assert all(type(value) is float for value in result.metrics.values())
    np.testing.assert_equal(result.metrics, expected.metrics)  # NaN equals NaN here
    np.testing.assert_equal(result.per_class, expected.per_class)
    assert set(result.per_class) == {"panoptic", "instance", "semantic"}
    assert set(result.per_class["semantic"]) <= set(names)


def test_states_gathered_from_two_processes_merge_to_the_single_process_result(setup) -> None:  # noqa: ANN001
    model, config, batches, names = setup
    whole = evaluate(model, batches, build_evaluators(config, names), device="cpu")
    second_half: dict[str, Any] = {}

    def gather_on_rank_1(states: dict[str, Any]) -> None:
        second_half.update(states)  # what all_gather_object would send to rank 0
        return None

    assert (
        evaluate(model, batches[2:], build_evaluators(config, names), device="cpu", gather=gather_on_rank_1)
        is None
    )
    assert set(second_half) == {"panoptic", "instance", "semantic"}

    def gather_on_rank_0(states: dict[str, Any]) -> list[dict[str, Any]]:
        return [states, second_half]

    merged = evaluate(
        model, batches[:2], build_evaluators(config, names), device="cpu", gather=gather_on_rank_0
    )
    assert merged is not None and set(merged.metrics) == set(whole.metrics)
    alone = evaluate(model, batches[:2], build_evaluators(config, names), device="cpu")
    assert alone.metrics["aacc"] != whole.metrics["aacc"]  # so the second half did count
    # Sums over two halves add in another order than one sum over all: equal up to rounding.
    assert merged.metrics == pytest.approx(whole.metrics, rel=1e-12, nan_ok=True)
    assert merged.per_class.keys() == whole.per_class.keys()
    for name, table in whole.per_class.items():
        assert merged.per_class[name].keys() == table.keys()
        for class_name, row in table.items():
            assert merged.per_class[name][class_name] == pytest.approx(row, rel=1e-12, nan_ok=True)


def test_a_process_whose_gather_returns_none_gets_none(setup) -> None:  # noqa: ANN001
    model, config, batches, names = setup
    assert (
        evaluate(model, batches[:1], build_evaluators(config, names), device="cpu", gather=lambda s: None)
        is None
    )
