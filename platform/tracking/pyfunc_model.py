"""The MLflow pyfunc wrapper of a K-Net model bundle, logged as "model from code".

MLflow stores this file's source with the model and runs it on load: ``load_context`` rebuilds the
model from the bundle folder (``artifacts["bundle"]``, written by ``knet.bundle.save_bundle``) with
``torch.load(weights_only=True)``, so loading a registered model never unpickles arbitrary objects.
The serving environment needs knet-platform installed (``knet`` and its adapter).

``predict`` takes a list of (H, W, 3) uint8 RGB arrays and returns, per image, the bundle's
``knet.structures.Prediction`` as plain values, made by one function, ``to_plain``: every dataclass
becomes a dict keyed by all of its fields, every tensor a NumPy array of the same dtype and shape, and
everything else (``None`` for a part the model does not predict, the ``image_size`` tuple) stays as it
is. So ``mlflow.pyfunc.load_model(uri).predict(images)`` and
``knet_platform.serve.predict.load_model(uri).predict(images)`` hold the same values::

    {"image_size": (H, W),
     "panoptic": {"segment_map": (H, W) int64, "labels": (M,), "scores": (M,), "is_thing": (M,)} | None,
     "instance": {"masks": (M, H, W) bool, "labels": (M,), "scores": (M,)} | None,
     "semantic": {"label_map": (H, W) int64, "class_scores": (K, h, w) | None,
                  "class_logits": (K, h, w) | None} | None}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlflow
import numpy as np
import torch


class KNetPyfuncModel(mlflow.pyfunc.PythonModel):
    """pyfunc adapter: bundle in, plain NumPy predictions out."""

    # predict has no type hints on purpose (below); without this flag MLflow 3 warns about that every
    # time this file runs, under a warnings filter of its own that ours cannot override
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from knet_platform.knet_adapter import load_bundle  # the platform reaches knet through it

        self.bundle = load_bundle(context.artifacts["bundle"])

    # model_input is a list of (H, W, 3) uint8 RGB arrays; it has no type hint on purpose: MLflow turns
    # predict's hints into an input schema, and a schema cannot describe a list of images.
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input, params: Any = None):  # noqa: ANN001
        images = [np.asarray(image, dtype=np.uint8) for image in model_input]
        return [to_plain(prediction) for prediction in self.bundle.predict(images)]


def to_plain(value: Any) -> Any:
    """A prediction (or any part of one) as plain values: dataclass -> dict of all its fields, tensor ->
    NumPy array (on the CPU), dict / list / tuple -> the same container of converted values."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(item) for item in value)
    return value


mlflow.models.set_model(KNetPyfuncModel())
