"""The knet-platform image, checked without building it: the pins of cluster/Dockerfile are pyproject's,
every documented `docker build` tags what it builds (``<version>-cpu`` / ``<version>-cu130``), and every
``image:`` in cluster/ and every knet-platform tag in the docs is one of those builds.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).absolute().parents[2]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCS = [CLUSTER / "README.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Images the project does not build: pinned to a release, never :latest.
THIRD_PARTY_IMAGES = {"postgres:17.6"}

# pyproject.toml read with regexes: tomllib is Python 3.11+, and the project supports 3.10
PYPROJECT = (ROOT / "pyproject.toml").read_text()
PROJECT_VERSION = re.search(r'^version = "([^"]+)"$', PYPROJECT, re.M).group(1)
REQUIRES_PYTHON = re.search(r'^requires-python = ">=([\d.]+)"$', PYPROJECT, re.M).group(1)


def _pin(name: str) -> str:
    """The exact version pyproject pins ``name`` to (``"ray[default,...]==2.60.0"`` -> ``2.60.0``)."""
    (version,) = set(re.findall(rf'"{name}(?:\[[^\]]*\])?==([\w.]+)"', PYPROJECT))
    return version


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def _documented_builds() -> dict[str, str]:
    """tag -> TORCH_CUDA of every `docker build` command in the Dockerfile's header and the docs."""
    builds = {}
    for path in [DOCKERFILE, *DOCS]:
        text = path.read_text().replace("\\\n", " ")
        for line in re.findall(r"docker build [^\n`]*", text):
            words = shlex.split(line.lstrip("# "))
            options = dict(zip(words, words[1:]))
            build_args = dict(w.split("=", 1) for k, w in zip(words, words[1:]) if k == "--build-arg")
            assert options.get("-f") == "cluster/Dockerfile", f"{path.name}: {line}"
            builds[options["-t"]] = build_args.get("TORCH_CUDA", _dockerfile_args()["TORCH_CUDA"])
    return builds


def _images(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["image"]} if isinstance(node.get("image"), str) else set()
        return found.union(*(_images(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_images(item) for item in node))
    return set()


def _shipped_images() -> dict[str, set[str]]:
    """file name -> the images its Kubernetes objects and launcher `docker:` section run."""
    return {
        path.name: set().union(*(_images(document) for document in yaml.safe_load_all(path.read_text())))
        for path in sorted(CLUSTER.glob("*.yaml"))
    }


def test_the_dockerfile_pins_torch_and_torchvision_as_pyproject_does():
    args = _dockerfile_args()
    assert args["TORCH_VERSION"] == _pin("torch")
    assert args["TORCHVISION_VERSION"] == _pin("torchvision")
    assert args["TORCH_CUDA"] == "cpu"  # the default build is the CPU one


def test_ray_and_mlflow_come_from_pyproject_and_the_build_checks_what_it_installed():
    text = DOCKERFILE.read_text()
    assert re.search(
        r'pip install [^\n]*"\.\[platform\]"', text
    )  # ray==2.60.0 and mlflow>=3.5,<4 from pyproject
    assert '"torch==${TORCH_VERSION}"' in text and '"torchvision==${TORCHVISION_VERSION}"' in text
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert "assert built == '${TORCH_CUDA}'" in text  # a cu130 tag cannot hold a CPU torch


def test_the_python_of_the_image_satisfies_requires_python():
    python = tuple(int(part) for part in _dockerfile_args()["PYTHON_VERSION"].split("."))
    minimum = tuple(int(part) for part in REQUIRES_PYTHON.split("."))
    assert python >= minimum


def test_every_documented_build_tags_the_project_version_and_the_torch_build_it_holds():
    builds = _documented_builds()
    assert set(builds.values()) == {"cpu", "cu130"}, builds
    for tag, torch_cuda in builds.items():
        name, _, version = tag.rpartition(":")
        assert name.endswith("/knet-platform"), tag
        assert version == f"{PROJECT_VERSION}-{torch_cuda}", tag


def test_every_image_in_cluster_is_a_documented_build_or_a_pinned_third_party_image():
    built = set(_documented_builds())
    for file_name, images in _shipped_images().items():
        for image in images:
            assert image in built | THIRD_PARTY_IMAGES, f"{file_name}: {image} is built nowhere"
    for image in THIRD_PARTY_IMAGES:
        assert ":" in image and not image.endswith(":latest")


def test_gpu_configurations_run_the_cuda_build_and_mlflow_the_cpu_one():
    images = _shipped_images()
    for file_name in (
        "kuberay-raycluster.yaml",
        "kuberay-rayjob.yaml",
        "ray-cluster-aws.yaml",
        "ray-cluster-gcp.yaml",
    ):
        assert {image.rpartition("-")[2] for image in images[file_name]} == {"cu130"}, file_name
    assert {image.rpartition("-")[2] for image in images["mlflow.yaml"] if "knet-platform" in image} == {
        "cpu"
    }


def test_every_knet_platform_tag_in_the_docs_is_a_documented_build():
    built = {tag.rpartition(":")[2] for tag in _documented_builds()}
    for path in [DOCKERFILE, *DOCS, *sorted(CLUSTER.glob("*.yaml"))]:
        for tag in re.findall(r"knet-platform:([\w.-]+)", path.read_text()):
            assert tag in built, f"{path.name} names knet-platform:{tag}, which no documented build makes"


def test_kuberay_clusters_run_the_ray_version_pyproject_pins():
    ray = _pin("ray")
    versions = []
    for path in sorted(CLUSTER.glob("kuberay-*.yaml")):
        versions += re.findall(r'rayVersion:\s*"?([\w.]+)"?', path.read_text())
    assert versions and set(versions) == {ray}
