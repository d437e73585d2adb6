"""``knet eval``: a model's metrics on an experiment's val set, with the same loop validation uses."""

from __future__ import annotations

import torch
from knet_platform.experiment.building import ExperimentError
from knet_platform.experiment.schema import Experiment
from knet_platform.knet_adapter import ModelBundle, build_dataset, build_evaluators, collate_batch, evaluate


def evaluate_bundle(bundle: ModelBundle, experiment: Experiment) -> dict[str, float]:
    """The bundle's metrics on the experiment's val set (keys ``val/pq``, ``val/mask_ap``, ``val/miou``...),
    scored at each image's original size like ``knet evaluate-results`` on written files."""
    if experiment.data.val is None:
        raise ExperimentError("data.val: the experiment has none; add a val DataSource to evaluate on")
    # The bundle's category table: class ids mean what they meant in training (a DataError names the
    # val file when it lists other categories).
    dataset = build_dataset(experiment.data.val, bundle.transforms, train=False, categories=bundle.categories)
    loader = torch.utils.data.DataLoader(dataset, batch_size=bundle.batch_size, collate_fn=collate_batch)
    evaluators = build_evaluators(bundle.config, bundle.categories.names)  # as validation in training
    device = next(bundle.model.parameters()).device
    result = evaluate(bundle.model, loader, evaluators, device=device)
    return {f"val/{key}": value for key, value in result.metrics.items()}
