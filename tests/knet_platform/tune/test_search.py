"""A Tune search: trials are Ray Train runs, ASHA stops the bad ones, a failing trial fails alone,
MLflow holds one parent run with a child per trial, and the winner is registered."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.knet_platform.test_cli import assert_one_error_line, knet_run
from tests.knet_platform.tiny_run import REPO, load_tiny, start_local_ray, tiny_overrides, tune_overrides

SECRETS = ("hunter2", "abc123", "k-42", "s1gn")
SECRET_URI = "https://alice:hunter2@mlflow.example.com/?token=abc123"
SECRET_LOCATIONS = ("s3://bucket/a?X-Amz-Signature=s1gn", "https://bob:k-42@store/b")


@pytest.fixture(scope="module")
def local_ray():
    from knet_platform.ray_runtime import stop_ray

    runtime = start_local_ray()
    yield runtime
    stop_ray(runtime)


def test_a_search_whose_trial_cannot_fit_is_refused_before_any_trial_or_run_starts(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knet_platform.tune.search import run_search
    from knet_platform.tune.space import SearchSpaceError

    monkeypatch.chdir(tmp_path)
    experiment = load_tiny(
        tmp_path, *tune_overrides(lrs=[1e-3, 1e-9]), "scaling.resources_per_worker={CPU: 1}", workers=2
    )
    with pytest.raises(SearchSpaceError, match="no trial could ever start"):
        run_search(experiment)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    existing = client.get_experiment_by_name(experiment.name)
    assert existing is None or not client.search_runs([existing.experiment_id])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["tune.search_alg=optuna", "tune.space={train.lr: {choice: [1.0e-3, 5.0e-4]}}"],
            r"needs the optuna package",
        ),
        (["tune.search_alg=optuna", "optuna_installed"], r"train\.lr\.grid: .*optuna .*cannot enumerate"),
    ],
    ids=["optuna-missing", "optuna-with-grid"],
)
def test_optuna_searches_that_cannot_run_are_refused_before_ray_or_mlflow_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], message: str
) -> None:
    import sys
    import types

    from knet_platform.tune import search as tuning
    from knet_platform.tune.space import SearchSpaceError

    monkeypatch.chdir(tmp_path)
    if "optuna_installed" in extra:  # a stand-in, so the grid refusal is tested with or without optuna
        extra = [e for e in extra if e != "optuna_installed"]
        fake = types.ModuleType("optuna")
        monkeypatch.setitem(sys.modules, "optuna", fake)
        monkeypatch.setitem(sys.modules, "ray.tune.search.optuna", types.SimpleNamespace(OptunaSearch=object))
    else:
        monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    monkeypatch.setattr(tuning, "start_ray", lambda **_: pytest.fail("Ray was started"))
    experiment = load_tiny(tmp_path, *tune_overrides(lrs=[1e-3, 5e-4]), *extra, epochs=2, workers=1)
    with pytest.raises(SearchSpaceError, match=message):
        tuning.run_search(experiment)
    assert not (tmp_path / "mlflow.db").exists()  # no parent run was created (and none left FAILED)


def test_a_search_waiting_for_an_autoscaler_without_max_concurrent_trials_is_one_error_line_before_ray(
    tmp_path: Path,
) -> None:
    overrides = [
        *tiny_overrides(tmp_path, workers=1),
        *tune_overrides(lrs=[1e-3, 5e-4]),
        "scaling.wait_for_resources=true",
        "tune.max_concurrent_trials=null",
    ]
    run = knet_run(
        tmp_path, str(REPO / "experiments" / "quickstart.yaml"), *(f"--set={o}" for o in overrides)
    )
    line = assert_one_error_line(
        run, "tune.max_concurrent_trials is null, but scaling.wait_for_resources=true"
    )
    assert "--set tune.max_concurrent_trials=2" in line
    assert not run.ray_started and not (tmp_path / "mlflow.db").exists()


@pytest.mark.mlflow
def test_no_secret_of_tracking_uri_or_a_trial_value_reaches_the_searchs_mlflow_record_or_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a search writes, through the functions run_search and its trials call (no Ray): the parent
    run, the --resume record, a trial's child run and tags, a trial's error, the results, the table."""
    import json
    from dataclasses import replace
    from types import SimpleNamespace

    from knet_platform.errors import KnetUserError
    from knet_platform.tracking.lifecycle import tracked_run
    from knet_platform.tracking.resume_record import (
        NothingToResumeError,
        ResumeMismatchError,
        latest_record,
        write_record,
    )
    from knet_platform.tracking.runs import create_run, resolve_tracking
    from knet_platform.tune.search import (
        SEARCH_TAG,
        TRIAL_TAG,
        SearchSummary,
        TrialRecord,
        TrialRunCloser,
        _log_results,
        _log_trial,
    )
    from knet_platform.tune.space import mask_space
    from knet_platform.tune.validation import space_of

    space = (
        f"{{train.lr: {{grid: [1.0e-3]}}, tracking.artifact_location: {{choice: {list(SECRET_LOCATIONS)}}}}}"
    )
    experiment = load_tiny(tmp_path, *tune_overrides(lrs=[1e-3]), f"tune.space={space}", workers=1)
    target = resolve_tracking(experiment)  # a local store; the experiment's own tracking.uri is only logged
    experiment = experiment.with_overrides({"tracking.uri": SECRET_URI})
    masked = mask_space(space_of(experiment))

    with tracked_run(experiment, target, "search", record_extras={"max_concurrent_trials": 1}) as parent:
        search_name, parent_run_id = parent.name, parent.run_id  # the run ends FINISHED here
    config = {
        "train.lr": 1e-3,
        "tracking.artifact_location": masked.space["tracking.artifact_location"][1][1],
    }
    trial_experiment = experiment.with_overrides(masked.reveal(config))
    assert trial_experiment.tracking.artifact_location == SECRET_LOCATIONS[1]  # the trial gets the real value
    run_id = create_run(
        target, "trial", parent_run_id=parent_run_id, tags={TRIAL_TAG: "t1", SEARCH_TAG: search_name}
    )
    remote = replace(target, storage_path=f"{SECRET_LOCATIONS[0]}&x=1")  # a signed storage URL
    _log_trial(remote, run_id, trial_experiment, config, f"{search_name}-t1")
    error_file = tmp_path / "outside" / "error.txt"
    error_file.parent.mkdir()
    error_file.write_text(f"ConnectionError: {SECRET_URI} refused")
    failed = SimpleNamespace(trial_id="t1", pickled_error_file=None, error_file=str(error_file))
    TrialRunCloser(target, parent_run_id, experiment).on_trial_error(0, [], failed)
    trial = TrialRecord("t1", config, "ERROR", 0.5, 1, run_id, f"{SECRET_LOCATIONS[1]}/ckpt", SECRET_URI)
    _log_results(target, parent_run_id, [trial], trial, "train/loss")
    summary = SearchSummary(
        "train/loss", "min", [trial], trial, parent_run_id, remote.storage_path, "ui", None
    )
    print(summary.render())
    record = {"search_name": search_name, "mlflow_run_id": parent_run_id, "max_concurrent_trials": 1}
    write_record(remote, experiment.name, "search", record)  # prints a note, writes nothing

    # the --resume record: the masked URI, compared in masked form (a rotated password still resumes)
    write_record(replace(target, tracking_uri=SECRET_URI), "secret", "search", record)
    rotated = replace(target, tracking_uri=SECRET_URI.replace("hunter2", "hunter3"))
    assert (
        latest_record(rotated, "secret", "search")["tracking_uri"]
        == "https://***@mlflow.example.com/?token=***"
    )
    with pytest.raises(ResumeMismatchError, match=r"logged to https://\*\*\*@mlflow.example.com/") as moved:
        latest_record(replace(target, tracking_uri="https://alice:hunter2@elsewhere"), "secret", "search")
    with pytest.raises(NothingToResumeError) as missing:
        latest_record(target, "never-started", "search")
    assert isinstance(moved.value, KnetUserError) and isinstance(missing.value, KnetUserError)

    client = MlflowClient(tracking_uri=target.tracking_uri)
    for logged in (parent_run_id, run_id):
        data = client.get_run(logged).data
        texts = [json.dumps(data.params), json.dumps(data.tags)]
        for artifact in client.list_artifacts(logged):
            texts.append(
                Path(client.download_artifacts(logged, artifact.path, str(tmp_path / "down"))).read_text()
            )
        for text in texts:
            assert not [secret for secret in SECRETS if secret in text], text
    child = client.get_run(run_id).data
    assert (
        json.loads(child.tags["knet.trial_overrides"])["tracking.artifact_location"]
        == "https://***@store/b #2"
    )
    assert child.tags["knet.checkpoints"].startswith("s3://bucket/a?X-Amz-Signature=***&x=1/")
    assert child.params["tracking.artifact_location"] == "https://***@store/b"
    assert "refused" in child.tags["knet.error"]
    stored = [
        tmp_path / "mlflow.db",
        *(tmp_path / "mlartifacts").rglob("*"),
        *(tmp_path / "ray_results").rglob("*"),
    ]
    leaked = [
        path for path in stored if path.is_file() and any(s.encode() in path.read_bytes() for s in SECRETS)
    ]
    assert not leaked
    printed = capsys.readouterr().out
    assert "https://***@store/b #2" in printed and not [s for s in SECRETS if s in printed], printed


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_asha_stops_bad_trials_a_diverging_trial_fails_alone_and_the_best_is_registered(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knet_platform.tune.search import run_search

    monkeypatch.chdir(tmp_path)
    # trial order follows the grid: the learning trial sets the bar, the lr=1e-9 trial (practically frozen) falls below
    # it after epoch 1, and lr=1e30 overflows on its second step (NaN loss -> that trial fails).
    experiment = load_tiny(tmp_path, *tune_overrides(lrs=[1e-3, 1e-9, 1e30]), epochs=2, workers=1)
    summary = run_search(experiment)

    by_lr = {trial.overrides["train.lr"]: [] for trial in summary.trials}
    for trial in summary.trials:
        by_lr[trial.overrides["train.lr"]].append(trial)
    assert len(summary.trials) == 3
    assert [t.status for t in by_lr[1e-3]] == ["COMPLETED"] and by_lr[1e-3][0].epochs == 2
    assert [t.status for t in by_lr[1e-9]] == ["STOPPED_EARLY"]
    assert all(t.epochs == 1 for t in by_lr[1e-9])
    assert [t.status for t in by_lr[1e30]] == ["ERROR"] and "non-finite loss" in by_lr[1e30][0].error
    assert summary.best is not None and summary.best.overrides["train.lr"] == 1e-3

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["knet.best_trial"] == summary.best.trial_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'"
    )
    assert len(children) == 3
    statuses = {run.info.run_id: run.info.status for run in children}
    for trial in summary.trials:
        child = client.get_run(trial.mlflow_run_id)
        assert child.data.params["train.lr"] == str(trial.overrides["train.lr"])
        if trial.status == "ERROR":
            assert statuses[trial.mlflow_run_id] == "FAILED"
            assert "non-finite loss" in child.data.tags["knet.error"]
        else:
            assert statuses[trial.mlflow_run_id] == "FINISHED"
            assert child.data.tags["knet.stopped_early"] == str(trial.status == "STOPPED_EARLY").lower()
            assert "knet.error" not in child.data.tags  # an interrupted stopped trial records no error
            # the exact checkpoint holding the trial's best metric, beside its run folder
            assert child.data.tags["knet.best_checkpoint"] == trial.checkpoint
            assert trial.checkpoint.startswith(child.data.tags["knet.checkpoints"])
            # Train V2 reports without waiting for Tune's decision, so a stopped trial may finish the
            # epoch it was in before it is killed: MLflow holds its epochs 1..k, k at most one more.
            epochs = sorted(m.step for m in client.get_metric_history(trial.mlflow_run_id, "train/loss"))
            assert epochs == list(range(1, len(epochs) + 1))
            assert trial.epochs <= len(epochs) <= trial.epochs + 1

    champion = client.get_model_version_by_alias(experiment.name, "champion")
    assert champion.run_id == summary.best.mlflow_run_id
    assert float(champion.tags["knet.metric_value"]) == pytest.approx(summary.best.metric)
    table = summary.render()
    assert all(trial.trial_id in table for trial in summary.trials)
    # Tune's own results folder holds TensorBoard event files for the trials
    assert list(Path(summary.results_path).rglob("events.out.tfevents*"))
