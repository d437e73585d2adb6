"""The model registry: the alias moves only to a better model; a registered model downloads as a bundle
and its pyfunc predicts exactly what the bundle predicts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from knet_platform.tracking.registry import download_model, log_and_register, register_unscored
from knet_platform.tracking.runs import create_run, resolve_tracking
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import load_tiny

pytestmark = pytest.mark.mlflow


@pytest.fixture
def store(tmp_path: Path):
    """A sqlite MLflow store, a run to log into, and a stand-in bundle folder (registry logic does not
    read the bundle; loading a real one is covered by the end-to-end training test)."""
    target = resolve_tracking(load_tiny(tmp_path), cwd=tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model_config.json").write_text("{}")
    return target, bundle


def _register(target, bundle: Path, value: float, *, metric: str = "val/pq", mode: str = "max"):
    run_id = create_run(target, f"{metric}={value}")
    return log_and_register(
        bundle,
        tracking_uri=target.tracking_uri,
        run_id=run_id,
        registered_model="reg",
        alias="champion",
        metric=metric,
        metric_value=value,
        mode=mode,
    )


def _client(target) -> MlflowClient:
    return MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)


def _champion(target) -> str:
    return str(_client(target).get_model_version_by_alias("reg", "champion").version)


def test_alias_moves_only_when_the_new_version_beats_the_champion(store) -> None:
    target, bundle = store
    first = _register(target, bundle, 40.0)
    assert first.is_champion and _champion(target) == "1"
    worse = _register(target, bundle, 35.0)
    assert not worse.is_champion and worse.version == "2" and _champion(target) == "1"
    tie = _register(target, bundle, 40.0)
    assert not tie.is_champion and _champion(target) == "1"
    better = _register(target, bundle, 41.5)
    assert better.is_champion and _champion(target) == "4"
    assert "beats version 1" in better.reason
    nan = _register(target, bundle, float("nan"))
    assert not nan.is_champion and _champion(target) == "4"
    tags = _client(target).get_model_version("reg", "4").tags
    assert tags["knet.metric"] == "val/pq" and float(tags["knet.metric_value"]) == 41.5


def test_a_model_ranked_by_another_metric_never_takes_the_alias_silently(store) -> None:
    target, bundle = store
    _register(target, bundle, 40.0)
    other = _register(target, bundle, 0.01, metric="train/loss", mode="min")
    assert not other.is_champion and "not comparable" in other.reason and _champion(target) == "1"


def test_a_version_without_a_metric_takes_the_alias_only_when_free_and_keeps_it_until_moved(store) -> None:
    target, bundle = store

    def unscored():
        run_id = create_run(target, "imported")
        return register_unscored(
            bundle, tracking_uri=target.tracking_uri, run_id=run_id, registered_model="reg",
            alias="champion", tags={"knet.import_format": "official-knet"},
        )  # fmt: skip

    first = unscored()
    assert first.is_champion and _champion(target) == "1"
    assert _client(target).get_model_version("reg", "1").tags["knet.import_format"] == "official-knet"
    second = unscored()
    assert not second.is_champion and "has no metric" in second.reason and _champion(target) == "1"
    trained = _register(target, bundle, 40.0)  # nothing to compare with: the alias is moved by hand
    assert not trained.is_champion and "without a metric (imported weights)" in trained.reason
    assert _champion(target) == "1"


def test_download_model_returns_the_logged_bundle_folder(store, tmp_path: Path) -> None:
    target, bundle = store
    registered = _register(target, bundle, 40.0)
    folder = download_model(registered.alias_uri, target.tracking_uri, tmp_path / "download")
    assert (folder / "model_config.json").read_text() == "{}"
    assert folder.is_relative_to(tmp_path / "download")


def test_the_model_pins_every_package_its_serving_environment_needs() -> None:
    from knet_platform.tracking.registry import _RUNTIME_REQUIREMENTS, pinned_requirements

    pins = pinned_requirements()  # a missing one raises MissingRequirementError, never drops silently
    assert [pin.split("==")[0] for pin in pins] == list(_RUNTIME_REQUIREMENTS)
    assert all(pin.split("==")[1] for pin in pins)


@pytest.mark.parametrize("task", ["semantic", "panoptic"])
def test_the_pyfunc_returns_every_field_of_the_bundles_prediction(store, tmp_path: Path, task: str) -> None:
    import mlflow.pyfunc
    from knet_platform.serve.predict import load_model
    from knet_platform.tracking.registry import _store

    from knet.structures import Prediction
    from tests.knet_platform.serve.test_predict import tiny_bundle

    target, _ = store
    run_id = create_run(target, task)
    registered = log_and_register(
        tiny_bundle(tmp_path / f"{task}_bundle", task),
        tracking_uri=target.tracking_uri,
        run_id=run_id,
        registered_model="reg",
        alias="champion",
        metric="val/pq",
        metric_value=1.0,
        mode="max",
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 72, 3), (64, 48, 3))]
    expected = load_model(registered.model_uri, tracking_uri=target.tracking_uri).predict(images)
    with _store(target.tracking_uri):
        served = mlflow.pyfunc.load_model(registered.model_uri).predict(images)

    assert len(served) == len(expected)
    for bundle_prediction, pyfunc_prediction in zip(expected, served, strict=True):
        assert set(pyfunc_prediction) == {field.name for field in dataclasses.fields(Prediction)}
        assert pyfunc_prediction["image_size"] == bundle_prediction.image_size
        parts = ("panoptic", "instance", "semantic")
        assert getattr(bundle_prediction, task) is not None
        for part_name in parts:
            part = getattr(bundle_prediction, part_name)
            if part is None:
                assert pyfunc_prediction[part_name] is None
                continue
            served_part = pyfunc_prediction[part_name]
            assert set(served_part) == {field.name for field in dataclasses.fields(part)}
            for field in dataclasses.fields(part):
                value = getattr(part, field.name)
                if value is None:
                    assert served_part[field.name] is None, f"{part_name}.{field.name}"
                else:
                    np.testing.assert_array_equal(
                        served_part[field.name],
                        value.numpy(),
                        strict=True,
                        err_msg=f"{part_name}.{field.name}",
                    )
    if task == "semantic":  # the fields the pyfunc used to drop
        assert expected[0].semantic.class_scores is not None and expected[0].semantic.class_logits is not None


def test_predict_with_a_model_the_store_does_not_hold_is_a_user_error(store, tmp_path: Path, capsys) -> None:
    from knet_platform.cli import main

    target, bundle = store
    _register(target, bundle, 40.0)  # the store holds "reg", not "nope"
    code = main(
        ["predict", "--model", "models:/nope@champion", str(tmp_path), "--out", str(tmp_path / "out"),
         "--tracking-uri", target.tracking_uri]
    )  # fmt: skip
    err = capsys.readouterr().err  # MLflow's own log lines come first
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "error: --model models:/nope@champion: Registered Model with name=nope"
    )


def test_using_the_registry_leaves_mlflows_process_state_as_it_was(
    store, tmp_path: Path, monkeypatch
) -> None:
    """Two loads in one process, from two working directories, each find their model; MLflow's global
    URIs and their environment variables are what they were before (unset stays unset)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    target, bundle = store
    registered = _register(target, bundle, 40.0)
    for attempt in ("first", "second"):
        workdir = tmp_path / attempt
        workdir.mkdir()
        monkeypatch.chdir(workdir)
        folder = download_model(registered.alias_uri, target.tracking_uri, workdir / "download")
        assert (folder / "model_config.json").is_file()
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
        # nothing pinned: MLflow's default follows the working directory again
        assert str(workdir) in mlflow.get_tracking_uri() and str(workdir) in mlflow.get_registry_uri()
    assert not list(tmp_path.glob("*/mlflow.db")), "a stray store was created in a working directory"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")  # a user's own setting survives
    download_model(registered.alias_uri, target.tracking_uri, tmp_path / "third")
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
