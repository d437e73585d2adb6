"""Evaluators (PQ, mask AP, mIoU), official-format result writers and file-based evaluation."""

from __future__ import annotations

from knet.evaluation.instance import InstanceEvaluator
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
    "InstanceEvaluator",
    "PanopticEvaluator",
    "PanopticResultsWriter",
    "SemanticEvaluator",
    "coco_instance_results",
    "evaluate_results",
    "original_sizes",
    "process_at_original_size",
    "write_semantic_png",
]
