"""The evaluation loop: a model over a val loader, scored at each image's original size by the
evaluators its config asks for, with the evaluator states merged across processes.

Training's validation, ``knet eval`` on a bundle and any notebook call this one function, so the three
cannot drift apart. Distribution stays at the edge: the caller passes ``gather`` (e.g. built on
``torch.distributed.all_gather_object``); this module imports nothing distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from knet.config import KNetConfig
from knet.data.dataset import Batch
from knet.evaluation.instance import InstanceEvaluator
from knet.evaluation.original_size import original_sizes, process_at_original_size
from knet.evaluation.panoptic import PanopticEvaluator
from knet.evaluation.semantic import SemanticEvaluator
from knet.structures import Prediction, to_device

States = dict[str, Any]  # evaluator name -> that evaluator's state()
Gather = Callable[[States], list[States] | None]  # see evaluate()


class Evaluator(Protocol):
    """What the loop needs of an evaluator (PanopticEvaluator, InstanceEvaluator, SemanticEvaluator)."""

    def reset(self) -> None: ...
    def process(self, predictions: list[Prediction], targets: list[dict]) -> None: ...
    def state(self) -> Any: ...
    def merge(self, states: list[Any]) -> None: ...
    def evaluate(self) -> dict[str, Any]: ...


@dataclass
class EvaluationResult:
    """One evaluation's summary.

    metrics: the numeric summary values of every evaluator, unprefixed (``pq``, ``pq_th``, ``mask_ap``,
    ``miou``...; callers add their own prefix such as ``val/``).
    per_class: each evaluator's per-class table by evaluator name
    (``{"panoptic": {"car": {"pq": ..., "sq": ..., "rq": ...}}, "semantic": {...}}``).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def build_evaluators(config: KNetConfig, class_names: list[str] | None = None) -> dict[str, Evaluator]:
    """One evaluator per prediction part the model produces, keyed "panoptic", "instance", "semantic".

    class_names: one per contiguous class id (things first) to key the per-class tables; None gives
    ``class_<id>``. Raises ValueError when ``config.inference`` switches every output off.
    """
    things, stuff = config.num_thing_classes, config.num_stuff_classes
    inference = config.inference
    evaluators: dict[str, Evaluator] = {}
    if inference.panoptic_on:
        evaluators["panoptic"] = PanopticEvaluator(
            num_thing_classes=things, num_stuff_classes=stuff, class_names=class_names
        )
    if inference.instance_on and things > 0:
        evaluators["instance"] = InstanceEvaluator(
            num_thing_classes=things, class_names=class_names[:things] if class_names is not None else None
        )
    if inference.semantic_on:
        evaluators["semantic"] = SemanticEvaluator(num_classes=things + stuff, class_names=class_names)
    if not evaluators:
        raise ValueError("model.inference switches every output off (panoptic_on/instance_on/semantic_on)")
    return evaluators


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    evaluators: dict[str, Evaluator],
    *,
    device: torch.device | str,
    gather: Gather | None = None,
) -> EvaluationResult | None:
    """Score ``model`` on this process's share of the val set, at each image's original size.

    model: a K-Net model (``build_model``), put in eval mode here (and left there).
    loader: ``Batch``es from ``collate_batch`` over a ``KNetDataset(train=False)`` (targets at the
    original size). evaluators: e.g. ``build_evaluators(config, class_names)``; reset first.
    gather: for several processes, takes this process's evaluator states and returns every process's
    states on the process that summarises, None on the others; None = this process alone.
    Returns the merged summary, or None on a process whose ``gather`` returned None.
    """
    model.eval()
    for evaluator in evaluators.values():
        evaluator.reset()
    cpu = torch.device("cpu")
    for batch in loader:
        predictions = model(
            batch.images.to(device), image_sizes=batch.image_sizes, output_sizes=original_sizes(batch.metas)
        )
        predictions = [to_device(prediction, cpu) for prediction in predictions]
        targets = [to_device(target, cpu) for target in batch.targets]
        process_at_original_size(evaluators.values(), predictions, targets, batch.metas)
    states = {name: evaluator.state() for name, evaluator in evaluators.items()}
    gathered = gather(states) if gather is not None else [states]
    if gathered is None:
        return None
    result = EvaluationResult()
    for name, evaluator in evaluators.items():
        evaluator.reset()
        evaluator.merge([process_states[name] for process_states in gathered])
        for key, value in evaluator.evaluate().items():
            if isinstance(value, (int, float)):
                result.metrics[key] = float(value)
            elif key == "per_class":
                result.per_class[name] = value
    return result
