"""The ``tune.space`` operators become the right Ray Tune domains; budgets never let a search hang."""

from __future__ import annotations

import random

import pytest
from knet_platform.search_space import (
    SearchSpaceError,
    corner_values,
    num_trials,
    param_space,
    plan_budget,
    to_domain,
)
from ray.tune.search.sample import Categorical, Float, Integer


def _samples(domain, n: int = 200) -> list:
    random.seed(0)
    return [domain.sample() for _ in range(n)]


def test_choice_samples_only_listed_values():
    domain = to_domain("model.num_proposals", "choice", [8, 16, 32])
    assert isinstance(domain, Categorical)
    assert set(_samples(domain)) == {8, 16, 32}


def test_grid_becomes_grid_search():
    assert to_domain("model.num_stages", "grid", [1, 2, 3]) == {"grid_search": [1, 2, 3]}


def test_uniform_and_loguniform_stay_inside_their_bounds():
    uniform = to_domain("model.update.dropout", "uniform", [0.0, 0.2])
    loguniform = to_domain("train.lr", "loguniform", [1e-5, 1e-3])
    assert isinstance(uniform, Float) and isinstance(loguniform, Float)
    assert all(0.0 <= v <= 0.2 for v in _samples(uniform))
    values = _samples(loguniform)
    assert all(1e-5 <= v <= 1e-3 for v in values)
    # log-uniform: about half the samples fall below the geometric mean 1e-4
    below = sum(v < 1e-4 for v in values) / len(values)
    assert 0.35 < below < 0.65


def test_randint_excludes_high_and_qrandint_is_on_its_grid():
    randint = to_domain("model.update.conv_kernel_size", "randint", [1, 3])
    assert isinstance(randint, Integer)
    assert set(_samples(randint)) == {1, 2}
    qrandint = to_domain("model.update.feedforward_channels", "qrandint", [64, 256, 64])
    assert set(_samples(qrandint)) <= {64, 128, 192, 256}
    assert all(v % 64 == 0 for v in _samples(qrandint))


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("normal", [0, 1], "unknown operator 'normal'"),
        ("choice", [], "non-empty list"),
        ("uniform", [1.0], "takes [low, high]"),
        ("uniform", [0.5, 0.1], "low < high"),
        ("loguniform", [0.0, 1.0], "low > 0"),
        ("randint", [1.5, 3], "integers"),
        ("qrandint", [0, 10, 3], "q >= 1 dividing"),
        ("uniform", ["a", 1], "numbers"),
    ],
)
def test_bad_specs_are_refused_naming_the_key(op, args, message):
    with pytest.raises(SearchSpaceError) as error:
        to_domain("train.lr", op, args)
    assert "tune.space.train.lr" in str(error.value)
    assert message in str(error.value)


def test_param_space_is_flat_and_keyed_by_dotted_keys():
    space = param_space({"train.lr": ("loguniform", [1e-4, 1e-3]), "model.num_stages": ("grid", [1, 2])})
    assert set(space) == {"train.lr", "model.num_stages"}


def test_corner_values_cover_lists_and_range_ends():
    assert corner_values("choice", [1, 2, 3]) == [1, 2, 3]
    assert corner_values("randint", [1, 4]) == [1, 3]
    assert corner_values("uniform", [0.1, 0.5]) == [0.1, 0.5]


def test_num_trials_multiplies_grids_by_samples():
    space = {"a": ("grid", [1, 2, 3]), "b": ("grid", [1, 2]), "c": ("choice", [1, 2])}
    assert num_trials(space, num_samples=2) == 12
    assert num_trials({"c": ("choice", [1, 2])}, num_samples=4) == 4


def test_budget_fits_trials_into_the_cluster():
    budget = plan_budget(
        {"CPU": 8.0},
        num_workers=2,
        resources_per_worker={"CPU": 1.0},
        driver_cpus=0.5,
        requested_concurrency=None,
        total_trials=10,
    )
    assert budget.per_trial == {"CPU": 2.5}
    assert budget.max_concurrent == 3  # 3 x 2.5 = 7.5 <= 8 < 4 x 2.5
    assert budget.driver == {"CPU": 0.5}


def test_budget_never_exceeds_the_request_or_the_number_of_trials():
    common = {"num_workers": 1, "resources_per_worker": {"CPU": 1.0}, "driver_cpus": 0.25}
    assert plan_budget({"CPU": 16.0}, requested_concurrency=2, total_trials=10, **common).max_concurrent == 2
    assert (
        plan_budget({"CPU": 16.0}, requested_concurrency=None, total_trials=4, **common).max_concurrent == 4
    )


def test_budget_counts_every_resource_kind():
    budget = plan_budget(
        {"CPU": 64.0, "GPU": 4.0},
        num_workers=2,
        resources_per_worker={"CPU": 4.0, "GPU": 1.0},
        driver_cpus=1.0,
        requested_concurrency=None,
        total_trials=8,
    )
    assert budget.per_trial == {"CPU": 9.0, "GPU": 2.0}
    assert budget.max_concurrent == 2  # GPUs bind: 4 / 2


def test_a_trial_that_cannot_fit_is_refused_before_anything_starts():
    with pytest.raises(SearchSpaceError) as error:
        plan_budget(
            {"CPU": 2.0},
            num_workers=2,
            resources_per_worker={"CPU": 1.0},
            driver_cpus=0.25,
            requested_concurrency=None,
            total_trials=4,
        )
    message = str(error.value)
    assert (
        "2.25 CPU" in message
        and "scaling.num_workers=2" in message
        and "no trial could ever start" in message
    )
