"""The model registry: the alias moves only to a better model; a registered model downloads as a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from knet_platform.tracking.registry import download_model, log_and_register
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
