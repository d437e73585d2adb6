"""ASHA against an exhaustive grid on the same space and per-trial budget, in one process run.

    python -m benchmarks.tune_efficiency [--epochs 4] [--keys K ...] [--set key=value ...]

Both searches run ``experiments/tune_quickstart.yaml`` over the same configurations: the space entries
named by ``--keys`` (default: num_proposals, num_stages and the learning rate, 8 configurations), each
turned into a ``grid`` of its listed values (a range: its two ends); the other entries are dropped.
The grid runs every trial to ``--epochs``; ASHA (grace period 1, reduction factor 2) stops the weak
ones early. Prints the trial-epochs each used and the best metric each found. The goal: ASHA within 2%
of the grid's best with at most half the trial-epochs. Tracking and Ray results go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


DEFAULT_KEYS = ("model.num_proposals", "model.num_stages", "train.lr")


def _search(
    base_overrides: list[str], keys: list[str], scheduler: str, workdir: Path, epochs: int
) -> dict[str, float]:
    from knet_platform.experiment import load_experiment
    from knet_platform.tuning import run_search

    experiment = load_experiment(
        str(REPO / "experiments" / "tune_quickstart.yaml"),
        [
            *base_overrides,
            f"train.epochs={epochs}",
            f"tune.scheduler.type={scheduler}",
            "tune.scheduler.grace_period=1",
            "tune.scheduler.reduction_factor=2",
            "tune.num_samples=1",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"tracking.artifact_location={workdir / 'mlartifacts'}",
            f"tracking.storage_path={workdir / 'ray_results'}",
            f"tracking.registered_model=tune-efficiency-{scheduler}",
        ],
    )
    unknown = sorted(set(keys) - set(experiment.tune.space))
    if unknown:
        raise SystemExit(f"--keys {unknown} are not in tune_quickstart.yaml's tune.space")
    grid_space = {key: {"grid": list(experiment.tune.space[key].args)} for key in keys}
    experiment = experiment.with_overrides({"tune.space": grid_space})
    started = time.perf_counter()
    summary = run_search(experiment)
    return {
        "trials": len(summary.trials),
        "trial_epochs": sum(trial.epochs for trial in summary.trials),
        "best": summary.best.metric if summary.best is not None else float("nan"),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="space entries to search")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from knet_platform.ray_runtime import ray_session

    figures = {}
    with tempfile.TemporaryDirectory(prefix="knet-tune-bench-") as scratch, ray_session():
        for scheduler in ("fifo", "asha"):
            workdir = Path(scratch) / scheduler
            workdir.mkdir()
            figures["grid" if scheduler == "fifo" else "asha"] = _search(
                args.overrides, args.keys, scheduler, workdir, args.epochs
            )
    grid, asha = figures["grid"], figures["asha"]
    figures["asha_epochs_over_grid_epochs"] = asha["trial_epochs"] / grid["trial_epochs"]
    figures["asha_best_over_grid_best"] = asha["best"] / grid["best"] if grid["best"] else float("nan")
    print(f"{'search':<8}{'trials':>8}{'trial-epochs':>14}{'best':>10}{'seconds':>10}")
    for name in ("grid", "asha"):
        row = figures[name]
        print(
            f"{name:<8}{row['trials']:>8}{row['trial_epochs']:>14}{row['best']:>10.4f}{row['seconds']:>10.1f}"
        )
    print(
        f"ASHA used {figures['asha_epochs_over_grid_epochs']:.2f}x the grid's trial-epochs and found "
        f"{figures['asha_best_over_grid_best']:.3f}x its best metric (goal: <= 0.5x epochs, >= 0.98x metric)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
