"""What a run can learn about its input without Ray, checked on the driver before Ray starts.

A truncated annotation file, an unknown category id or a backbone timm does not know fails the same
way on every worker and every retry: found here it is one ``error:`` line in seconds, not a traceback
after the worker group started and retried (docs/reliability.md).
"""

from __future__ import annotations

from knet_platform.experiment.schema import Experiment
from knet_platform.knet_adapter import CategoryTable, check_model_builds
from knet_platform.train.datasets import build_datasets, prepare_data


def check_before_ray(experiment: Experiment) -> CategoryTable:
    """Generate the synthetic data if asked, open every split's index (annotation files parsed and
    matched against the categories; no image is decoded) and build the model on the meta device.

    Returns the training categories. Raises the data's or the model's own error, naming the file or key.
    """
    prepare_data(experiment)
    datasets = build_datasets(experiment)
    check_model_builds(experiment.model_config(datasets.categories))
    return datasets.categories
