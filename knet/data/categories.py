"""Dataset category ids <-> contiguous training ids (things first, then stuff)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from knet.data.errors import DataError


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
        cls, categories: Iterable[Mapping[str, Any]], *, default_isthing: bool = True
    ) -> CategoryTable:
        """From a COCO ``categories`` list (``isthing`` missing -> ``default_isthing``)."""
        return cls(
            Category(int(c["id"]), str(c.get("name", c["id"])), bool(c.get("isthing", default_isthing)))
            for c in categories
        )

    def to_dict(self) -> list[dict[str, Any]]:
        """COCO-style list in contiguous order (JSON-ready)."""
        return [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in self.categories]

    @classmethod
    def from_dict(cls, data: Iterable[Mapping[str, Any]]) -> CategoryTable:
        return cls.from_coco(data)
