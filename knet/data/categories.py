"""Dataset category ids <-> contiguous training ids (things first, then stuff)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knet.data.errors import DataError
from knet.data.io import require_entry, require_field


@dataclass(frozen=True)
class Category:
    """One dataset category: its id as written in the dataset files, name, thing or stuff."""

    id: int
    name: str
    isthing: bool


class CategoryTable:
    """Orders categories things first then stuff (each by dataset id) and maps ids both ways.

    Contiguous id ``k`` is ``categories[k]``; ``[0, T)`` are things, ``[T, T + S)`` stuff.
    """

    def __init__(self, categories: Iterable[Category]) -> None:
        cats = list(categories)
        if not cats:
            raise DataError("CategoryTable needs at least one category; the dataset lists none")
        ids = [c.id for c in cats]
        if len(set(ids)) != len(ids):
            raise DataError(f"duplicate category ids in the dataset: {sorted(ids)}")
        things = sorted((c for c in cats if c.isthing), key=lambda c: c.id)
        stuff = sorted((c for c in cats if not c.isthing), key=lambda c: c.id)
        self.categories: tuple[Category, ...] = tuple(things + stuff)
        self.num_thing_classes = len(things)
        self.num_stuff_classes = len(stuff)
        self._to_contiguous = {c.id: k for k, c in enumerate(self.categories)}

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    def __len__(self) -> int:
        return len(self.categories)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CategoryTable) and self.categories == other.categories

    def __repr__(self) -> str:
        return (
            f"CategoryTable(things={self.num_thing_classes}, stuff={self.num_stuff_classes}, "
            f"names={self.names})"
        )

    def __contains__(self, dataset_id: int) -> bool:
        return dataset_id in self._to_contiguous

    def to_contiguous(self, dataset_id: int, *, file: str = "") -> int:
        """Training id of a dataset category id; ``DataError`` naming ``file`` if unknown."""
        try:
            return self._to_contiguous[int(dataset_id)]
        except KeyError:
            where = f" in {file}" if file else ""
            raise DataError(
                f"category id {dataset_id}{where} is not in the category table "
                f"(known ids: {sorted(self._to_contiguous)})"
            ) from None

    def to_dataset_id(self, contiguous_id: int) -> int:
        """Dataset category id of a training id (for writing results in dataset ids)."""
        if not 0 <= contiguous_id < len(self.categories):
            raise ValueError(f"contiguous id {contiguous_id} is out of range [0, {len(self.categories)})")
        return self.categories[contiguous_id].id

    def is_thing(self, contiguous_id: int) -> bool:
        return contiguous_id < self.num_thing_classes

    @classmethod
    def from_coco(
        cls, categories: Any, *, default_isthing: bool = True, file: str | Path = "the categories list"
    ) -> CategoryTable:
        """From a COCO ``categories`` list (``isthing`` missing -> ``default_isthing``).

        Each entry needs an integer ``id``; ``name`` (string) and ``isthing`` (0/1 or boolean) are
        optional. A malformed entry is a ``DataError`` naming ``file``, the entry and the field, rather
        than a ``KeyError: 'id'`` from deep inside.
        """
        if not isinstance(categories, (list, tuple)):
            raise DataError(f"{file}: 'categories' must be a list, found {type(categories).__name__}")
        return cls(
            _coco_category(entry, default_isthing, file=file, where=f"categories[{index}]")
            for index, entry in enumerate(categories)
        )

    def to_dict(self) -> list[dict[str, Any]]:
        """COCO-style list in contiguous order (JSON-ready)."""
        return [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in self.categories]

    @classmethod
    def from_dict(cls, data: Iterable[Mapping[str, Any]]) -> CategoryTable:
        return cls.from_coco(data)


def _coco_category(entry: Any, default_isthing: bool, *, file: str | Path, where: str) -> Category:
    """One COCO ``categories`` entry -> ``Category``; ``DataError`` naming the entry and field."""
    entry = require_entry(entry, path=file, where=where)
    dataset_id = require_field(entry, "id", int, path=file, where=where)
    where = f"{where} (id {dataset_id})"
    name = require_field(entry, "name", str, path=file, where=where, optional=True)
    isthing = entry.get("isthing", default_isthing)
    if isthing not in (0, 1):  # True/False compare equal to 1/0
        raise DataError(f"{file}: {where} field 'isthing' must be 0 or 1, found {isthing!r}")
    return Category(dataset_id, str(dataset_id) if name is None else name, bool(isthing))
