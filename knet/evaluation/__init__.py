"""Evaluators (PQ, mask AP, mIoU), the evaluation loop, official-format result writers and file-based
evaluation."""

from __future__ import annotations

from knet.evaluation.instance import InstanceEvaluator
from knet.evaluation.loop import EvaluationResult, Evaluator, build_evaluators, evaluate
from knet.evaluation.offline import evaluate_results
from knet.evaluation.original_size import original_sizes, process_at_original_size
from knet.evaluation.panoptic import PanopticEvaluator
from knet.evaluation.semantic import SemanticEvaluator
from knet.evaluation.writers import (
    CocoInstanceResultsWriter,
    PanopticResultsWriter,
    coco_instance_results,
    write_semantic_png,
)

__all__ = [
    "CocoInstanceResultsWriter",
    "EvaluationResult",
    "Evaluator",
    "InstanceEvaluator",
    "PanopticEvaluator",
    "PanopticResultsWriter",
    "SemanticEvaluator",
    "build_evaluators",
    "coco_instance_results",
    "evaluate",
    "evaluate_results",
    "original_sizes",
    "process_at_original_size",
    "write_semantic_png",
]
