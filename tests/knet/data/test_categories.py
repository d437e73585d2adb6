"""CategoryTable: things first then stuff, contiguous ids and back."""

from __future__ import annotations

import pytest

from knet.data import Category, CategoryTable, DataError


def test_things_come_first_then_stuff_each_sorted_by_dataset_id() -> None:
    table = CategoryTable(
        [
            Category(92, "road", False),
            Category(5, "car", True),
            Category(1, "person", True),
            Category(40, "sky", False),
        ]
    )
    assert table.names == ["person", "car", "sky", "road"]
    assert (table.num_thing_classes, table.num_stuff_classes) == (2, 2)
    assert [table.to_contiguous(i) for i in (1, 5, 92, 40)] == [0, 1, 3, 2]
    assert [table.to_dataset_id(k) for k in range(4)] == [1, 5, 40, 92]
    assert CategoryTable.from_dict(table.to_dict()) == table


def test_unknown_ids_are_errors_naming_the_file() -> None:
    table = CategoryTable([Category(1, "a", True)])
    with pytest.raises(DataError, match="category id 7 in x.json"):
        table.to_contiguous(7, file="x.json")
    with pytest.raises(ValueError, match="out of range"):
        table.to_dataset_id(1)
    with pytest.raises(DataError, match="duplicate"):
        CategoryTable([Category(1, "a", True), Category(1, "b", False)])
