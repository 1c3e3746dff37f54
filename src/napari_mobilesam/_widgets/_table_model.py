"""The object table dock's Qt table model: an object table's rows, sorted and filtered
with numpy, columns in review order (:mod:`._objects`)."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QAbstractTableModel, QModelIndex, Qt

from ..interactive.objects import empty_table


class ObjectModel(QAbstractTableModel):
    """The rows of an object table, sorted and filtered with numpy (any number of rows).

    ``order`` maps the view's rows to the table's rows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.table: dict[str, np.ndarray] = empty_table()
        self.names: list[str] = list(self.table)
        self.order = np.zeros(0, dtype=np.intp)
        self.sort_by: tuple[str, bool] = ("id", True)  # column name, ascending
        self.iou_below: float | None = None

    def set_table(self, table: dict[str, np.ndarray]) -> None:
        """Show a table; its columns in review order (id, plane, scores, area, ...)."""
        self.beginResetModel()
        self.table, self.names = table, sorted(table, key=_review_rank)
        self._arrange()
        self.endResetModel()

    def set_filter(self, iou_below: float | None) -> None:
        """Show only rows whose predicted IoU is below this (None: all rows)."""
        self.beginResetModel()
        self.iou_below = iou_below
        self._arrange()
        self.endResetModel()

    def sorted_rows(self) -> np.ndarray:
        """The table's rows in the chosen sort order (all of them: no filter)."""
        name, ascending = self.sort_by
        if name not in self.table:
            return np.arange(len(self.table["id"]))
        values = self.table[name].astype(np.float64)
        key = values if ascending else -values  # NaN (no score) last either way
        return np.argsort(key, kind="stable")

    def _arrange(self) -> None:
        rows = self.sorted_rows()
        if self.iou_below is not None:
            iou = self.table["predicted_iou"][rows]
            rows = rows[iou < self.iou_below]  # NaN: not a prediction, never doubtful
        self.order = rows

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:
        """Sort by a column (a header click), NaN last."""
        self.beginResetModel()
        if not 0 <= column < len(self.names):
            return
        self.sort_by = (self.names[column], order == Qt.SortOrder.AscendingOrder)
        self._arrange()
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: B008 (Qt names)
        return 0 if parent.isValid() else len(self.order)

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.names)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if role != Qt.ItemDataRole.DisplayRole or not index.isValid():
            return None
        value = self.table[self.names[index.column()]][self.order[index.row()]]
        if isinstance(value, np.floating):
            return "" if np.isnan(value) else f"{value:.4g}"
        return str(int(value))

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return self.names[section].replace("_", " ")
        return str(section + 1)

    def row(self, view_row: int) -> dict:
        """The table's values of a shown row."""
        k = int(self.order[view_row])
        return {name: col[k] for name, col in self.table.items()}


def _review_rank(name: str) -> int:
    prefixes = ("id", "plane_", "predicted_iou", "stability", "area", "mean_", "max_", "centroid")
    return next((i for i, p in enumerate(prefixes) if name.startswith(p)), len(prefixes))


def same_table(a: dict, b: dict) -> bool:
    """Whether two object tables (column name -> (N,) array) hold the same values."""
    if a.keys() != b.keys():
        return False
    return all(
        np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k], equal_nan=_floats(a[k]))
        for k in a
    )


def _floats(column) -> bool:
    return np.asarray(column).dtype.kind in "fc"
