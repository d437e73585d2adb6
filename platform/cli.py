"""The ``knet`` command. Heavy libraries (torch, Ray, MLflow) are imported inside the commands so that
``knet --help`` stays fast. Secrets in what is printed are masked.

Exit codes:

- 0: done (``data check``: the dataset is OK; 1 when it found problems).
- 1: a run or search failed in a way its message explains (``RunFailedError``): one ``error: ...`` line.
- 2: the input is at fault: a bad experiment or option, a missing or malformed file, an unreachable
  tracking store, a cluster too small for the run (every ``KnetUserError``, and knet's own
  ``knet.errors.KnetInputError`` for data, config, result and bundle files): one ``error: ...`` line.
  ``--debug`` shows the traceback of 1 and 2 instead.
- 3: any other exception is a bug in knet-platform, whatever its type (a ``KeyError`` of ours is no
  message for the user): its traceback, then one line asking for a report.
- 130: interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from knet_platform.errors import KnetUserError, RunFailedError, is_knet_input_error
from knet_platform.redaction import redact, redact_text

# At exit, after every exit handler (Ray's and MLflow's shutdown, logging's flush, weakref finalizers),
# the interpreter's last garbage collection walks every object torch, Ray and MLflow made: 1.5 to 2 s at
# the end of each `knet` process on 2 cores (0.3 s frozen), to free memory the OS takes back anyway.
atexit.register(gc.freeze)

RUN_FAILED_EXIT = 1
USER_ERROR_EXIT = 2
BUG_EXIT = 3
BUG_REPORT = (
    "knet: this is a bug in knet-platform, not in your input; please report it with the traceback above"
)


class UsageError(KnetUserError, ValueError):
    """Command-line options that do not go together (or with the experiment)."""


class ModelNotFoundError(KnetUserError, LookupError):
    """``--model`` names a model, version, alias or run the tracking store does not hold."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _interrupt_on_sigterm()
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; an error becomes its exit code and one line (a bug: its traceback)."""
    try:
        return int(args.command(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_user_error(error):
            traceback_text = "".join(traceback.format_exception(error))
            print(redact_text(traceback_text), end="", file=sys.stderr)
            print(BUG_REPORT, file=sys.stderr)
            return BUG_EXIT
        if args.debug:
            raise
        print(f"error: {redact_text(one_line(error))}", file=sys.stderr)
        return RUN_FAILED_EXIT if isinstance(error, RunFailedError) else USER_ERROR_EXIT


def one_line(error: BaseException) -> str:
    """The first line of ``error``'s message, and for an ``OSError`` the path(s) it names if that line
    lacks them: ``[Errno 2] No such file or directory`` alone gives the user nothing to look at."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, OSError):
        named = [path for path in (error.filename, error.filename2) if path is not None]
        paths = [os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path) for path in named]
        missing = [path for path in paths if path not in line]
        if missing:
            line = f"{line}: {' -> '.join(missing)}"
    return line


def _interrupt_on_sigterm() -> Any:
    """Treat SIGTERM as Ctrl-C; return the handler it replaced (None: not replaced, off the main thread).

    ``ray job stop`` sends SIGTERM to a job's entrypoint, then SIGKILL 3 s later; Python's default would
    die at once, leaving the run (and a search's trial runs) RUNNING in MLflow. As ``KeyboardInterrupt``
    it ends them KILLED on its way out. Once connected, Ray's own handler replaces this one and exits
    (``SystemExit``), which the run's context managers treat the same way."""
    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is one of ours that explains itself to the user (a ``KnetUserError``, a
    ``RunFailedError``, a ``knet.errors.KnetInputError``), rather than a bug."""
    if isinstance(error, (KnetUserError, RunFailedError)):
        return True
    return is_knet_input_error(error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knet", description="K-Net training, tuning, prediction and data tools."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    _add_run_commands(commands)
    _add_model_commands(commands)
    _add_data_commands(commands)
    return parser


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    """``run`` and ``show-config``: what takes an experiment YAML."""
    run = commands.add_parser(
        "run",
        help="train an experiment on Ray Train, tracked in MLflow (a tune section: a Ray Tune search)",
    )
    _experiment_args(run, required=False)  # `knet run --resume X.yaml` puts it in --resume: _run moves it
    start = run.add_mutually_exclusive_group()  # continue a run, or start a new one from weights
    start.add_argument(
        "--resume", nargs="?", const=LATEST, metavar="RUN",
        help="continue a run (or search) of this experiment from its last checkpoint: RUN (an MLflow run "
        "id or Ray run name), else the newest one that did not finish",
    )  # fmt: skip
    start.add_argument(
        "--from-checkpoint", metavar="URI", help="fine-tune from a checkpoint folder or runs:/ URI"
    )
    run.set_defaults(command=_run)

    show = commands.add_parser("show-config", help="print the fully resolved experiment YAML")
    _experiment_args(show)
    show.set_defaults(command=_show_config)


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    """``predict``, ``eval`` and ``import-weights``: what uses or registers a model."""
    predict = commands.add_parser("predict", help="predict images with a model bundle or MLflow model URI")
    predict.add_argument("--model", required=True, metavar="URI", help=_MODEL_HELP)
    predict.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    predict.add_argument("--out", required=True, type=Path, metavar="DIR")
    predict.add_argument("--tracking-uri", help=_TRACKING_URI_HELP)
    predict.add_argument("--task-part", choices=("panoptic", "instance", "semantic"))
    predict.add_argument(
        "--score-threshold", type=float, default=0.3, metavar="S",
        help="overlays: draw instance masks scoring at least S (default 0.3; result files keep all)",
    )  # fmt: skip
    predict.set_defaults(command=_predict)

    evaluate = commands.add_parser("eval", help="evaluate a model on an experiment's val set")
    evaluate.add_argument("--model", required=True, metavar="URI", help=_MODEL_HELP)
    evaluate.add_argument("--tracking-uri", help=_TRACKING_URI_HELP)
    _experiment_args(evaluate)
    evaluate.set_defaults(command=_eval)

    imported = commands.add_parser(
        "import-weights", help="register a published K-Net checkpoint (official or mmsegmentation) as a model"
    )
    imported.add_argument("checkpoint", type=Path, metavar="CHECKPOINT.pth")
    imported.add_argument(
        "--format", required=True, choices=("official-knet", "mmseg-knet"),
        help="official-knet: ZwwWayne/K-Net panoptic/instance; mmseg-knet: mmsegmentation's semantic K-Net",
    )  # fmt: skip
    imported.add_argument("--task", required=True, choices=("panoptic", "instance", "semantic"))
    imported.add_argument("--name", required=True, help="registered model (and MLflow experiment) name")
    imported.add_argument(
        "--classes", metavar="coco|ade20k|FILE.json",
        help="the classifier's classes: coco, ade20k or a JSON COCO categories list (default: the "
        "format's dataset, coco or ade20k)",
    )  # fmt: skip
    imported.add_argument(
        "--tracking-uri", help=_TRACKING_URI_HELP.replace("holding the model", "to register in")
    )
    imported.set_defaults(command=_import_weights)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    """``data synth|check|pack`` and ``evaluate-results``: dataset and result-file tools."""
    data = commands.add_parser("data", help="dataset tools").add_subparsers(required=True, metavar="ACTION")
    synth = data.add_parser("synth", help="write the synthetic shapes dataset (all three formats)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--images", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    synth.set_defaults(command=_data_synth)
    check = data.add_parser("check", help="validate a dataset folder or file and print a summary")
    check.add_argument("source")
    check.set_defaults(command=_data_check)
    pack = data.add_parser("pack", help="pack a dataset into Parquet shards")
    pack.add_argument("source")
    pack.add_argument("out")
    pack.add_argument("--target-mb", type=float, default=128.0, help="shard size in MB (default 128)")
    pack.add_argument(
        "--row-group-mb", type=float, default=8.0,
        help="row group size in MB, the unit a reader fetches (default 8)",
    )  # fmt: skip
    pack.add_argument("--shard-size", type=int, help="also end a shard at this many rows")
    pack.set_defaults(command=_data_pack)

    results = commands.add_parser("evaluate-results", help="metrics of result files (prints JSON)")
    results.add_argument("task", choices=("panoptic", "instance", "semantic"))
    results.add_argument("--gt", required=True)
    results.add_argument("--pred", required=True)
    results.add_argument("--num-classes", type=int, help="semantic: number of contiguous class ids")
    results.add_argument("--reduce-zero-label", action="store_true", help="semantic: GT 0 is ignored")
    results.set_defaults(command=_evaluate_results)


_MODEL_HELP = (
    "bundle folder, or an MLflow model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model "
    "or mlflow-artifacts:/..."
)
_TRACKING_URI_HELP = (
    "MLflow store holding the model (default: $MLFLOW_TRACKING_URI, else $KNET_HOME/mlflow.db; "
    "KNET_HOME defaults to ./.knet)"
)


def _tracking_uri(args: argparse.Namespace) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the store ``knet run`` writes by default."""
    from knet_platform.experiment.home import default_tracking_uri

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _experiment_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("experiment", type=Path, metavar="X.yaml", nargs=None if required else "?")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, value parsed as YAML (repeatable), e.g. --set train.lr=2e-4",
    )  # fmt: skip


def _load(args: argparse.Namespace):
    from knet_platform.experiment.schema import load_experiment

    return load_experiment(args.experiment, args.overrides)


def _run(args: argparse.Namespace) -> int:
    from knet_platform.experiment.home import ray_job_home_warning

    _settle_resume(args)
    experiment = _load(args)  # validated before Ray starts
    if experiment.tune is not None:  # the same checks as knet show-config
        from knet_platform.tune.validation import validate_search

        validate_search(experiment)
    warning = ray_job_home_warning()
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    if experiment.tune is not None:
        return _search(args, experiment)
    from knet_platform.train.driver import run_experiment

    run_experiment(
        experiment,
        resume=args.resume is not None,
        resume_run=_resume_run(args),
        from_checkpoint=args.from_checkpoint,
    )  # prints its summary
    return 0


LATEST = "latest"  # --resume without a RUN


def _settle_resume(args: argparse.Namespace) -> None:
    """``knet run --resume X.yaml``: argparse gave the file to ``--resume``; it is the experiment."""
    if args.experiment is not None:
        return
    if args.resume is not None and args.resume.endswith((".yaml", ".yml")):
        args.experiment, args.resume = Path(args.resume), LATEST
        return
    raise UsageError("knet run needs an experiment file: knet run X.yaml [--resume [RUN]]")


def _resume_run(args: argparse.Namespace) -> str | None:
    return None if args.resume in (None, LATEST) else args.resume


def _search(args: argparse.Namespace, experiment) -> int:
    if args.from_checkpoint is not None:
        raise UsageError(
            "--from-checkpoint starts one training run; a search starts every trial from scratch. "
            "Drop --from-checkpoint, or remove the tune section to fine-tune."
        )
    from knet_platform.tune.search import run_search

    summary = run_search(experiment, resume=args.resume is not None, resume_run=_resume_run(args))
    print(f"model: {summary.model_uri}")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    import yaml

    experiment = _load(args)
    if experiment.tune is not None:  # the same checks as knet run, before it starts Ray
        from knet_platform.tune.validation import validate_search

        validate_search(experiment)
    resolved = experiment.to_dict()
    from knet_platform.knet_adapter import used_model_fields

    resolved["model"] = used_model_fields(experiment.model_config(None))  # the keys this task reads
    resolved["model"].pop("num_thing_classes")
    resolved["model"].pop("num_stuff_classes")  # class counts come from the dataset at run time
    if experiment.model.init_from is not None:
        resolved["model"]["init_from"] = experiment.model.init_from
    shown = redact(resolved)
    print("# resolved; model class counts are filled from the dataset's categories at run time")
    if shown != resolved:
        print("# secrets are masked (***): keep the originals in your YAML or environment")
    print(yaml.safe_dump(shown, sort_keys=False), end="")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from knet_platform.serve.predict import predict_paths

    bundle = _load_model(args)
    written = predict_paths(
        bundle, args.inputs, args.out, task_part=args.task_part, score_threshold=args.score_threshold
    )
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    experiment = _load(args)
    from knet_platform.serve.evaluate import evaluate_bundle

    metrics = evaluate_bundle(_load_model(args), experiment)
    print(json.dumps(metrics, indent=2))
    return 0


def _load_model(args: argparse.Namespace):
    """The bundle ``--model`` names; a URI the tracking store does not hold is the user's error."""
    from knet_platform.serve.predict import load_model

    try:
        return load_model(args.model, tracking_uri=_tracking_uri(args))
    except LookupError as error:  # tracking.registry.ModelNotFoundError (without importing MLflow here)
        if not isinstance(error, KnetUserError):
            raise
        raise ModelNotFoundError(f"--model {error}") from error


def _import_weights(args: argparse.Namespace) -> int:
    from knet_platform.tracking.import_weights import import_weights, summary

    imported = import_weights(
        args.checkpoint,
        format=args.format,
        task=args.task,
        name=args.name,
        classes=args.classes,
        tracking_uri=_tracking_uri(args),
    )
    print(summary(imported))
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from knet_platform.knet_adapter import synthesize

    dataset = synthesize(args.out, num_images=args.images, seed=args.seed, image_size=tuple(args.size))
    print(f"wrote {dataset.num_train} train + {dataset.num_val} val images to {args.out}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from knet_platform.knet_adapter import check_dataset

    report = check_dataset(args.source)
    print(report.summary())
    return 0 if report.ok else 1


def _data_pack(args: argparse.Namespace) -> int:
    from knet_platform.knet_adapter import detect_source, pack_dataset

    manifest = pack_dataset(
        detect_source(args.source),
        args.out,
        shard_size=args.shard_size,
        target_mb=args.target_mb,
        row_group_mb=args.row_group_mb,
    )
    groups = sum(len(shard.row_groups or ()) for shard in manifest.shards)
    print(f"wrote {len(manifest.shards)} shards ({groups} row groups) to {manifest.root}")
    return 0


def _evaluate_results(args: argparse.Namespace) -> int:
    from knet_platform.knet_adapter import evaluate_results

    metrics = evaluate_results(
        args.task, args.gt, args.pred, num_classes=args.num_classes, reduce_zero_label=args.reduce_zero_label
    )
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
