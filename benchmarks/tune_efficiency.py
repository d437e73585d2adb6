"""ASHA against an exhaustive grid on the same finite space and the same per-trial epoch budget.

    python -m benchmarks.tune_efficiency [--epochs 8] [--steps-per-epoch 6] [--space KEY=[v, ...] ...]
        [--metric val/miou] [--asha-order shuffled-grid|random] [--seed 0] [--replays 2000]
        [--grid-from figures.json] [--set key=value ...] [--json figures.json]

Both searches run ``experiments/tune_quickstart.yaml`` (its data, model and scaling) over the
configurations of ``--space`` (default: 16), each trial ``--epochs`` epochs of ``--steps-per-epoch``
steps; ``tune.scheduler.max_epochs`` follows ``train.epochs``. Tracking and Ray results go to a
temporary folder.

1. grid: ``search_alg: grid`` with the FIFO scheduler trains every configuration for every epoch, in
   Tune's grid order (nested: the first key varies fastest).
2. ASHA (grace period 1, reduction factor 2) over the same configurations. ``--asha-order
   shuffled-grid`` (default): every configuration exactly once (``search_alg: grid``), each key's values
   shuffled with ``--seed`` so that the order is not the grid's (where the strong learning rate comes
   last). ``--asha-order random``: a random search, ``choice`` entries and ``num_samples`` = the number
   of configurations, sampled by Tune after ``numpy.random.seed(--seed)``, with replacement (some run
   twice, some never; the table says how many distinct ones ran).
3. replay: Ray's own ASHA bracket (``ray.tune.schedulers.async_hyperband._Bracket``) replayed over the
   grid's recorded per-epoch curves, one trial at a time, for ``--replays`` random orders of all the
   configurations (and for the two orders that really ran). It is a replay, not a run: no training.

Trial-epochs are the epochs each trial actually trained, read from its MLflow run's per-epoch history
(an epoch a stopped trial finished after Tune's decision counts; an epoch cut mid-way does not).
The goal: ASHA's best within 2% of the grid's best with at most half the grid's trial-epochs.
``--grid-from`` re-uses the grid of an earlier ``--json`` (same space, epochs, steps and metric; training
is deterministic) and runs ASHA only.
The metric (``val/miou`` by default) is the one both searches rank on; after 6 steps ``val/pq`` was
still 0 for half the configurations of a small run (every 2-stage one), a tie ASHA never breaks (it
stops a trial only below the cutoff). The Spearman rank correlation between each configuration's
epoch-1 and final value is printed to show how much the first rung can know.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "tune_quickstart.yaml"
DEFAULT_SPACE = {  # 2 x 2 x 2 x 2 = 16 configurations
    "model.num_proposals": [8, 16],
    "model.num_stages": [1, 2],
    "model.update.conv_kernel_size": [1, 3],
    "train.lr": [2.0e-4, 1.0e-3],
}
GOAL_EPOCHS, GOAL_METRIC = 0.5, 0.98


@dataclass
class Trial:
    config: dict[str, Any]
    order: int  # position in which Tune created the trial
    epochs_trained: int  # from the MLflow per-epoch history
    curve: list[float]  # the metric after each trained epoch
    status: str


@dataclass
class Search:
    name: str
    trials: list[Trial]
    best: float
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def trial_epochs(self) -> int:
        return sum(trial.epochs_trained for trial in self.trials)


def _key(config: dict[str, Any], keys: list[str]) -> tuple:
    return tuple(config[key] for key in keys)


def _experiment(args: argparse.Namespace, workdir: Path, space: dict[str, list[Any]], asha: bool) -> Any:
    from knet_platform.experiment.schema import load_experiment

    configs = math.prod(len(values) for values in space.values())
    overrides = [
        f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.steps_per_epoch}",
        f"train.warmup_iters={max(1, args.steps_per_epoch // 2)}",
        f"train.lr_steps=[{max(1, round(args.epochs * 0.75))}]",  # decay at 3/4, as the YAML's 3 of 4
        f"train.metric={args.metric}",  # checkpoints ranked on the searched metric
        f"tune.metric={args.metric}",
        f"tune.search_alg={'random' if asha and args.asha_order == 'random' else 'grid'}",
        f"tune.num_samples={configs if asha and args.asha_order == 'random' else 1}",
        f"tune.scheduler.type={'asha' if asha else 'fifo'}",
        "tune.scheduler.max_epochs=null",  # = train.epochs: the same budget per trial in both searches
        f"tune.scheduler.grace_period={args.grace_period}",
        f"tune.scheduler.reduction_factor={args.reduction_factor}",
        f"tune.max_concurrent_trials={args.concurrent}",
        f"scaling.num_workers={args.workers}",
        f"scaling.resources_per_worker={{CPU: {args.worker_cpus}}}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.artifact_location={workdir / 'mlartifacts'}",
        f"tracking.storage_path={workdir / 'ray_results'}",
        f"tracking.registered_model=tune-efficiency-{'asha' if asha else 'grid'}",
        *args.overrides,
    ]
    experiment = load_experiment(str(QUICKSTART), overrides)
    if asha and args.asha_order == "random":
        tune_space = {key: {"choice": list(values)} for key, values in space.items()}
    elif asha:  # every configuration once, each key's values in a seeded random order
        rng = random.Random(args.seed)
        tune_space = {key: {"grid": rng.sample(list(values), len(values))} for key, values in space.items()}
    else:
        tune_space = {key: {"grid": list(values)} for key, values in space.items()}
    return experiment.with_overrides({"tune.space": tune_space})


def _run(args: argparse.Namespace, workdir: Path, space: dict[str, list[Any]], asha: bool) -> Search:
    import numpy as np
    from knet_platform.tune.search import run_search
    from mlflow.tracking import MlflowClient

    experiment = _experiment(args, workdir, space, asha)
    if asha:
        np.random.seed(args.seed)  # Tune's variant generator samples from numpy's global generator
    started = time.perf_counter()
    summary = run_search(experiment)
    seconds = time.perf_counter() - started
    client = MlflowClient(tracking_uri=experiment.tracking.uri)
    trials = []
    for record in summary.trials:
        if record.mlflow_run_id is None:
            raise RuntimeError(f"trial {record.trial_id} has no MLflow run; cannot count its epochs")
        trained = {m.step for m in client.get_metric_history(record.mlflow_run_id, "train/loss")}
        history = {m.step: m.value for m in client.get_metric_history(record.mlflow_run_id, args.metric)}
        trials.append(
            Trial(
                config={key: record.overrides[key] for key in space},
                order=int(record.trial_id.rsplit("_", 1)[-1]),
                epochs_trained=len(trained),
                curve=[history[epoch] for epoch in sorted(history)],
                status=record.status,
            )
        )
    trials.sort(key=lambda trial: trial.order)
    best = summary.best.metric if summary.best is not None else math.nan
    return Search("ASHA" if asha else "grid", trials, best, seconds)


def replay_asha(
    curves: list[list[float]], order: list[int], *, grace: int, rf: int, max_t: int, mode: str
) -> tuple[int, float]:
    """(trial-epochs, best value) of Ray's ASHA rule over recorded ``curves``, trials run one at a time
    in ``order``: after each epoch the bracket decides (at max_t the trial ends, and its result is
    recorded as ``on_trial_complete`` does)."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
    sign = 1.0 if mode == "max" else -1.0
    used, best = 0, -math.inf
    for position, index in enumerate(order):
        trial = SimpleNamespace(trial_id=f"replay_{position}")
        for epoch in range(1, max_t + 1):
            value = curves[index][epoch - 1]
            used += 1
            best = max(best, sign * value)
            action = bracket.on_result(trial, epoch, sign * value)
            if epoch >= max_t or action == TrialScheduler.STOP:
                break
    return used, sign * best


def _number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string: read it as the number it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _spearman(first: list[float], last: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(set(first)) < 2 or len(set(last)) < 2:
        return math.nan  # all tied: no ranking at all
    return float(spearmanr(first, last).statistic)


def _ratio(value: float, reference: float, mode: str) -> float:
    if not reference or math.isnan(reference):
        return math.nan
    return value / reference if mode == "max" else reference / value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=int, default=8, help="per-trial budget (train.epochs = ASHA's max_t)"
    )
    parser.add_argument("--steps-per-epoch", type=int, default=6, help="train.max_steps_per_epoch")
    parser.add_argument(
        "--space",
        nargs="+",
        metavar="KEY=[V, ...]",
        help="the configurations: a list of values per dotted key (default: 16 configurations "
        "of num_proposals, num_stages, conv_kernel_size and lr)",
    )
    parser.add_argument("--metric", default="val/miou", help="the metric both searches rank on (mode max)")
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=2)
    parser.add_argument(
        "--asha-order",
        choices=["shuffled-grid", "random"],
        default="shuffled-grid",
        help="ASHA over every configuration once in a seeded order, or a random search (with replacement)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="ASHA's order or sampling, and the replays' orders"
    )
    parser.add_argument("--grid-from", type=Path, help="re-use the grid recorded by an earlier --json")
    parser.add_argument("--replays", type=int, default=2000, help="random orders replayed (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="Train workers per trial")
    parser.add_argument("--worker-cpus", type=float, default=0.75, help="CPU per Train worker")
    parser.add_argument("--concurrent", type=int, default=1, help="tune.max_concurrent_trials")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures and curves here")
    args = parser.parse_args()
    space = dict(DEFAULT_SPACE)
    if args.space:
        space = {}
        for text in args.space:
            key, _, values = text.partition("=")
            parsed = yaml.safe_load(values)
            if not isinstance(parsed, list) or not parsed:
                raise SystemExit(f"--space {text!r}: write KEY=[v1, v2, ...]")
            space[key.strip()] = [_number(value) for value in parsed]

    from knet_platform.ray_runtime import ray_session

    recorded_grid = _recorded_grid(args, space) if args.grid_from else None
    with tempfile.TemporaryDirectory(prefix="knet-tune-bench-") as scratch, ray_session():
        searches = {"grid": recorded_grid} if recorded_grid else {}
        for name, asha in (("grid", False), ("asha", True)):
            if name in searches:
                continue
            workdir = Path(scratch) / name
            workdir.mkdir()
            searches[name] = _run(args, workdir, space, asha)
    report(args, space, searches["grid"], searches["asha"])


def _recorded_grid(args: argparse.Namespace, space: dict[str, list[Any]]) -> Search:
    """The grid search of an earlier ``--json``, refused unless it searched the same thing."""
    figures = json.loads(args.grid_from.read_text())
    recorded = figures["args"]
    same = {
        "space": figures["space"] == space,
        "epochs": recorded["epochs"] == args.epochs,
        "steps per epoch": recorded["steps_per_epoch"] == args.steps_per_epoch,
        "metric": recorded["metric"] == args.metric,
        "set": recorded["overrides"] == args.overrides,
    }
    if not all(same.values()):
        differ = ", ".join(name for name, ok in same.items() if not ok)
        raise SystemExit(f"--grid-from {args.grid_from}: that grid differs from this run in: {differ}")
    grid = figures["grid"]
    trials = [Trial(**trial) for trial in grid["trials"]]
    return Search(grid["name"], trials, grid["best"], grid["seconds"], grid.get("extras", {}))


def report(args: argparse.Namespace, space: dict[str, list[Any]], grid: Search, asha: Search) -> None:
    """The curves, the replays and the table (and ``--json``) from the two searches that ran."""
    keys, mode = list(space), "max"

    # ---- the grid's curves: how informative is epoch 1? ---------------------------------------
    complete = [t for t in grid.trials if len(t.curve) == args.epochs]
    if len(complete) != len(grid.trials):
        print(f"note: {len(grid.trials) - len(complete)} grid trials have no full curve; left out of replays")
    first = [t.curve[0] for t in complete]
    last = [t.curve[-1] for t in complete]
    rho = _spearman(first, last)
    ties = len(first) - len(set(first))
    print(f"\n{args.metric} per epoch, grid trials in Tune's order (keys: {', '.join(keys)}):")
    for trial in grid.trials:
        values = " ".join(f"{v:.3f}" for v in trial.curve)
        print(f"  {str(_key(trial.config, keys)):<40} {values}")

    # ---- replays of Ray's ASHA rule over those curves ---------------------------------------------
    grid_budget = len(grid.trials) * args.epochs
    rule = {"grace": args.grace_period, "rf": args.reduction_factor, "max_t": args.epochs, "mode": mode}
    curves = [t.curve for t in complete]
    by_config = {_key(t.config, keys): i for i, t in enumerate(complete)}
    replays: dict[str, Any] = {}
    if complete:
        used, best = replay_asha(curves, list(range(len(curves))), **rule)
        replays["grid order"] = (used, best)
        asha_order = [by_config.get(_key(t.config, keys)) for t in asha.trials]
        if None not in asha_order:
            replays["ASHA run's order"] = replay_asha(curves, asha_order, **rule)
    samples = []
    if complete and args.replays > 0:
        rng = random.Random(args.seed)
        for _ in range(args.replays):
            order = list(range(len(curves)))
            rng.shuffle(order)
            samples.append(replay_asha(curves, order, **rule))

    # ---- the table -------------------------------------------------------------------------------
    distinct = {_key(t.config, keys) for t in asha.trials}
    grid_best_config = max(complete, key=lambda t: max(t.curve)).config if complete else None
    asha_ratio = asha.trial_epochs / grid.trial_epochs
    asha_metric = _ratio(asha.best, grid.best, mode)
    met = asha_ratio <= GOAL_EPOCHS and asha_metric >= GOAL_METRIC
    header = [
        "search",
        "trials",
        "trial-epochs",
        "ratio",
        f"best {args.metric}",
        "vs grid best",
        "wall",
        "goal",
    ]
    rows = [
        ["grid (FIFO, every epoch)", len(grid.trials), grid.trial_epochs, "1.00", f"{grid.best:.4f}", "1.000",
         f"{grid.seconds:.0f} s", "-"],
        [f"ASHA ({args.asha_order}, {len(distinct)} distinct)", len(asha.trials), asha.trial_epochs, f"{asha_ratio:.2f}",
         f"{asha.best:.4f}", f"{asha_metric:.3f}", f"{asha.seconds:.0f} s", "met" if met else "not met"],
    ]  # fmt: skip
    for name, (used, best) in replays.items():
        ratio, vs = used / grid_budget, _ratio(best, grid.best, mode)
        ok = ratio <= GOAL_EPOCHS and vs >= GOAL_METRIC
        rows.append([f"replay: {name}", len(curves), used, f"{ratio:.2f}", f"{best:.4f}", f"{vs:.3f}", "-",
                     "met" if ok else "not met"])  # fmt: skip
    if samples:
        ratios = [used / grid_budget for used, _ in samples]
        metric_ratios = [_ratio(best, grid.best, mode) for _, best in samples]
        both = sum(r <= GOAL_EPOCHS and m >= GOAL_METRIC for r, m in zip(ratios, metric_ratios)) / len(
            samples
        )
        spread = statistics.pstdev(ratios)
        rows.append([
            f"replay: {len(samples)} random orders", len(curves),
            f"{statistics.mean(u for u, _ in samples):.1f}", f"{statistics.mean(ratios):.2f} ± {spread:.2f}",
            f"{statistics.mean(b for _, b in samples):.4f}", f"{statistics.mean(metric_ratios):.3f} (min "
            f"{min(metric_ratios):.3f})", "-", f"met in {both:.0%}",
        ])  # fmt: skip
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    print(
        f"\ngoal: ASHA's best >= {GOAL_METRIC:.2f}x the grid's best with <= {GOAL_EPOCHS:.2f}x its trial-epochs. "
        f"{len(complete)} configurations x {args.epochs} epochs of {args.steps_per_epoch} steps; ASHA grace "
        f"{args.grace_period}, reduction factor {args.reduction_factor}; trials {args.concurrent} at a time."
    )
    sampled_best = max((max(t.curve) for t in complete if _key(t.config, keys) in distinct), default=math.nan)
    found = grid_best_config is not None and _key(grid_best_config, keys) in distinct
    sampling = "sampled with replacement" if args.asha_order == "random" else "each once, seeded order"
    print(
        f"ASHA ran {len(distinct)} distinct of {len(complete)} configurations ({sampling}); "
        f"the grid's best {grid_best_config} was {'' if found else 'not '}among them. Trained for every "
        f"epoch (the grid's curves), the best configuration it sampled reaches {sampled_best:.4f} "
        f"({_ratio(sampled_best, grid.best, mode):.3f}x the grid's best): below that, stopping lost it."
    )
    rho_text = "undefined (all tied)" if math.isnan(rho) else f"{rho:.2f}"
    print(
        f"{args.metric} after epoch 1 vs epoch {args.epochs} over the grid's configurations: Spearman "
        f"{rho_text}; {ties} of {len(first)} epoch-1 values tie with another (ASHA cannot stop a tie)."
    )
    print("replay rows: Ray's ASHA rule over the grid's recorded curves, not trials that ran.")
    if args.json:
        figures = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "grid_from": str(args.grid_from) if args.grid_from else None,
            "space": space,
            "grid": {**asdict(grid), "trial_epochs": grid.trial_epochs},
            "asha": {**asdict(asha), "trial_epochs": asha.trial_epochs},
            "asha_epochs_over_grid": asha_ratio,
            "asha_best_over_grid_best": asha_metric,
            "goal_met": met,
            "spearman_epoch1_final": rho,
            "replays": {name: {"trial_epochs": u, "best": b} for name, (u, b) in replays.items()},
            "random_order_replays": [{"trial_epochs": u, "best": b} for u, b in samples],
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
