"""Scoring at each image's original size, as the official tools (and mmdet's ``rescale=True``) do."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from knet.structures import Prediction


class Evaluator(Protocol):
    def process(self, predictions: list[Prediction], targets: list[dict]) -> None: ...


def original_sizes(metas: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Each image's size before the test-time resize: the model's ``output_sizes`` for evaluation."""
    return [(int(meta["orig_size"][0]), int(meta["orig_size"][1])) for meta in metas]


def process_at_original_size(
    evaluators: Iterable[Evaluator],
    predictions: list[Prediction],
    targets: list[dict[str, Any]],
    metas: list[dict[str, Any]],
) -> None:
    """Add a batch the model saw at the test-time size to every evaluator, scored at the original size.

    predictions: one per image, best at the original size already (the model called with
    ``output_sizes=original_sizes(metas)``: probabilities resized bilinearly before the merge, as the
    reference does); one at the unpadded test-time size is mapped back with ``Prediction.resized``
    (nearest neighbour on the final maps). targets, metas: the ``Batch``'s, from
    ``KNetDataset(train=False)``, whose targets keep the original size ``meta["orig_size"]``.
    """
    evaluators = list(evaluators)
    if not len(predictions) == len(targets) == len(metas):
        raise ValueError(f"{len(predictions)} predictions, {len(targets)} targets and {len(metas)} metas")
    for prediction, target, meta in zip(predictions, targets, metas):
        orig_size = (int(meta["orig_size"][0]), int(meta["orig_size"][1]))
        target_size = tuple(target["masks"].shape[-2:])
        if target_size != orig_size:
            raise ValueError(
                f"target masks are {target_size} but the image's orig_size is {orig_size}: evaluation "
                "needs targets at the original size (KNetDataset(train=False) keeps them there)"
            )
        original = prediction.resized(orig_size)
        for evaluator in evaluators:
            evaluator.process([original], [target])
