"""``--model`` URIs: ``runs:/``, ``models:/`` and ``mlflow-artifacts:/`` go to MLflow; a model, version,
alias or store that is not there is one ``error:`` line (exit 2), found fast, and reading a model never
creates a store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from knet_platform.cli import main
from knet_platform.tracking.registry import RegisteredModel, log_and_register
from knet_platform.tracking.runs import create_run, resolve_tracking

from tests.knet_platform.serve.test_predict import tiny_bundle, write_images
from tests.knet_platform.tiny_run import load_tiny

pytestmark = pytest.mark.mlflow


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[str, str, RegisteredModel]:
    """A sqlite store holding one knet model ``tiny`` (version 1, alias ``champion``): its tracking URI,
    the run id it was logged in, and the registered version."""
    tmp_path = tmp_path_factory.mktemp("store")
    target = resolve_tracking(load_tiny(tmp_path), cwd=tmp_path)
    run_id = create_run(target, "tiny")
    model = log_and_register(
        tiny_bundle(tmp_path / "bundle"),
        tracking_uri=target.tracking_uri,
        run_id=run_id,
        registered_model="tiny",
        alias="champion",
        metric="val/pq",
        metric_value=1.0,
        mode="max",
    )
    return target.tracking_uri, run_id, model


def _predict(tmp_path: Path, model: str, tracking_uri: str) -> int:
    images = tmp_path / "images"
    if not images.exists():
        write_images(images)
    return main(["predict", "--model", model, "--tracking-uri", tracking_uri, str(images), "--out",
                 str(tmp_path / "out")])  # fmt: skip


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_predict_loads_a_runs_uri_as_the_help_offers(registered, tmp_path: Path, capsys) -> None:
    tracking_uri, run_id, _ = registered
    assert _predict(tmp_path, f"runs:/{run_id}/model", tracking_uri) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "panoptic.json").is_file()


@pytest.mark.parametrize("suffix", ["@champion", "/1"])
def test_predict_loads_a_registered_model_by_alias_and_version(registered, tmp_path, capsys, suffix) -> None:
    tracking_uri, _, _ = registered
    assert _predict(tmp_path, f"models:/tiny{suffix}", tracking_uri) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "panoptic.json").is_file()


@pytest.mark.parametrize(
    ("model", "cause"),
    [
        ("models:/tiny@nope", "models:/tiny@nope: Registered model alias nope not found"),
        ("models:/tiny/999", "models:/tiny/999: Model Version (name=tiny, version=999) not found"),
        (
            "models:/nothere@champion",
            "models:/nothere@champion: Registered Model with name=nothere not found",
        ),
        ("models:/", "models:/ is not a model URI: write models:/<name>@<alias>"),
        ("runs:/", "runs:/ is not a run URI: write runs:/<run_id>/model"),
        (
            "runs:/0123456789abcdef/model",
            "runs:/0123456789abcdef/model: Run with id=0123456789abcdef not found",
        ),
        ("mlflow-artifacts:/0/abc/artifacts/model", "is served by an MLflow tracking server"),
    ],
)
def test_a_model_the_store_does_not_hold_is_one_error_line(
    registered, tmp_path, capsys, model, cause
) -> None:
    tracking_uri, _, _ = registered
    assert _predict(tmp_path, model, tracking_uri) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: ") and cause in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_a_run_uri_without_the_model_path_says_how_to_write_it(registered, tmp_path, capsys) -> None:
    tracking_uri, run_id, _ = registered
    assert _predict(tmp_path, f"runs:/{run_id}/model/artifacts", tracking_uri) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "is not an MLflow model" in errors[0] and "runs:/<run_id>/model" in errors[0]


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_reading_a_model_from_a_missing_sqlite_store_creates_nothing(tmp_path, capsys, command) -> None:
    database = tmp_path / "nonexistent" / "dir" / "mlflow.db"
    uri = f"sqlite:///{database}"
    if command == "predict":
        code = _predict(tmp_path, "models:/tiny@champion", uri)
    else:
        experiment = str(Path(__file__).absolute().parents[3] / "experiments" / "quickstart.yaml")
        code = main(["eval", "--model", "models:/tiny@champion", "--tracking-uri", uri, experiment])
    errors = _error_lines(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: MLflow store {uri} does not exist ({database} is missing)")
    assert not database.parent.parent.exists()


def test_an_unreachable_tracking_server_fails_fast(tmp_path, capsys) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    code = _predict(tmp_path, "models:/tiny@champion", f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 15
    errors = _error_lines(capsys)
    assert code == 2 and len(errors) == 1 and "is not reachable" in errors[0], errors
