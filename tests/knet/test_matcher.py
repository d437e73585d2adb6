"""HungarianMatcher: optimal one-to-one assignment, batch independence, empty images, too many targets."""

from __future__ import annotations

import itertools

import pytest
import torch

from knet.matcher import HungarianMatcher, dice_cost, focal_cost, mask_agreement_cost
from knet.targets import MaskTargets


def _targets(labels: torch.Tensor, masks: torch.Tensor) -> MaskTargets:
    empty = masks.new_zeros((0, *masks.shape[-2:]))
    return MaskTargets(masks, labels, empty, labels.new_zeros(0))


def _random_case(generator: torch.Generator, kernels: int, count: int, classes: int = 5):
    mask_logits = torch.randn(1, kernels, 6, 7, generator=generator) * 2
    cls_logits = torch.randn(1, kernels, classes, generator=generator)
    masks = torch.rand(count, 6, 7, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return mask_logits, cls_logits, _targets(labels, masks)


def _reference_cost(mask_logits, cls_logits, target, weights=(2.0, 4.0, 1.0)) -> torch.Tensor:
    """Cost matrix written element by element from the spec formulas."""
    probs = mask_logits[0].sigmoid().flatten(1)
    masks = target.thing_masks.flatten(1)
    cost = torch.zeros(probs.shape[0], masks.shape[0])
    for n, m in itertools.product(range(probs.shape[0]), range(masks.shape[0])):
        p, t = probs[n], masks[m]
        dice = -(2 * (p * t).sum()) / ((p * p).sum() + 1e-3 + (t * t).sum() + 1e-3)
        agree = -((p * t).sum() + ((1 - p) * (1 - t)).sum()) / p.numel()
        cost[n, m] = weights[1] * dice + weights[2] * agree
        if cls_logits is not None:
            q = cls_logits[0, n, target.thing_labels[m]].sigmoid()
            focal = 0.25 * (1 - q) ** 2 * -torch.log(q + 1e-12) - 0.75 * q**2 * -torch.log(1 - q + 1e-12)
            cost[n, m] += weights[0] * focal
    return cost


def _brute_force_best(cost: torch.Tensor) -> float:
    kernels, count = cost.shape
    return min(
        sum(cost[rows[m], m].item() for m in range(count))
        for rows in itertools.permutations(range(kernels), count)
    )


@pytest.mark.parametrize("with_classes", [True, False])
def test_matcher_total_cost_equals_brute_force_optimum(with_classes: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    for kernels, count in [(4, 4), (5, 3), (6, 2), (3, 1)]:
        mask_logits, cls_logits, target = _random_case(generator, kernels, count)
        cls_logits = cls_logits if with_classes else None
        cost = _reference_cost(mask_logits, cls_logits, target)
        assert torch.allclose(matcher.cost_matrices(mask_logits, cls_logits, [target])[0], cost, atol=1e-5)
        rows, cols = matcher(mask_logits, cls_logits, [target])[0]
        assert rows.dtype == cols.dtype == torch.int64
        assert sorted(cols.tolist()) == list(range(count)) and len(set(rows.tolist())) == count
        assert cost[rows, cols].sum().item() == pytest.approx(_brute_force_best(cost), abs=1e-5)


def test_cost_functions_match_the_spec_formulas() -> None:
    generator = torch.Generator().manual_seed(1)
    mask_logits, cls_logits, target = _random_case(generator, 3, 2)
    probs = mask_logits[0].sigmoid().flatten(1)
    masks = target.thing_masks.flatten(1)
    p, t = probs[1], masks[0]
    assert dice_cost(probs, masks)[1, 0] == pytest.approx(
        (-(2 * (p * t).sum()) / ((p**2).sum() + (t**2).sum() + 2e-3)).item(), rel=1e-5
    )
    assert mask_agreement_cost(probs, masks)[1, 0] == pytest.approx(
        (-(p * t + (1 - p) * (1 - t)).mean()).item(), rel=1e-5
    )
    q = cls_logits[0, 2, target.thing_labels[1]].sigmoid()
    expected = 0.25 * (1 - q) ** 2 * -torch.log(q + 1e-12) - 0.75 * q**2 * -torch.log(1 - q + 1e-12)
    assert focal_cost(cls_logits[0], target.thing_labels)[2, 1] == pytest.approx(expected.item(), rel=1e-5)


def test_matcher_gives_the_same_indices_alone_and_inside_a_batch() -> None:
    generator = torch.Generator().manual_seed(2)
    cases = [_random_case(generator, 6, count) for count in (3, 5, 2)]
    mask_logits = torch.cat([c[0] for c in cases])
    cls_logits = torch.cat([c[1] for c in cases])
    matcher = HungarianMatcher()
    batched = matcher(mask_logits, cls_logits, [c[2] for c in cases])
    for index, (single_masks, single_cls, target) in enumerate(cases):
        rows, cols = matcher(single_masks, single_cls, [target])[0]
        assert torch.equal(rows, batched[index][0]) and torch.equal(cols, batched[index][1])


def test_matcher_returns_empty_indices_for_an_image_without_targets() -> None:
    generator = torch.Generator().manual_seed(3)
    full = _random_case(generator, 4, 2)
    empty = _targets(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 6, 7))
    result = HungarianMatcher()(
        torch.cat([full[0], full[0]]), torch.cat([full[1], full[1]]), [empty, full[2]]
    )
    assert result[0][0].numel() == 0 and result[0][1].numel() == 0
    assert result[0][0].dtype == torch.int64
    assert result[1][0].numel() == 2
    none = HungarianMatcher()(full[0], None, [empty])
    assert none[0][0].numel() == 0


def test_matcher_raises_when_targets_outnumber_kernels() -> None:
    generator = torch.Generator().manual_seed(4)
    mask_logits, cls_logits, target = _random_case(generator, 3, 4)
    with pytest.raises(ValueError, match=r"4 thing targets but only 3 kernels.*num_proposals"):
        HungarianMatcher()(mask_logits, cls_logits, [target])


def test_non_finite_predictions_still_get_a_one_to_one_assignment() -> None:
    """A diverged model must surface as a non-finite loss (which the training loop names), not as a
    scipy error inside the matcher; finite kernels still win over the non-finite ones."""
    generator = torch.Generator().manual_seed(5)
    mask_logits, cls_logits, target = _random_case(generator, 4, 2)
    mask_logits[0, 0] = float("nan")
    cls_logits[0, 1] = float("nan")
    kernels, targets = HungarianMatcher()(mask_logits, cls_logits, [target])[0]
    assert sorted(targets.tolist()) == [0, 1]
    assert set(kernels.tolist()) == {2, 3}
