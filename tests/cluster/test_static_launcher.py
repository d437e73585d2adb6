"""The Ray cluster launcher configs in cluster/ (AWS, GCP, machines you own), checked the way `ray up`
checks them before it creates anything: Ray's own ``prepare_config`` (defaults of the provider merged in,
node types filled) and ``validate_config`` (Ray's JSON schema and node-type rules). No cluster is started
and no cloud SDK is needed: the provider bootstrap that follows in `ray up` (boto3, googleapiclient) talks
to the cloud and is not run here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).absolute().parents[2]
LAUNCHER_CONFIGS = sorted((ROOT / "cluster").glob("ray-cluster-*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


def test_there_is_a_config_for_aws_gcp_and_machines_you_own():
    assert {_load(path)["provider"]["type"] for path in LAUNCHER_CONFIGS} == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=[path.name for path in LAUNCHER_CONFIGS])
def test_ray_prepares_and_validates_the_config(path):
    config = _prepared(path)
    assert config["head_node_type"] in config["available_node_types"]


def test_ray_validation_refuses_an_unknown_field():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(LAUNCHER_CONFIGS[0])
    config["max_worker"] = 8
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=[path.name for path in LAUNCHER_CONFIGS])
def test_the_head_runs_no_training(path):
    config = _prepared(path)
    head = config["available_node_types"][config["head_node_type"]]
    head_start = " ".join(config["head_start_ray_commands"])
    # node types say it on the clouds; the local provider has none, so `ray start` says it
    assert head["resources"].get("CPU") == 0 or re.search(r"--num-cpus[= ]0\b", head_start)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=[path.name for path in LAUNCHER_CONFIGS])
def test_every_node_starts_ray_with_token_auth_and_the_token_of_this_machine(path):
    config = _load(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in config[key] if "ray start" in command]
        assert starts and all("RAY_AUTH_MODE=token ray start" in command for command in starts), key
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=[path.name for path in LAUNCHER_CONFIGS])
def test_the_containers_have_shared_memory_and_the_datasets(path):
    options = " ".join(_load(path)["docker"]["run_options"])
    assert re.search(r"--shm-size=\d+g", options)
    assert "--volume /data:/data" in options


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=[path.name for path in LAUNCHER_CONFIGS])
def test_the_documented_submit_command_sets_shared_checkpoint_storage(path):
    header = path.read_text().split("\ncluster_name:")[0]
    assert re.search(r"--set tracking\.storage_path=(s3|gs)://|--set tracking\.storage_path=/mnt/", header)
    assert "export RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token" in header
