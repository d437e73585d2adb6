"""``knet import-weights``: a published K-Net checkpoint as a registered model version.

The checkpoint's tensors are mapped onto our model by ``knet.weights.load_official`` (which refuses a
checkpoint that does not fit, naming the keys); the result is written as a knet model bundle with the
class names and the test-time transforms the weights were published with, logged in an MLflow run of
the experiment ``NAME`` and registered as a new version of the model ``NAME``, tagged with where it
came from. ``knet predict`` / ``knet eval --model models:/NAME@champion`` then read it like a trained
model. An imported version has no metric yet, so it takes the alias only when no version holds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from knet_platform.errors import KnetUserError
from knet_platform.experiment.home import knet_home
from knet_platform.knet_adapter import (
    CategoryTable,
    KNetConfig,
    TransformConfig,
    build_model,
    known_categories,
    load_official,
    write_bundle,
)
from knet_platform.tracking.registry import RegisteredModel, register_unscored
from knet_platform.tracking.runs import TrackingTarget, check_tracking_reachable, create_run, end_run
from mlflow.tracking import MlflowClient

FORMATS = ("official-knet", "mmseg-knet")
CLASS_LISTS = ("coco", "ade20k")
ALIAS = "champion"  # the alias trained models are registered under by default (tracking.alias)
# The test-time resize the published models were evaluated with (short side, long-side cap).
COCO_TRANSFORMS = TransformConfig(test_short_side=800, test_max_size=1333)
ADE20K_TRANSFORMS = TransformConfig(
    train_short_sides=[512], max_size=2048, test_short_side=512, test_max_size=2048
)
TAGS = ("knet.imported_from", "knet.import_format", "knet.import_sha256", "knet.task")


class ImportWeightsError(KnetUserError, ValueError):
    """Options or a class list that do not fit the checkpoint being imported."""


@dataclass(frozen=True)
class ImportedWeights:
    """What ``import_weights`` registered: the version, the checkpoint's digest and the model config."""

    registered: RegisteredModel
    sha256: str
    config: KNetConfig


def import_weights(
    checkpoint: Path, *, format: str, task: str, name: str, classes: str | None, tracking_uri: str
) -> ImportedWeights:
    """Map ``checkpoint`` onto K-Net and register it as a new version of ``name`` (see the module)."""
    if not checkpoint.is_file():
        raise ImportWeightsError(f"checkpoint {checkpoint} does not exist")
    if not name.strip() or any(c in name for c in "/@:"):
        raise ImportWeightsError(
            f"--name {name!r}: a model name must be non-empty without '/', '@' or ':' (models:/NAME@ALIAS)"
        )
    categories = class_list(classes, format=format, task=task)
    things = categories.num_thing_classes if task == "panoptic" else None
    config, state = load_official(checkpoint, format=format, task=task, num_thing_classes=things)
    _check_classes(config, categories, classes or _default_classes(format))
    digest = sha256_of(checkpoint)
    tags = {
        "knet.imported_from": str(checkpoint.resolve()),
        "knet.import_format": format,
        "knet.import_sha256": digest,
        "knet.task": task,
    }
    check_tracking_reachable(tracking_uri)  # creates a local store; a server must answer
    target = _target(tracking_uri, name)
    run_id = create_run(target, f"import-{checkpoint.stem}", tags=tags)
    try:
        with tempfile.TemporaryDirectory(prefix="knet-import-") as scratch:
            model = build_model(config)
            model.load_state_dict(state)
            ade20k = format == "mmseg-knet"
            bundle = write_bundle(
                Path(scratch) / "bundle",
                model,
                config,
                categories,
                ADE20K_TRANSFORMS if ade20k else COCO_TRANSFORMS,
                reduce_zero_label=ade20k
                and classes in (None, "ade20k"),  # ADE20K label files: 0 = unlabelled
            )
            registered = register_unscored(
                bundle,
                tracking_uri=tracking_uri,
                run_id=run_id,
                registered_model=name,
                alias=ALIAS,
                tags=tags,
            )
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    end_run(tracking_uri, run_id, "FINISHED")
    return ImportedWeights(registered=registered, sha256=digest, config=config)


def _default_classes(format: str) -> str:
    return "ade20k" if format == "mmseg-knet" else "coco"


def class_list(classes: str | None, *, format: str, task: str) -> CategoryTable:
    """``coco`` (COCO panoptic's 80 + 53, or instance's 80), ``ade20k`` (150) or a JSON file holding a
    COCO ``categories`` list (``[{"id", "name", "isthing"}]``, or an object with that key); None: the
    list the format's published models were trained on."""
    if format not in FORMATS:
        raise ImportWeightsError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    classes = classes or _default_classes(format)
    if classes == "coco":
        if task == "semantic":
            raise ImportWeightsError(
                "--classes coco is for panoptic/instance models; semantic K-Nets use ade20k"
            )
        return known_categories(f"coco-{task}")
    if classes == "ade20k":
        if task != "semantic":
            raise ImportWeightsError(f"--classes ade20k is the semantic models' list, not {task}'s: use coco")
        return known_categories("ade20k")
    return _class_file(Path(classes), task)


def _class_file(path: Path, task: str) -> CategoryTable:
    if not path.is_file():
        raise ImportWeightsError(
            f"--classes {path}: not {' or '.join(CLASS_LISTS)} and no such file (a JSON COCO categories list)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ImportWeightsError(f"--classes {path} is not a JSON file: {error}") from None
    entries = data.get("categories") if isinstance(data, dict) else data
    table = CategoryTable.from_coco(entries, default_isthing=task != "semantic", file=path)
    if task == "semantic":  # as the semantic reader: every class is a stuff kernel
        table = CategoryTable(dataclasses.replace(c, isthing=False) for c in table.categories)
    return table


def _check_classes(config: KNetConfig, categories: CategoryTable, classes: str) -> None:
    model = (config.num_thing_classes, config.num_stuff_classes)
    listed = (categories.num_thing_classes, categories.num_stuff_classes)
    if model == listed:
        return
    hint = "pass the class list it was trained with (a JSON COCO categories list in the classifier's order)"
    if config.task == "panoptic" and model[1] == 0:
        hint = "its classifier has no stuff rows: is it an instance checkpoint (--task instance)?"
    elif config.task == "instance" and sum(model) == sum(listed) + 53 == 133:
        hint = "133 classes are COCO panoptic's: is it a panoptic checkpoint (--task panoptic)?"
    raise ImportWeightsError(
        f"the checkpoint's {config.task} model has {model[0]} thing + {model[1]} stuff classes but "
        f"--classes {classes} lists {listed[0]} + {listed[1]}: {hint}"
    )


def _target(tracking_uri: str, name: str) -> TrackingTarget:
    """Where the import is logged: the MLflow experiment ``name`` (an existing one keeps its artifact
    location; a new one puts its artifacts under $KNET_HOME/mlartifacts, as ``knet run`` does)."""
    remote = tracking_uri.startswith(("http://", "https://"))
    exists = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(name) is not None
    location = None if remote or exists else (knet_home() / "mlartifacts").as_uri()
    return TrackingTarget(
        tracking_uri=tracking_uri,
        artifact_location=location,
        experiment_name=name,
        registered_model=name,
        alias=ALIAS,
        log_checkpoints="none",
        storage_path=str(knet_home() / "ray_results"),
    )


def sha256_of(path: Path) -> str:
    """The file's SHA-256 (hex), read in chunks: checkpoints are hundreds of MB."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def summary(imported: ImportedWeights) -> str:
    """What was imported and registered, for the command's output."""
    config, registered = imported.config, imported.registered
    if config.task == "semantic":
        shape = f"{config.decode_head} head, {config.channels} channels, {config.num_classes} classes"
    else:
        shape = (
            f"{config.num_proposals} proposals, {config.num_thing_classes} things + "
            f"{config.num_stuff_classes} stuff"
        )
    champion = "yes" if registered.is_champion else "no"
    return (
        f"imported a {config.task} K-Net ({config.backbone.name}, {config.num_stages} stage{'s' * (config.num_stages != 1)}, {shape}); "
        f"sha256 {imported.sha256}\n"
        f"registered {registered.model_uri}; {registered.alias_uri}: {champion} ({registered.reason})"
    )
