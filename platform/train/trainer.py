"""One Ray Train ``TorchTrainer`` for one experiment: the run ``knet run`` fits and every Tune trial fits.

The trainer's run is named ``run_name`` under ``storage_path``; a new trainer with the same pair
resumes from that run's latest checkpoint (Ray Train's auto-resume), which is how ``--resume`` and
Tune trial restarts continue in place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from knet_platform.experiment.building import ExperimentError
from knet_platform.train.failures import describe_failure, worth_a_restart
from knet_platform.train.worker import LoopConfig, train_fn_per_worker
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

if TYPE_CHECKING:
    from knet_platform.experiment.schema import Experiment
    from ray.train import Result, UserCallback

# Worker failures (a lost node, an OOM-killed process) a run recovers from, from its latest checkpoint.
DEFAULT_MAX_FAILURES = 2


def fit_with_restarts(
    make_trainer: Callable[[], TorchTrainer], *, max_failures: int = DEFAULT_MAX_FAILURES
) -> Result:
    """``make_trainer().fit()``, restarted from the run's latest checkpoint after a failure that may not
    happen again (a lost node, a killed process), at most ``max_failures`` times.

    Ray Train's own ``FailureConfig`` retries every worker error alike; a bad data file, a bad config
    or a non-finite loss fails identically on every retry, minutes later, and a worker the memory
    monitor killed is killed again. Those end the run at once.
    A new trainer of the same name and storage resumes from the run's checkpoint record.
    """
    for restart in range(max_failures + 1):
        try:
            return make_trainer().fit()
        except TrainingFailedError as error:
            if restart == max_failures or not worth_a_restart(error):
                raise
            print(
                f"knet: training failed ({describe_failure(error)}); restarting the workers from the "
                f"latest checkpoint (restart {restart + 1} of {max_failures})",
                file=sys.stderr,
                flush=True,
            )
    raise AssertionError("unreachable: the last attempt returns or raises")


def build_trainer(
    experiment: Experiment,
    *,
    run_name: str,
    storage_path: str,
    mlflow_run_id: str | None,
    tracking_uri: str | None = None,
    callbacks: Sequence[UserCallback] = (),
    resume_from: str | None = None,
    init_weights_from: str | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` that runs :func:`train_fn_per_worker` on ``scaling.num_workers`` workers.

    mlflow_run_id: the run rank 0 logs into (created by the caller); None turns tracking off.
    tracking_uri: that run's store; defaults to the experiment's resolved ``tracking.uri``.
    resume_from: a checkpoint folder to continue from (model, optimizer, epoch...) when Ray has none.
    init_weights_from: a checkpoint folder whose model weights start this run (fine-tuning; epoch 0).
    Checkpoints are kept by ``train.metric`` / ``train.mode`` (the best ``train.keep_checkpoints``).
    Ray does not retry: :func:`fit_with_restarts` decides which failures are worth a restart.
    """
    from knet_platform.tracking.runs import resolve_tracking

    validate_for_training(experiment)
    train = experiment.train
    mlflow = None
    if mlflow_run_id is not None:
        uri = tracking_uri or resolve_tracking(experiment).tracking_uri
        mlflow = {"tracking_uri": uri, "run_id": mlflow_run_id}
    loop = LoopConfig(
        experiment=experiment.without_tune(),  # a trial's values are applied; workers need no search
        mlflow=mlflow,
        resume_from=resume_from,
        init_weights_from=init_weights_from,
        checkpoint_root=f"{storage_path.rstrip('/')}/{run_name}",
    )
    scaling = experiment.scaling
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop.to_dict(),
        **_ray_data_ingest(experiment, storage_path, run_name, resume_from),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=dict(scaling.resources_per_worker),
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute=train.metric,
                checkpoint_score_order=train.mode,
            ),
            # knet restarts (fit_with_restarts); a worker group Ray cannot place ends the run after
            # the start-up timeout unless the experiment says to wait for nodes
            failure_config=FailureConfig(
                max_failures=0, controller_failure_limit=-1 if scaling.wait_for_resources else 0
            ),
            callbacks=list(callbacks),
        ),
    )


def _ray_data_ingest(
    experiment: Experiment, storage_path: str, run_name: str, resume_from: str | None
) -> dict[str, Any]:
    """``datasets`` and ``dataset_config`` for a train split Ray Data streams (else nothing): its order
    starts at the epoch the run resumes at, so a resumed run reads what an unbroken one would."""
    if not experiment.data.streams_train:
        return {}
    from knet_platform.train.checkpoints import load_checkpoint
    from knet_platform.train.ingest import TRAIN, data_config, resume_epoch, train_dataset

    first_epoch = resume_epoch(storage_path, run_name)
    if first_epoch == 0 and resume_from is not None:
        first_epoch = load_checkpoint(resume_from).epoch
    return {"datasets": {TRAIN: train_dataset(experiment, first_epoch)}, "dataset_config": data_config()}


def validate_for_training(experiment: Experiment) -> None:
    """Combinations the schema allows but a training run cannot honour; checked before Ray starts."""
    train = experiment.train
    if train.metric.startswith("val/") and experiment.data.val is None:
        raise ExperimentError(
            f"train.metric={train.metric!r} needs a validation set, but data.val is not set. "
            "Add data.val or choose a train/ metric (e.g. --set train.metric=train/loss train.mode=min)."
        )
    if train.checkpoint_interval % train.eval_interval != 0:
        raise ExperimentError(
            f"train.checkpoint_interval={train.checkpoint_interval} is not a multiple of "
            f"train.eval_interval={train.eval_interval}: every checkpoint is ranked by {train.metric!r}, "
            "so checkpoints must fall on evaluated epochs. Make checkpoint_interval a multiple of eval_interval."
        )
    if experiment.scaling.use_gpu:
        import torch

        if not torch.cuda.is_available() and _is_local_ray():
            raise ExperimentError(
                "scaling.use_gpu is true but this machine has no CUDA device and no Ray cluster is "
                "configured (RAY_ADDRESS). Use --set scaling.use_gpu=false, or run on a GPU cluster."
            )


def _is_local_ray() -> bool:
    import os

    return not os.environ.get("RAY_ADDRESS")
