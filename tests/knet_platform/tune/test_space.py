"""The ``tune.space`` operators become the right Ray Tune domains; search_alg grid enumerates everything;
budgets never let a search hang; secrets reach Tune as placeholders. No Ray is started here. (What a
``tune`` section must be is tested in test_validation.py.)"""

from __future__ import annotations

import random

import pytest
from knet_platform.tune.space import (
    SearchSpaceError,
    mask_space,
    num_trials,
    param_space,
    plan_budget,
    resolve_space,
    to_domain,
)
from ray.tune.search.sample import Categorical, Float, Integer


def _samples(domain, n: int = 200) -> list:
    random.seed(0)
    return [domain.sample() for _ in range(n)]


def test_choice_samples_only_listed_values():
    domain = to_domain("choice", [8, 16, 32])
    assert isinstance(domain, Categorical)
    assert set(_samples(domain)) == {8, 16, 32}


def test_grid_becomes_grid_search():
    assert to_domain("grid", [1, 2, 3]) == {"grid_search": [1, 2, 3]}


def test_uniform_and_loguniform_stay_inside_their_bounds():
    uniform = to_domain("uniform", [0.0, 0.2])
    loguniform = to_domain("loguniform", [1e-5, 1e-3])
    assert isinstance(uniform, Float) and isinstance(loguniform, Float)
    assert all(0.0 <= v <= 0.2 for v in _samples(uniform))
    values = _samples(loguniform)
    assert all(1e-5 <= v <= 1e-3 for v in values)
    # log-uniform: about half the samples fall below the geometric mean 1e-4
    below = sum(v < 1e-4 for v in values) / len(values)
    assert 0.35 < below < 0.65


def test_randint_excludes_high_and_qrandint_is_on_its_grid():
    randint = to_domain("randint", [1, 3])
    assert isinstance(randint, Integer)
    assert set(_samples(randint)) == {1, 2}
    assert set(_samples(to_domain("randint", [1.0, 3.0]))) == {1, 2}  # integers written as 1.0 stay integers
    qrandint = to_domain("qrandint", [64, 256, 64])
    assert set(_samples(qrandint)) <= {64, 128, 192, 256}
    assert all(v % 64 == 0 for v in _samples(qrandint))


def test_param_space_is_flat_and_keyed_by_dotted_keys():
    space = param_space({"train.lr": ("loguniform", [1e-4, 1e-3]), "model.num_stages": ("grid", [1, 2])})
    assert set(space) == {"train.lr", "model.num_stages"}


def test_search_alg_grid_enumerates_every_entry():
    space = {"a": ("choice", [1, 2]), "b": ("grid", [3, 4, 5])}
    resolved = resolve_space(space, "grid")
    assert resolved == {"a": ("grid", [1, 2]), "b": ("grid", [3, 4, 5])}
    assert num_trials(resolved, 1) == 6
    assert resolve_space(space, "random") == {
        "a": ("choice", [1, 2]),
        "b": ("grid", [3, 4, 5]),
    }
    assert num_trials(resolve_space(space, "random"), 4) == 12  # the grid, 4 times


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
    assert budget.driver == {"CPU": 0.5} and budget.worker == {"CPU": 1.0}


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


def test_a_worker_bigger_than_every_node_is_refused_even_when_the_cluster_total_fits():
    with pytest.raises(SearchSpaceError) as error:
        plan_budget(
            {"CPU": 8.0},
            nodes=[{"CPU": 4.0}, {"CPU": 4.0}],
            num_workers=1,
            resources_per_worker={"CPU": 6.0},
            driver_cpus=0.25,
            requested_concurrency=None,
            total_trials=2,
        )
    message = str(error.value)
    assert "one Train worker needs 6 CPU" in message and "4 CPU" in message
    assert "no trial could ever start" in message


def test_concurrency_counts_what_fits_node_by_node():
    # 2 nodes of 3 CPUs: the totals bind (6 CPUs hold one trial of 0.5 + 2 x 1.5 CPUs)
    common = {"num_workers": 2, "driver_cpus": 0.5, "requested_concurrency": None, "total_trials": 8}
    budget = plan_budget({"CPU": 6.0}, nodes=[{"CPU": 3.0}] * 2, resources_per_worker={"CPU": 1.5}, **common)
    assert budget.max_concurrent == 1
    # 4 nodes of 2.5 CPUs: the total (10 CPUs) allows 2 trials of 3.5 CPUs, but each node holds one
    # 1.5-CPU worker plus the 0.5-CPU driver at most: 4 workers + 2 drivers fit, so 2 trials
    budget = plan_budget({"CPU": 10.0}, nodes=[{"CPU": 2.5}] * 4, resources_per_worker={"CPU": 1.5}, **common)
    assert budget.max_concurrent == 2
    # 3 nodes of 2 CPUs: the total (6 CPUs) allows 2 trials of 0.5 + 2 x 1.2 CPUs, but a node holds one
    # 1.2-CPU worker only: 3 workers in all, enough for one trial of two workers
    budget = plan_budget({"CPU": 6.0}, nodes=[{"CPU": 2.0}] * 3, resources_per_worker={"CPU": 1.2}, **common)
    assert budget.max_concurrent == 1


def test_use_gpu_without_a_gpu_amount_counts_the_gpu_ray_train_adds():
    common = {"num_workers": 2, "driver_cpus": 0.25, "requested_concurrency": None, "total_trials": 8}
    budget = plan_budget({"CPU": 16.0, "GPU": 4.0}, resources_per_worker={"CPU": 1.0}, use_gpu=True, **common)
    assert budget.worker == {"CPU": 1.0, "GPU": 1.0} and budget.per_trial["GPU"] == 2.0
    assert budget.max_concurrent == 2  # 4 GPUs / 2 per trial
    with pytest.raises(
        SearchSpaceError, match=r"1 GPU per worker for scaling\.use_gpu.*no trial could ever start"
    ):
        plan_budget({"CPU": 16.0}, resources_per_worker={"CPU": 1.0}, use_gpu=True, **common)


def test_a_trial_whose_workers_the_nodes_cannot_all_place_is_refused():
    # 3 nodes of 2 CPUs hold one 1.2-CPU worker each: 6 CPUs in all, but never a trial of 4 workers
    with pytest.raises(
        SearchSpaceError, match=r"num_workers=4 workers of 1\.2 CPU.*room for 3.*could ever start"
    ):
        plan_budget(
            {"CPU": 6.0},
            nodes=[{"CPU": 2.0}] * 3,
            num_workers=4,
            resources_per_worker={"CPU": 1.2},
            driver_cpus=0.25,
            requested_concurrency=None,
            total_trials=2,
        )


GPU_TRIAL = {"num_workers": 2, "resources_per_worker": {"CPU": 4.0}, "use_gpu": True, "driver_cpus": 0.25}


def test_with_wait_for_resources_a_trial_no_node_holds_waits_at_the_requested_concurrency():
    cpu_head = {"CPU": 4.0}  # an autoscaling cluster that starts with no GPU worker
    common = {"nodes": [cpu_head], "total_trials": 8, **GPU_TRIAL}
    with pytest.raises(
        SearchSpaceError, match=r"no Ray node has that much.*set scaling\.wait_for_resources=true"
    ):
        plan_budget(cpu_head, requested_concurrency=3, **common)
    budget = plan_budget(cpu_head, requested_concurrency=3, wait_for_resources=True, **common)
    assert budget.max_concurrent == 3 and budget.per_trial == {"CPU": 8.25, "GPU": 2.0}
    assert budget.pending.startswith("waiting for resources: each trial holds 8.25 CPU, 2 GPU")
    assert "fit 0 trial(s) now" in budget.pending and "up to 3 trials" in budget.pending
    # never more than the trials; nothing pending once the nodes are there
    gpu_nodes = [{"CPU": 32.0, "GPU": 4.0}] * 4  # 2 trials each
    grown = plan_budget(
        {"CPU": 128.0, "GPU": 16.0},
        requested_concurrency=12,
        wait_for_resources=True,
        **{**common, "nodes": gpu_nodes},
    )
    assert grown.max_concurrent == 8 and grown.pending is None
    # a local Ray never grows: refused as without the flag, saying the flag does nothing there
    with pytest.raises(SearchSpaceError, match=r"wait_for_resources has no effect on a local Ray"):
        plan_budget(cpu_head, requested_concurrency=3, wait_for_resources=True, local=True, **common)


def test_secret_space_values_reach_tune_as_placeholders_and_trials_get_them_back():
    space = {
        "tracking.artifact_location": (
            "choice",
            ["s3://b/a?X-Amz-Signature=s1gn", "https://bob:k-42@h/b", "/plain"],
        ),
        "data.api_key": ("grid", ["k1", "k2"]),
        "train.lr": ("loguniform", [1e-4, 1e-3]),
    }
    masked = mask_space(space)
    assert masked.space == {
        "tracking.artifact_location": (
            "choice", ["s3://b/a?X-Amz-Signature=*** #1", "https://***@h/b #2", "/plain"]
        ),
        "data.api_key": ("grid", ["*** #1", "*** #2"]),  # a secret-named key: the whole value
        "train.lr": ("loguniform", [1e-4, 1e-3]),
    }  # fmt: skip
    config = {"tracking.artifact_location": "https://***@h/b #2", "data.api_key": "*** #1", "train.lr": 3e-4}
    assert masked.reveal(config) == {
        "tracking.artifact_location": "https://bob:k-42@h/b", "data.api_key": "k1", "train.lr": 3e-4
    }  # fmt: skip
    assert mask_space({"model.num_proposals": ("choice", [8, 16])}).originals == {}
