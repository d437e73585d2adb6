"""The MLflow pyfunc wrapper of a K-Net model bundle, logged as "model from code".

MLflow stores this file's source with the model and runs it on load: ``load_context`` rebuilds the
model from the bundle folder (``artifacts["bundle"]``, written by ``knet.bundle.save_bundle``) with
``torch.load(weights_only=True)``, so loading a registered model never unpickles arbitrary objects.
The serving environment needs the ``knet`` package installed.

``predict`` takes a list of (H, W, 3) uint8 RGB arrays and returns one dict of plain NumPy / Python
values per image (only the parts the model predicts are present):
``panoptic``: {segment_map (H, W) int64, labels [M], scores [M], is_thing [M]},
``instance``: {masks (M, H, W) bool, labels [M], scores [M]}, ``semantic``: {label_map (H, W) int64}.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class KNetPyfuncModel(mlflow.pyfunc.PythonModel):
    """pyfunc adapter: bundle in, plain NumPy predictions out."""

    # predict has no type hints on purpose (below); without this flag MLflow 3 warns about that every
    # time this file runs, under a warnings filter of its own that ours cannot override
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from knet.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    # model_input is a list of (H, W, 3) uint8 RGB arrays; it has no type hint on purpose: MLflow turns
    # predict's hints into an input schema, and a schema cannot describe a list of images.
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input, params: Any = None):  # noqa: ANN001
        images = [np.asarray(image, dtype=np.uint8) for image in model_input]
        return [_to_numpy(prediction) for prediction in self.bundle.predict(images)]


def _to_numpy(prediction: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if prediction.panoptic is not None:
        part = prediction.panoptic
        result["panoptic"] = {
            "segment_map": part.segment_map.cpu().numpy(),
            "labels": part.labels.cpu().tolist(),
            "scores": part.scores.cpu().tolist(),
            "is_thing": part.is_thing.cpu().tolist(),
        }
    if prediction.instance is not None:
        part = prediction.instance
        result["instance"] = {
            "masks": part.masks.cpu().numpy(),
            "labels": part.labels.cpu().tolist(),
            "scores": part.scores.cpu().tolist(),
        }
    if prediction.semantic is not None:
        result["semantic"] = {"label_map": prediction.semantic.label_map.cpu().numpy()}
    return result


mlflow.models.set_model(KNetPyfuncModel())
