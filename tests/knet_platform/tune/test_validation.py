"""``validate_search``, the one validation of a ``tune`` section: every rule about its settings, its space
entries, the search algorithm, the scheduler and every value a trial can receive refuses the search
before Ray starts, naming the key and the fix; ``knet show-config`` and ``knet run`` refuse alike.
No Ray is started here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from knet_platform.experiment.schema import load_experiment
from knet_platform.tune.space import SearchSpaceError
from knet_platform.tune.validation import (
    check_entry,
    check_search_alg,
    check_value_type,
    combinations_to_check,
    field_type,
    max_epochs,
    require_concurrency_when_waiting,
    space_of,
    validate_search,
    values_to_check,
)

from tests.knet_platform.tiny_run import QUICKSTART, REPO, load_tiny, tiny_overrides, tune_overrides


def _tiny_search(tmp_path: Path, *extra: str, epochs: int = 2):
    return load_tiny(tmp_path, *tune_overrides(lrs=[1e-3, 5e-4]), *extra, epochs=epochs, workers=1)


# ---- the section's settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.space={}", r"tune\.space: must name at least one dotted key"),
        ("tune.num_samples=0", r"tune\.num_samples: must be >= 1"),
        ("tune.max_concurrent_trials=0", r"tune\.max_concurrent_trials: must be >= 1 or null"),
        ("tune.trial_driver_cpus=0", r"tune\.trial_driver_cpus: must be > 0 .*got 0"),
        ("tune.trial_driver_cpus=-0.5", r"tune\.trial_driver_cpus: must be > 0 .*got -0\.5"),
        ("tune.scheduler.grace_period=0", r"tune\.scheduler\.grace_period: must be >= 1"),
        ("tune.scheduler.reduction_factor=1", r"tune\.scheduler\.reduction_factor: must be >= 2"),
    ],
)
def test_impossible_settings_are_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(SearchSpaceError, match=message):
        validate_search(_tiny_search(tmp_path, override))


def test_trial_driver_cpus_0_is_refused_alike_by_show_config_and_by_run_before_ray(
    tmp_path, capsys, monkeypatch
):
    import ray
    from knet_platform.cli import main
    from knet_platform.tune import search

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(search, "start_ray", lambda **_: pytest.fail("Ray was started"))
    overrides = [*tiny_overrides(tmp_path, workers=1), *tune_overrides(lrs=[1e-3, 5e-4])]
    sets = [f"--set={override}" for override in [*overrides, "tune.trial_driver_cpus=0"]]
    capsys.readouterr()
    assert main(["show-config", str(QUICKSTART), *sets]) == 2
    shown = capsys.readouterr()
    assert main(["run", str(QUICKSTART), *sets]) == 2
    run = capsys.readouterr()
    assert shown.err.startswith("error: tune.trial_driver_cpus: must be > 0") and shown.out == ""
    assert run.err == shown.err and run.out == ""
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()
    # and a valid section shows as before
    assert main(["show-config", str(QUICKSTART), *sets[:-1]]) == 0
    assert "trial_driver_cpus: 0.25" in capsys.readouterr().out


def test_wait_for_resources_needs_max_concurrent_trials_to_size_a_search(tmp_path):
    require_concurrency_when_waiting(True, 2)
    require_concurrency_when_waiting(False, None)
    with pytest.raises(SearchSpaceError, match=r"tune\.max_concurrent_trials is null, but scaling\.wait_for"):
        require_concurrency_when_waiting(True, None)
    waiting = ("scaling.wait_for_resources=true", "tune.max_concurrent_trials=null")
    with pytest.raises(SearchSpaceError, match=r"--set tune\.max_concurrent_trials=2"):
        validate_search(_tiny_search(tmp_path, *waiting))


def test_a_val_metric_must_be_evaluated_every_epoch(tmp_path):
    with pytest.raises(SearchSpaceError, match=r"tune\.metric='val/pq' is evaluated every 2 epochs"):
        validate_search(
            _tiny_search(
                tmp_path, "tune.metric=val/pq", "train.eval_interval=2", "train.checkpoint_interval=2"
            )
        )
    validate_search(
        _tiny_search(tmp_path, "train.eval_interval=2", "train.checkpoint_interval=2")
    )  # train/loss


# ---- each space entry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("uniform", [1.0], "takes [low, high]"),
        ("qrandint", [0, 8], "takes [low, high, q]"),
        ("uniform", [0.5, 0.1], "low < high"),
        ("randint", [3, 3], "low < high"),
        ("loguniform", [0.0, 1.0], "low > 0"),
        ("randint", [1.5, 3], "integers"),
        ("qrandint", [0, 10, 3], "q >= 1 dividing"),
        ("qrandint", [0, 10, 0], "q >= 1 dividing"),
        ("uniform", ["a", 1], "numbers"),
        ("uniform", [True, 2], "numbers"),
    ],
)
def test_bad_range_arguments_are_refused_naming_the_key(op, args, message):
    with pytest.raises(SearchSpaceError) as error:
        check_entry("train.lr", op, args)
    assert "tune.space.train.lr" in str(error.value)
    assert message in str(error.value)


def test_good_entries_pass():
    check_entry("train.lr", "loguniform", [1e-5, 1e-3])
    check_entry("model.num_stages", "randint", [1.0, 3.0])  # integers may be written as floats
    check_entry("model.update.feedforward_channels", "qrandint", [64, 256, 64])
    check_entry("model.num_stages", "choice", [1, "x"])  # listed values: checked as values


def test_field_types_come_from_the_experiment_and_model_dataclasses():
    assert field_type("model.num_stages") is int
    assert field_type("model.update.conv_kernel_size") is int
    assert field_type("model.update.dropout") is float
    assert field_type("train.lr") is float
    assert field_type("train.max_steps_per_epoch") == int | None
    assert field_type("scaling.resources_per_worker.CPU") is float
    assert field_type("model.num_proposal") is None  # unknown keys are reported by the value checks


def test_a_continuous_range_on_an_integer_field_is_refused_naming_key_and_operator():
    check_value_type("train.lr", "loguniform", float)
    check_value_type("model.num_stages", "randint", int)
    for tp in (int, int | None):
        with pytest.raises(SearchSpaceError, match=r"tune\.space\.model\.num_stages\.uniform: .*randint"):
            check_value_type("model.num_stages", "uniform", tp)


def test_a_fractional_stage_count_is_refused_before_ray_naming_key_and_operator(tmp_path):
    for bounds in ("[1, 3]", "[1.0, 3.0]"):
        experiment = _tiny_search(tmp_path, f"tune.space={{model.num_stages: {{uniform: {bounds}}}}}")
        with pytest.raises(SearchSpaceError, match=r"tune\.space\.model\.num_stages\.uniform: .*integer"):
            validate_search(experiment)


# ---- the search algorithm and the scheduler ------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "search_alg", "num_samples", "message"),
    [
        (
            {"train.lr": ("loguniform", [1e-4, 1e-3])},
            "grid",
            1,
            r"train\.lr\.loguniform: .*no list to enumerate",
        ),
        ({"model.num_stages": ("randint", [1, 3])}, "grid", 1, r"model\.num_stages\.randint: .*no list"),
        ({"model.num_stages": ("choice", [1, 2])}, "grid", 3, r"num_samples=3 .*same seed"),
        ({"model.num_stages": ("grid", [1, 2])}, "optuna", 4, r"model\.num_stages\.grid: .*optuna"),
    ],
)
def test_ambiguous_search_alg_combinations_are_refused(space, search_alg, num_samples, message):
    with pytest.raises(SearchSpaceError, match=message):
        check_search_alg(space, search_alg, num_samples)


def test_unambiguous_search_alg_combinations_pass():
    check_search_alg({"a": ("choice", [1, 2]), "b": ("grid", [3])}, "grid", 1)
    check_search_alg({"a": ("uniform", [0, 1]), "b": ("grid", [3])}, "random", 4)
    check_search_alg({"a": ("uniform", [0, 1]), "b": ("choice", [3])}, "optuna", 4)


def test_search_alg_grid_refusals_come_before_ray(tmp_path):
    experiment = _tiny_search(
        tmp_path, "tune.search_alg=grid", "tune.space={train.lr: {uniform: [1.0e-4, 1.0e-3]}}"
    )
    with pytest.raises(SearchSpaceError, match=r"search_alg=grid"):
        validate_search(experiment)
    validate_search(
        _tiny_search(tmp_path, "tune.search_alg=grid", "tune.space={train.lr: {choice: [1.0e-4, 1.0e-3]}}")
    )


def test_the_schedulers_budget_must_be_train_epochs(tmp_path):
    validate_search(_tiny_search(tmp_path, "tune.scheduler.max_epochs=2"))
    for max_epochs_ in (4, 1):
        with pytest.raises(SearchSpaceError, match=rf"max_epochs={max_epochs_} differs from train\.epochs=2"):
            validate_search(_tiny_search(tmp_path, f"tune.scheduler.max_epochs={max_epochs_}"))
    with pytest.raises(SearchSpaceError, match=r"tune\.space\.train\.epochs: ASHA"):
        validate_search(_tiny_search(tmp_path, "tune.space={train.epochs: {choice: [1, 2]}}"))
    with pytest.raises(SearchSpaceError, match=r"grace_period=3 is more than train\.epochs=2"):
        validate_search(_tiny_search(tmp_path, "tune.scheduler.grace_period=3"))
    validate_search(_tiny_search(tmp_path, "tune.scheduler.type=fifo", "tune.scheduler.grace_period=3"))


# ---- every value a trial can receive -------------------------------------------------------------


def test_values_to_check_cover_every_listed_value_and_every_value_of_a_small_integer_range():
    assert values_to_check("choice", [1, 2, 3]) == [1, 2, 3]
    assert values_to_check("randint", [1, 4]) == [1, 2, 3]  # high excluded, as Tune's randint
    assert values_to_check("qrandint", [64, 256, 64]) == [64, 128, 192, 256]  # high included
    assert values_to_check("uniform", [0.1, 0.5]) == [0.1, pytest.approx(0.3), 0.5]
    assert values_to_check("loguniform", [1e-4, 1e-2]) == [1e-4, pytest.approx(1e-3), 1e-2]


def test_a_long_integer_range_is_checked_at_both_ends_and_a_fixed_sample_inside():
    values = values_to_check("randint", [0, 1000])
    assert values[0] == 0 and values[-1] == 999 and len(values) == 10
    assert values == values_to_check("randint", [0, 1000])  # the same sample every time
    assert all(0 < v < 999 for v in values[1:-1])


def test_combinations_are_all_checked_in_a_small_space_and_sampled_in_a_large_one():
    small = list(combinations_to_check({"a": [1, 2], "b": [3, 4, 5]}))
    assert len(small) == 6 and {"a": 2, "b": 5} in small
    large = list(combinations_to_check({f"k{i}": list(range(4)) for i in range(5)}))  # 1024 combinations
    assert 0 < len(large) < 100


def test_tune_space_keys_must_exist_and_every_listed_value_must_validate(tmp_path):
    # the schema parses the section's shape only: these load, and the search is refused before Ray
    unknown = _tiny_search(tmp_path, "tune.space={model.num_proposal: {choice: [4, 8]}}")
    with pytest.raises(
        SearchSpaceError, match=r"tune\.space\.model\.num_proposal: .*unknown key.*model\.num_proposals"
    ):
        validate_search(unknown)
    zero = _tiny_search(tmp_path, "tune.space={train.batch_size: {choice: [2, 0]}}")
    with pytest.raises(
        SearchSpaceError, match=r"tune\.space\.train\.batch_size: value 0 .*train\.batch_size: must be >= 1"
    ):
        validate_search(zero)


def test_a_range_whose_upper_end_is_invalid_is_refused_before_ray_starts(tmp_path):
    experiment = _tiny_search(tmp_path, "tune.space={data.transforms.flip_prob: {uniform: [0.0, 1.5]}}")
    with pytest.raises(SearchSpaceError, match=r"tune\.space\.data\.transforms\.flip_prob: value 1\.5"):
        validate_search(experiment)


def test_every_value_of_a_small_integer_range_is_validated(tmp_path):
    # 1 and 3 are valid kernel sizes; the inner value 2 is not (kernel sizes are odd)
    experiment = _tiny_search(tmp_path, "tune.space={model.update.conv_kernel_size: {randint: [1, 4]}}")
    with pytest.raises(
        SearchSpaceError, match=r"tune\.space\.model\.update\.conv_kernel_size: value 2 .*odd"
    ):
        validate_search(experiment)
    validate_search(
        _tiny_search(tmp_path, "tune.space={model.update.conv_kernel_size: {qrandint: [1, 5, 2]}}")
    )


def test_values_valid_one_by_one_but_not_together_are_refused(tmp_path):
    # base: 96 channels, 4 heads. Channels 128 (with 4 heads) and 3 heads (with 96 channels) are each
    # valid, but 128 channels cannot be split into 3 heads
    experiment = _tiny_search(
        tmp_path,
        "model.channels=96",
        "model.update.num_heads=4",
        "tune.space={model.channels: {choice: [96, 128]}, model.update.num_heads: {choice: [3, 4]}}",
    )
    with pytest.raises(SearchSpaceError, match=r"not valid together .*model\.channels=128.*num_heads=3"):
        validate_search(experiment)


def test_the_tune_quickstart_yaml_loads_and_its_search_validates():
    from knet_platform.tune.space import num_trials

    experiment = load_experiment(REPO / "experiments" / "tune_quickstart.yaml")
    validate_search(experiment)
    space = space_of(experiment)
    assert {"model.num_proposals", "model.num_stages", "train.lr"} <= set(space)
    assert len([key for key in space if key.startswith("model.update.")]) >= 2
    assert num_trials(space, experiment.tune.num_samples) >= 4
    assert experiment.tune.scheduler.type == "asha"
    assert max_epochs(experiment) == experiment.train.epochs
    # the per-trial budget moves with train.epochs (the benchmark's --epochs relies on it)
    longer = load_experiment(REPO / "experiments" / "tune_quickstart.yaml", ["train.epochs=8"])
    validate_search(longer)
    assert max_epochs(longer) == 8


# ---- one direction of dependency -----------------------------------------------------------------


def test_the_experiment_package_imports_nothing_from_the_tune_package():
    """Validation depends on the schema, never the reverse: no import of ``knet_platform.tune`` anywhere
    in ``knet_platform.experiment`` (module level, inside functions or under TYPE_CHECKING)."""
    offenders = []
    for path in sorted((REPO / "platform" / "experiment").rglob("*.py")):
        package = ["knet_platform", *path.parent.relative_to(REPO / "platform").parts]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                anchor = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*anchor, *([node.module] if node.module else [])])
                names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            tune = [name for name in names if (name + ".").startswith("knet_platform.tune.")]
            offenders += [f"{path.name}: {name}" for name in tune]
    assert offenders == []


# ---- data ingest ---------------------------------------------------------------------------------


def test_a_search_refuses_ray_data_ingest_and_runs_auto_trials_on_the_dataloader(tmp_path: Path) -> None:
    from knet_platform.tune.search import trial_base

    parquet = "data.train={format: parquet, shards: " + str(tmp_path) + "}"
    with pytest.raises(SearchSpaceError, match=r"data\.ingest\.engine: ray_data streams data for `knet run`"):
        validate_search(_tiny_search(tmp_path, parquet, "data.ingest.engine=ray_data"))
    auto = _tiny_search(tmp_path, parquet)
    assert auto.data.streams_train and not trial_base(auto).data.streams_train
    assert trial_base(auto).tune is None
