"""The knet command: help without heavy imports, one-line errors with exit code 2 (before Ray starts
whenever the problem is knowable then), show-config round trips.

``knet run`` cases run the real command in a fresh process whose Ray temp root (``RAY_TMPDIR``) is a
folder of the test's own: Ray creates it on start-up, so "no Ray was started" is that folder's absence.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from knet_platform.cli import main
from knet_platform.experiment.schema import load_experiment

from tests.knet_platform.tiny_run import BIN, cluster_env, free_port, tiny_overrides

REPO = Path(__file__).absolute().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


@dataclass
class KnetRun:
    code: int
    out: str
    err: str
    ray_started: bool


def knet_run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> KnetRun:
    """``knet run ARGS`` in a fresh process in ``cwd``, Ray's temp root pointed at a folder of our own
    (``env``: more variables)."""
    ray_root = Path(tempfile.mkdtemp(prefix="kcli-", dir="/tmp")) / "ray"  # short: Unix socket paths
    try:
        result = subprocess.run(
            [str(BIN / "knet"), "run", *args],
            cwd=cwd,
            env={**cluster_env(), "RAY_TMPDIR": str(ray_root), **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )
        return KnetRun(result.returncode, result.stdout, result.stderr, ray_root.exists())
    finally:
        shutil.rmtree(ray_root.parent, ignore_errors=True)


def assert_one_error_line(run: KnetRun, starts_with: str, *, alone: bool = True) -> str:
    """Exit code 2, one ``error: ...`` line ending stderr and no traceback; ``alone``: nothing else on
    stderr either (a run refused after Ray started also has Ray's and MLflow's start-up log lines)."""
    assert run.code == 2, run.err[-3000:]
    lines = run.err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in run.err, run.err[-3000:]
    assert errors[0].startswith(f"error: {starts_with}"), run.err[-3000:]
    assert not alone or len(lines) == 1, run.err[-3000:]
    return errors[0]


def test_help_lists_the_commands_and_the_cli_imports_no_heavy_library():
    # what makes `knet --help` slow is importing torch, Ray or MLflow: check that, not the wall time
    code = "import sys; from knet_platform.cli import main; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"
    help_run = subprocess.run(
        [sys.executable, "-m", "knet_platform.cli", "--help"], capture_output=True, text=True
    )
    assert (
        help_run.returncode == 0
        and "show-config" in help_run.stdout
        and "evaluate-results" in help_run.stdout
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_a_bad_experiment_is_reported_in_under_1_5_s_without_loading_torch(tmp_path):
    # a typo must not cost the ~6 s of CPU that importing torch and timm takes
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("epochs:", "epocs:"))
    started = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "knet"), "show-config", str(bad)], env=cluster_env(), capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 2 and result.stderr.startswith("error: unknown key 'train.epocs'"), (
        result.stderr
    )
    assert elapsed < 1.5, f"knet show-config took {elapsed:.2f} s"
    code = (
        "import sys; from knet_platform.cli import main; "
        f"main(['show-config', {str(QUICKSTART)!r}]); "
        "print(sorted({'torch', 'timm', 'ray', 'mlflow'} & set(sys.modules)), file=sys.stderr)"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stderr.strip() == "[]"  # even a good experiment is resolved without them


def test_bad_override_prints_one_error_line_and_exits_2(capsys):
    assert main(["show-config", str(QUICKSTART), "--set", "model.chanels=32"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown key 'model.chanels': did you mean 'model.channels'?\n"


def test_run_with_a_bad_file_fails_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("batch_size: 4", "batch_size: 0"))
    run = knet_run(tmp_path, str(bad))
    assert assert_one_error_line(run, "") == "error: train.batch_size: must be >= 1"
    assert not run.ray_started


def test_checkpoints_off_the_evaluated_epochs_are_refused_before_ray(tmp_path):
    run = knet_run(
        tmp_path, str(QUICKSTART), "--set", "train.eval_interval=2", "--set", "train.checkpoint_interval=3"
    )
    assert_one_error_line(run, "train.checkpoint_interval=3 is not a multiple of train.eval_interval=2")
    assert not run.ray_started


def test_gpus_asked_without_use_gpu_are_refused_before_ray_and_before_any_mlflow_run(tmp_path):
    run = knet_run(tmp_path, str(QUICKSTART), "--set", "scaling.resources_per_worker={CPU: 1, GPU: 1}")
    assert_one_error_line(
        run, "scaling.resources_per_worker: asks for GPU: 1.0 per worker but scaling.use_gpu is false"
    )
    assert not run.ray_started
    assert not (tmp_path / ".knet" / "mlflow.db").exists()  # no run, not even a FAILED one


def test_a_dead_tracking_server_is_one_line_naming_the_uri_and_the_fix_before_ray(tmp_path):
    port = free_port()
    run = knet_run(tmp_path, str(QUICKSTART), "--set", f"tracking.uri=http://alice:hunter2@127.0.0.1:{port}")
    line = assert_one_error_line(run, f"MLflow tracking server http://***@127.0.0.1:{port} is not reachable")
    assert "mlflow server --host 127.0.0.1" in line and "--set tracking.uri=" in line
    assert "hunter2" not in run.out + run.err
    assert not run.ray_started


def test_run_honours_mlflow_tracking_uri_as_mlflow_clients_do(tmp_path):
    # the variable MLflow's users already export; tracking.uri in the YAML would win over it
    port = free_port()
    run = knet_run(tmp_path, str(QUICKSTART), env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert_one_error_line(run, f"MLflow tracking server http://127.0.0.1:{port} is not reachable")
    assert not run.ray_started and not (tmp_path / ".knet" / "mlflow.db").exists()


@pytest.mark.parametrize("experiment, kind", [("quickstart", "run"), ("tune_quickstart", "search")])
def test_resume_with_nothing_recorded_is_one_line_before_data_or_ray(tmp_path, experiment, kind):
    run = knet_run(tmp_path, "--resume", str(REPO / "experiments" / f"{experiment}.yaml"))
    line = assert_one_error_line(run, f"nothing to resume: no {kind} of '{experiment}' was recorded under")
    assert "Start it without --resume" in line
    assert not run.ray_started
    assert not (tmp_path / ".knet" / "data").exists()  # the synthetic dataset was not generated for it


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "synth"
    assert main(["data", "synth", str(root), "--images", "8"]) == 0
    return root


def experiment_on(folder: Path, dataset: Path, annotations: Path | None = None) -> Path:
    """The quickstart on ``dataset`` (train annotations replaced by ``annotations``), written to a YAML."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["data"].pop("synthetic")
    for split in ("train", "val"):
        raw["data"][split].update(
            images=str(dataset / "images" / split),
            annotations=str(dataset / "coco_panoptic" / f"{split}.json"),
            masks=str(dataset / "coco_panoptic" / split),
        )
    if annotations is not None:
        raw["data"]["train"]["annotations"] = str(annotations)
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _truncated(dataset: Path, folder: Path) -> Path:
    path = folder / "truncated.json"
    path.write_text((dataset / "coco_panoptic" / "train.json").read_text()[:300])
    return path


def _unknown_category(dataset: Path, folder: Path) -> Path:
    annotations = json.loads((dataset / "coco_panoptic" / "train.json").read_text())
    annotations["annotations"][1]["segments_info"][0]["category_id"] = 9999
    path = folder / "unknown_category.json"
    path.write_text(json.dumps(annotations))
    return path


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_truncated, "COCO panoptic annotations file {folder}/truncated.json is not valid JSON"),
        (_unknown_category, "category id 9999 in {folder}/unknown_category.json (image "),
        (None, "backbone.name 'resnet5000' is not a timm model; close timm names: resnet50"),
    ],
    ids=["truncated annotations", "unknown category id", "unknown backbone"],
)
def test_bad_data_or_model_found_by_opening_them_is_one_line_in_seconds_before_ray(
    tmp_path, small_dataset, break_it, expected
):
    # each of these used to start Ray, be retried 3 times by the worker group and end in a traceback
    overrides = [f"--set={o}" for o in tiny_overrides(tmp_path)]
    if break_it is None:
        experiment = experiment_on(tmp_path, small_dataset)
        overrides.append("--set=model.backbone.name=resnet5000")
    else:
        experiment = experiment_on(tmp_path, small_dataset, break_it(small_dataset, tmp_path))
    started = time.perf_counter()
    run = knet_run(tmp_path, str(experiment), *overrides)
    assert time.perf_counter() - started < 60
    assert_one_error_line(run, expected.format(folder=tmp_path))
    assert not run.ray_started


@pytest.mark.slow
@pytest.mark.ray
def test_a_corrupt_image_found_in_training_ends_the_run_at_once_naming_it_without_restarts(
    tmp_path, small_dataset
):
    # a bad file fails the same way on every try: restarting the workers would only waste minutes
    dataset = tmp_path / "synth"
    shutil.copytree(small_dataset, dataset)
    (corrupt,) = sorted((dataset / "images" / "train").iterdir())[:1]
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    overrides = [f"--set={o}" for o in tiny_overrides(tmp_path, epochs=1, workers=1)]
    run = knet_run(tmp_path, str(experiment_on(tmp_path, dataset)), *overrides)
    assert run.code == 1, run.err[-3000:]
    last = run.err.splitlines()[-1]
    assert last.startswith("error: training failed: worker 0: DataError: ") and corrupt.name in last, last
    assert "restarting the workers" not in run.err and "[FailurePolicy] RETRY" not in run.err  # no retry


@pytest.mark.slow
@pytest.mark.ray
def test_a_process_killed_by_rays_memory_monitor_is_one_line_with_the_figures_and_the_way_on(tmp_path):
    # Ray's own memory monitor, made to fire at once: it kills as it would at 95% of the memory
    memory_monitor = {"RAY_memory_usage_threshold": "0.02", "RAY_memory_monitor_refresh_ms": "100"}
    overrides = [f"--set={o}" for o in tiny_overrides(tmp_path, epochs=1, workers=1)]
    run = knet_run(tmp_path, str(QUICKSTART), *overrides, env=memory_monitor)
    assert run.code == 1, run.err[-3000:]
    assert "Traceback" not in run.err and "this is a bug" not in run.err, run.err[-3000:]
    last = run.err.splitlines()[-1]
    assert re.match(
        r"error: training failed: Ray's memory monitor killed the process running \S+ \(node memory "
        r"[\d.]+GB used / [\d.]+GB limit, kill threshold 2%\): lower scaling.num_workers, train.batch_size "
        r"or data.num_workers.*`knet run --resume` continues",
        last,
    ), last


@pytest.mark.slow
@pytest.mark.ray
def test_more_workers_than_the_local_ray_can_place_is_one_line_and_no_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    overrides = [*tiny_overrides(tmp_path, epochs=1, workers=64)]
    run = knet_run(tmp_path, str(QUICKSTART), *(f"--set={override}" for override in overrides))
    line = assert_one_error_line(
        run, "scaling asks for 64 workers x {CPU: 1}, but this machine's Ray has 1 node(s)", alone=False
    )
    assert "Lower scaling.num_workers" in line
    assert run.ray_started  # the capacity is known only once Ray is up ...
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # ... but no run


def test_missing_experiment_file_is_a_clear_error(tmp_path, capsys):
    assert main(["show-config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_show_config_output_loads_back_to_the_same_experiment(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(["show-config", str(QUICKSTART), "--set", "train.lr=3e-4", "--set", "model.num_stages=3"]) == 0
    )
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["train"]["lr"] == 3e-4 and resolved["model"]["num_stages"] == 3
    assert resolved["model"]["update"]["num_heads"] == 4  # the resolved model config, not only the YAML keys
    copy = tmp_path / "resolved.yaml"
    copy.write_text(printed)
    again = load_experiment(copy)
    original = load_experiment(QUICKSTART, ["train.lr=3e-4", "model.num_stages=3"])
    assert again.model_config() == original.model_config()
    assert again.to_dict() | {"model": {}} == original.to_dict() | {"model": {}}


def test_data_synth_writes_a_dataset(tmp_path, capsys):
    assert (
        main(["data", "synth", str(tmp_path / "syn"), "--images", "4", "--seed", "1", "--size", "64", "64"])
        == 0
    )
    assert "train" in capsys.readouterr().out
    assert (tmp_path / "syn" / "coco_panoptic" / "train.json").is_file()


def test_data_check_pack_and_check_of_the_shards(tmp_path, capsys):
    synth = tmp_path / "syn"
    assert main(["data", "synth", str(synth), "--images", "4", "--size", "64", "64"]) == 0
    for source in ("coco_panoptic/train.json", "coco_instance/val.json", "semantic/train"):
        assert main(["data", "check", str(synth / source)]) == 0, source
    capsys.readouterr()
    assert main(["data", "pack", str(synth / "coco_panoptic" / "train.json"), str(tmp_path / "shards")]) == 0
    assert "shards" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "shards")]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("dataset: parquet") and "images: 3" in summary and summary.endswith("OK\n")


def test_data_check_exits_1_on_problems_and_2_on_an_unknown_path(tmp_path, capsys):
    synth = tmp_path / "syn"
    main(["data", "synth", str(synth), "--images", "4", "--size", "64", "64"])
    (synth / "images" / "train" / "000001.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["data", "check", str(synth / "coco_panoptic" / "train.json")]) == 1
    assert capsys.readouterr().out.rstrip().endswith("NOT OK")
    assert main(["data", "check", str(tmp_path / "nothing")]) == 2
    assert "dataset path not found" in capsys.readouterr().err


def test_evaluate_results_prints_the_metrics_as_json(tmp_path, capsys):
    synth = tmp_path / "syn"
    main(["data", "synth", str(synth), "--images", "4", "--size", "64", "64"])
    gt = str(synth / "coco_panoptic" / "val.json")
    capsys.readouterr()
    assert main(["evaluate-results", "panoptic", "--gt", gt, "--pred", gt]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pq"] == 100.0 and {"sq", "rq", "pq_th", "pq_st"} <= set(metrics)


def test_a_run_that_failed_is_one_error_line_and_exit_code_1_a_user_error_exit_code_2(monkeypatch, capsys):
    import knet_platform.cli as cli
    from knet_platform.errors import KnetUserError, RunFailedError

    def fails_with(error: Exception):
        def command(args) -> int:
            raise error

        return command

    monkeypatch.setattr(
        cli, "_show_config", fails_with(RunFailedError("every trial of search s failed\nmore"))
    )
    assert main(["show-config", "x.yaml"]) == 1
    assert capsys.readouterr().err == "error: every trial of search s failed\n"
    monkeypatch.setattr(cli, "_show_config", fails_with(KnetUserError("tracking.uri unreachable")))
    assert main(["show-config", "x.yaml"]) == 2
    assert capsys.readouterr().err == "error: tracking.uri unreachable\n"


def _command_raising(error: BaseException):
    def command(args) -> int:
        raise error

    return command


@pytest.mark.parametrize("bug", [KeyError("x"), ValueError("bad value"), FileNotFoundError("nope.txt")])
def test_a_bug_prints_its_traceback_and_asks_for_a_report_never_an_error_line(monkeypatch, capsys, bug):
    import knet_platform.cli as cli

    monkeypatch.setattr(cli, "_show_config", _command_raising(bug))
    assert main(["show-config", "x.yaml"]) == cli.BUG_EXIT == 3
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert f"{type(bug).__name__}: {bug}" in lines and lines[-1] == cli.BUG_REPORT
    assert lines[-1] == (
        "knet: this is a bug in knet-platform, not in your input; please report it with the traceback above"
    )
    assert not any(line.startswith("error: ") for line in lines)


def test_a_bugs_traceback_has_its_secrets_masked(monkeypatch, capsys):
    import knet_platform.cli as cli

    monkeypatch.setattr(cli, "_show_config", _command_raising(KeyError("http://alice:hunter2@host/x")))
    assert main(["show-config", "x.yaml"]) == 3
    err = capsys.readouterr().err
    assert "http://***@host/x" in err and "hunter2" not in err


def test_user_errors_of_the_platform_and_of_knet_are_one_error_line_and_exit_2(monkeypatch, capsys):
    import knet_platform.cli as cli
    from knet_platform.experiment.building import ExperimentError
    from knet_platform.tracking.resume_record import NothingToResumeError

    from knet.data.errors import DataError
    from knet.errors import KnetInputError, KnetInputNotFoundError

    for error in (
        ExperimentError("train.lr: must be > 0\nmore detail"),
        NothingToResumeError("nothing to resume"),
        KnetInputError("shard_size=0 must be >= 1"),
        KnetInputNotFoundError("bundle/ is not a model bundle: weights.pt is missing"),
        DataError("images/1.png cannot be decoded"),
    ):
        monkeypatch.setattr(cli, "_show_config", _command_raising(error))
        assert main(["show-config", "x.yaml"]) == 2, error
        assert capsys.readouterr().err == f"error: {str(error).splitlines()[0]}\n"


def test_knet_input_errors_keep_the_builtin_types_they_were():
    from knet.config import ConfigFieldError
    from knet.data.errors import DataError
    from knet.errors import KnetInputError, KnetInputNotFoundError

    assert issubclass(KnetInputError, ValueError)
    assert issubclass(KnetInputNotFoundError, FileNotFoundError) and issubclass(
        KnetInputNotFoundError, ValueError
    )
    assert issubclass(DataError, KnetInputError) and issubclass(ConfigFieldError, KnetInputError)


def test_bad_arguments_to_knet_functions_are_user_errors(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "syn"), "--images", "1"]) == 2
    assert capsys.readouterr().err == "error: num_images=1: need at least 2 (one train, one val image)\n"
    assert main(["predict", "--model", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is not a model bundle")
    assert main(["evaluate-results", "semantic", "--gt", str(tmp_path), "--pred", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: semantic evaluation needs num_classes")


def test_resume_and_from_checkpoint_are_refused_together_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(QUICKSTART), "--resume", "--from-checkpoint", "runs:/x/checkpoints/best"])
    assert exit_info.value.code == 2
    assert "not allowed with argument --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("experiment", "absent", "present"),
    [
        ("quickstart.yaml", {"decode_head", "aux_head"}, {"num_proposals", "matcher"}),
        ("coco_instance_r50.yaml", {"decode_head", "aux_head"}, {"num_proposals", "matcher"}),
        ("quickstart_semantic.yaml", {"num_proposals", "matcher"}, {"decode_head", "aux_head"}),
    ],
)
def test_show_config_prints_the_model_keys_the_task_reads(
    experiment: str, absent: set[str], present: set[str], capsys, monkeypatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)
    path = REPO / "experiments" / experiment
    overrides = []
    if experiment.startswith("coco"):  # its dataset paths are placeholders to fill in: point at any folder
        overrides = [f"--set=data.train.{key}={tmp_path}" for key in ("images", "annotations")]
        overrides += ["--set=data.val=null", "--set=train.metric=train/loss", "--set=train.mode=min"]
        overrides += ["--set=model.backbone.pretrained_path=null"]
    assert main(["show-config", str(path), *overrides]) == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert not absent & model.keys() and present <= model.keys()


def test_an_os_error_reduced_to_one_line_keeps_the_paths_it_names():
    from knet_platform.cli import one_line

    bare = FileNotFoundError(2, "No such file or directory")
    bare.filename = "/tmp/ray/session/runtime_resources/working_dir_files/_ray_pkg_1/model"
    assert one_line(bare) == f"[Errno 2] No such file or directory: '{bare.filename}'"
    # a message of our own without the path: the path is appended, both of a two-path error
    moved = OSError(18, "Invalid cross-device link", "/a/ckpt", None, "/b/ckpt")
    moved.strerror = "could not move the checkpoint\nsecond line"
    assert one_line(moved) == "[Errno 18] could not move the checkpoint: /a/ckpt -> /b/ckpt"
    assert (
        one_line(FileNotFoundError(2, "No such file or directory")) == "[Errno 2] No such file or directory"
    )


def test_a_user_error_that_is_an_os_error_prints_one_line_with_its_path(monkeypatch, capsys):
    import knet_platform.cli as cli
    from knet_platform.serve.predict import InputNotFoundError

    error = InputNotFoundError(2, "No such file or directory", "/data/images")
    monkeypatch.setattr(cli, "_show_config", _command_raising(error))
    assert main(["show-config", "x.yaml"]) == 2
    assert capsys.readouterr().err == "error: [Errno 2] No such file or directory: '/data/images'\n"


def test_a_working_dir_deleted_under_a_run_stops_registration_naming_the_path_and_resume(
    tmp_path, monkeypatch
):
    from knet_platform.errors import RunFailedError
    from knet_platform.tracking.lifecycle import require_working_dir

    gone = tmp_path / "_ray_pkg_1234"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # what another Ray node's runtime-env agent did to a job's unpacked folder
    with pytest.raises(RunFailedError) as raised:
        require_working_dir()
    message = str(raised.value)
    assert str(gone) in message and "`knet run --resume`" in message
    assert "\n" not in message  # the CLI prints it whole as one error line


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SystemExit(15)], ids=["ctrl-c", "ray-job-stop"])
def test_a_run_interrupted_or_stopped_ends_killed_in_mlflow_not_running(tmp_path, stop):
    # `ray job stop` sends SIGTERM; inside a connected driver Ray's handler turns it into SystemExit
    from knet_platform.tracking.lifecycle import tracked_run
    from knet_platform.tracking.runs import resolve_tracking
    from mlflow.tracking import MlflowClient

    experiment = load_experiment(str(QUICKSTART), tiny_overrides(tmp_path))
    target = resolve_tracking(experiment)
    with pytest.raises(type(stop)), tracked_run(experiment, target, "run") as run:
        raise stop
    assert MlflowClient(tracking_uri=target.tracking_uri).get_run(run.run_id).info.status == "KILLED"
