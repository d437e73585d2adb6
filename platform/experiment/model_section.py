"""The experiment YAML's ``model`` section: the keys it writes over the task's paper preset, built once
into a ``KNetConfig`` (errors name the model key), and ``model.init_from``, the one key that is not a
``KNetConfig`` field."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from knet_platform.experiment.building import ExperimentError, require
from knet_platform.knet_adapter import ConfigFieldError, KNetConfig, model_config_for_task, with_class_counts

if TYPE_CHECKING:
    from knet_platform.knet_adapter import CategoryTable

INIT_FROM = "init_from"  # the one model key that is not a KNetConfig field


@dataclass
class ModelSection:
    """The ``model`` section: the keys the YAML writes (over the task's paper preset) and the
    ``KNetConfig`` they build, made once when the experiment is built (:meth:`Experiment.from_dict`).
    Its class counts are placeholders until :meth:`for_categories` fills in the dataset's."""

    YAML_FORM: typing.ClassVar[str] = "model keys over the task's preset, e.g. {num_proposals: 100}"

    written: dict[str, Any] = field(default_factory=dict)
    config: KNetConfig | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSection:
        return cls(written=dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.written)

    @property
    def init_from(self) -> str | None:
        """``model.init_from``: the model whose weights start this run (a ``models:/`` or ``runs:/`` URI,
        a bundle or checkpoint folder); its class-specific layers start afresh when its classes differ."""
        return self.written.get(INIT_FROM)

    def with_init_from(self, source: str) -> ModelSection:
        """This section with ``init_from`` replaced (the driver ships the downloaded local folder)."""
        return ModelSection(written={**self.written, INIT_FROM: source}, config=self.config)

    def bind(self, task: str) -> KNetConfig:
        """Build (once) and return the section's config for ``task``; errors name the model key."""
        if self.config is None or self.config.task != task:
            section = dict(self.written)
            _check_init_from(section.pop(INIT_FROM, None))
            _check_model_key_names(section)
            if section.pop("task", task) != task:
                raise ExperimentError(
                    f"model.task={self.written['task']!r} differs from task={task!r}: remove model.task"
                )
            try:
                self.config = model_config_for_task(task, section)
            except ConfigFieldError as error:
                raise ExperimentError(f"model.{error.key}: {error.problem}") from None
            except (ValueError, TypeError) as error:
                raise ExperimentError(f"model: {error}") from None
        return self.config

    def for_categories(self, categories: CategoryTable) -> KNetConfig:
        """The model config with the dataset's class counts (a count the YAML gives must match)."""
        found = {
            "num_thing_classes": categories.num_thing_classes,
            "num_stuff_classes": categories.num_stuff_classes,
        }
        for key, count in found.items():
            written = self.written.get(key)
            if written is not None and written != count:
                raise ExperimentError(
                    f"model.{key}={written} but the dataset has {count}: remove model.{key} "
                    "(class counts come from the dataset's categories)"
                )
        assert self.config is not None, "ModelSection.bind runs when the experiment is built"
        return with_class_counts(self.config, categories)


def _check_init_from(value: Any) -> None:
    require(
        value is None or (isinstance(value, str) and value.strip() != ""),
        f"model.{INIT_FROM}",
        f"must be a model URI (models:/NAME@ALIAS, runs:/...) or a folder, got {value!r}",
    )


def _check_model_key_names(section: dict[str, Any]) -> None:
    """An unknown top-level model key, with a did-you-mean over the config fields and ``init_from``."""
    known = [f.name for f in dataclasses.fields(KNetConfig)] + [INIT_FROM]
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean 'model.{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise ExperimentError(f"model.{key}: is unknown; {hint}")
