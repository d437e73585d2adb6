"""The Kubernetes manifests in cluster/, checked without a cluster: the KubeRay resources against the
KubeRay v1 CRD schemas (copies in ``kuberay_crds/``, source revision in its README), the pod layout a
training run needs (data on the head, ``/dev/shm`` and GPU scheduling on the workers, no training on the
head, checkpoints on S3), no literal secret anywhere, and the MLflow Service the Ray pods use is the one
``cluster/mlflow.yaml`` defines, with a Host header MLflow 3 accepts.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).absolute().parents[2]
CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).absolute().parent / "kuberay_crds"
SCHEMA_FILES = {"RayCluster": "rayclusters.v1.json", "RayJob": "rayjobs.v1.json"}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every Kubernetes object in cluster/*.yaml (launcher configs have no kind)."""
    found = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and "kind" in document and "apiVersion" in document:
                found.append((path.name, document))
    return found


MANIFESTS = _manifests()


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in MANIFESTS if document["kind"] == kind]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, RayCluster spec) of the RayCluster and of the cluster inside each RayJob."""
    specs = [(f"RayCluster/{c['metadata']['name']}", c["spec"]) for c in _of_kind("RayCluster")]
    specs += [(f"RayJob/{j['metadata']['name']}", j["spec"]["rayClusterSpec"]) for j in _of_kind("RayJob")]
    return specs


CLUSTER_SPECS = _cluster_specs()


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as ``kubectl apply`` (strict field validation) does: a
    misspelt key is an error there, while plain JSON Schema would accept it."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def _validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((CRDS / SCHEMA_FILES[kind]).read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _errors(kind: str, document: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in _validator(kind).iter_errors(document)
    ]


def _pod_specs(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def test_the_shipped_files_hold_a_raycluster_a_rayjob_and_the_mlflow_objects():
    kinds = sorted(document["kind"] for _, document in MANIFESTS)
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == 1, kinds
    assert {"Deployment", "Service", "StatefulSet"} <= set(kinds), kinds


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_kuberay_manifests_validate_against_the_v1_crd_schema(kind):
    documents = _of_kind(kind)
    assert documents
    for document in documents:
        assert document["apiVersion"] == "ray.io/v1"
        assert _errors(kind, document) == []


def test_the_crd_check_refuses_a_misspelt_field_and_a_wrong_type():
    # the check above is only worth something if it can fail
    cluster = copy.deepcopy(_of_kind("RayCluster")[0])
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = cluster["spec"]["headGroupSpec"].pop("rayStartParams")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    errors = _errors("RayCluster", cluster)
    assert any("rayStartParam" in error for error in errors), errors
    assert any(error.startswith("spec.workerGroupSpecs.0.maxReplicas") for error in errors), errors


def test_deployment_and_statefulset_pod_templates_validate_as_kubernetes_pod_templates():
    # The CRD embeds Kubernetes' PodTemplateSpec schema: reuse it for the MLflow and PostgreSQL pods.
    schema = json.loads((CRDS / SCHEMA_FILES["RayCluster"]).read_text())
    pod_template = schema["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    validator = jsonschema.Draft7Validator(_strict(pod_template))
    for kind in ("Deployment", "StatefulSet"):
        for document in _of_kind(kind):
            template = document["spec"]["template"]
            assert [e.message for e in validator.iter_errors(template)] == [], document["metadata"]["name"]
            labels = template["metadata"]["labels"]
            assert document["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("name,spec", CLUSTER_SPECS, ids=[name for name, _ in CLUSTER_SPECS])
def test_the_head_runs_no_training(name, spec):
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


@pytest.mark.parametrize("name,spec", CLUSTER_SPECS, ids=[name for name, _ in CLUSTER_SPECS])
def test_the_head_mounts_the_data_volume_as_the_workers_do(name, spec):
    pods = dict(_pod_specs(spec))

    def data_mounts(pod: dict[str, Any]) -> set[tuple[str, str]]:
        claims = {
            volume["name"]: volume["persistentVolumeClaim"]["claimName"]
            for volume in pod.get("volumes", [])
            if "persistentVolumeClaim" in volume
        }
        return {
            (claims[mount["name"]], mount["mountPath"])
            for container in pod["containers"]
            for mount in container.get("volumeMounts", [])
            if mount["name"] in claims
        }

    head = data_mounts(pods.pop("head"))
    assert head, f"{name}: the head mounts no dataset volume"
    for group, pod in pods.items():
        assert data_mounts(pod) <= head, f"{name}: group {group} mounts data the head does not"


@pytest.mark.parametrize("name,spec", CLUSTER_SPECS, ids=[name for name, _ in CLUSTER_SPECS])
def test_every_worker_has_dev_shm_in_memory_for_the_dataloader_processes(name, spec):
    for group, pod in list(_pod_specs(spec))[1:]:
        memory_volumes = {
            v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"
        }
        for container in pod["containers"]:
            shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert shm and shm[0]["name"] in memory_volumes, f"{name}: {group}/{container['name']}"


@pytest.mark.parametrize("name,spec", CLUSTER_SPECS, ids=[name for name, _ in CLUSTER_SPECS])
def test_gpu_groups_tolerate_the_gpu_taint_and_select_gpu_nodes(name, spec):
    gpu_groups = 0
    for group, pod in _pod_specs(spec):
        if not any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in pod["containers"]):
            continue
        gpu_groups += 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{name}: {group}"
        assert pod.get("nodeSelector"), f"{name}: {group} has no nodeSelector"
    assert gpu_groups, f"{name}: no GPU worker group"


@pytest.mark.parametrize("name,spec", CLUSTER_SPECS, ids=[name for name, _ in CLUSTER_SPECS])
def test_every_ray_pod_reaches_mlflow_and_has_s3_credentials_from_a_secret(name, spec):
    for group, pod in _pod_specs(spec):
        for container in pod["containers"]:
            env = {item["name"]: item for item in container.get("env", [])}
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://"), f"{name}: {group}"
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env[key]["valueFrom"], f"{name}: {group} {key}"


def test_checkpoints_go_to_s3_in_the_rayjob_and_the_raycluster_example():
    (job,) = _of_kind("RayJob")
    assert re.search(r"--set tracking\.storage_path=s3://\S+", job["spec"]["entrypoint"])
    # a RayCluster has no entrypoint: its header gives the submit command
    header = (CLUSTER / "kuberay-raycluster.yaml").read_text().split("\napiVersion:")[0]
    assert re.search(r"ray job submit .*--set tracking\.storage_path=s3://\S+", header, re.S)


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL|API_KEY", re.I)
LITERAL_SECRETS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password in a URI": re.compile(r"://[^/\s:@]+:(?!\$\()[^@\s/]+@"),
    "a password assignment": re.compile(
        r"(password|passwd|secret|token)\w*\s*[=:]\s*['\"]?(?![$(])[\w+/=-]{6,}", re.I
    ),
}


def test_no_manifest_holds_a_literal_secret():
    for file_name, document in MANIFESTS:
        assert document["kind"] != "Secret", f"{file_name}: Secrets are created with kubectl, not shipped"
        for node in _walk(document):
            is_env = isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node)
            if is_env and SECRET_NAME.search(node["name"]):
                assert "value" not in node, f"{file_name}: env {node['name']} is literal"
                assert "secretKeyRef" in node["valueFrom"], f"{file_name}: env {node['name']}"
    for path in sorted(CLUSTER.iterdir()):
        text = path.read_text()
        for what, pattern in LITERAL_SECRETS.items():
            match = pattern.search(text)
            assert match is None, f"{path.name} holds {what}: {match and match.group(0)}"


def test_the_literal_secret_scan_catches_what_it_is_for():
    texts = {
        "an AWS access key id": "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        "a private key": "-----BEGIN OPENSSH PRIVATE KEY-----",
        "a password in a URI": "postgresql://mlflow:hunter22@postgres:5432/mlflow",
        "a password assignment": "export RAY_AUTH_TOKEN=0123456789abcdef",
    }
    for what, text in texts.items():
        assert LITERAL_SECRETS[what].search(text), what
    assert not LITERAL_SECRETS["a password in a URI"].search(
        "postgresql://mlflow:$(MLFLOW_DB_PASSWORD)@db:5432/x"
    )


def _service_references() -> set[tuple[str, str, int]]:
    """(service, namespace, port) of every in-cluster URL named in cluster/ (manifests and comments)."""
    pattern = re.compile(r"https?://([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)")
    return {
        (service, namespace, int(port))
        for path in sorted(CLUSTER.glob("*.yaml"))
        for service, namespace, port in pattern.findall(path.read_text())
    }


def test_the_mlflow_service_the_ray_pods_use_is_defined_and_serves_the_mlflow_pods():
    references = _service_references()
    assert ("mlflow", "mlflow", 5000) in references
    services = {
        (s["metadata"]["name"], s["metadata"].get("namespace", "default")): s for s in _of_kind("Service")
    }
    for service_name, namespace, port in references:
        service = services.get((service_name, namespace))
        assert service, f"{service_name}.{namespace}.svc is referenced and defined nowhere"
        (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
        pods = [
            d
            for d in _of_kind("Deployment") + _of_kind("StatefulSet")
            if d["metadata"].get("namespace") == namespace
            and service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {service_name} selects no pod"
        container_ports = {
            p["containerPort"]
            for d in pods
            for c in d["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        assert service_port.get("targetPort", port) in container_ports


def _mlflow_server_args() -> list[str]:
    (deployment,) = [d for d in _of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    return container["args"]


def test_mlflow_server_uses_postgresql_and_proxies_artifacts_to_s3():
    args = _mlflow_server_args()
    options = dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in args)
    assert options["--backend-store-uri"].startswith("postgresql://")
    assert "--serve-artifacts" in options
    assert options["--artifacts-destination"].startswith("s3://")
    assert "--default-artifact-root" not in options  # clients would write to their own disks


def test_mlflow_allows_the_host_header_of_every_in_cluster_reference():
    # MLflow 3 answers 403 "Invalid Host header" to a Host not in --allowed-hosts
    allowed = dict(arg.split("=", 1) for arg in _mlflow_server_args() if "=" in arg)["--allowed-hosts"].split(
        ","
    )
    for service, namespace, port in _service_references():
        if service == "mlflow":
            assert f"{service}.{namespace}.svc:{port}" in allowed
    assert "127.0.0.1:5000" in allowed and "localhost:5000" in allowed  # kubectl port-forward
