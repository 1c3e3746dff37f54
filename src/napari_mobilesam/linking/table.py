"""The result of linking: one row per object per plane, parents, and the export formats."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..atomic import write_text_atomic

__all__ = ["LinkTable"]


@dataclass(frozen=True)
class LinkTable:
    """Linked objects (axis ``"z"``) or tracks (``"t"``, ``"zt"``), one row per object per plane.

    Rows are sorted by ``(id, index)``. For ``axis="zt"`` a row is one 3D object at
    one time point: ``index`` is t, ``area`` its voxels, ``centroid`` (z, y, x).

    Attributes
    ----------
    axis : {"z", "t", "zt"}
        What was linked.
    id : ndarray of uint32, shape (m,)
        Global object / track id (1, 2, ... in order of first appearance).
    index : ndarray of int64, shape (m,)
        Plane index along the linked axis (z, or t).
    area : ndarray of int64, shape (m,)
        Pixels (voxels for ``"zt"``) of the object in that plane.
    predicted_iou : ndarray of float64, shape (m,)
        The score given with the plane (see :meth:`Linker.push`), NaN where none.
    centroid : ndarray of float64, shape (m, 2) or (m, 3)
        Mean pixel coordinate, (y, x) for 2D planes, (z, y, x) for ``"zt"``.
    parents : dict of int to int
        ``{child id: parent id}`` for every division (axis ``"t"`` / ``"zt"``).
    """

    axis: str
    id: np.ndarray
    index: np.ndarray
    area: np.ndarray
    predicted_iou: np.ndarray
    centroid: np.ndarray
    parents: dict[int, int] = field(default_factory=dict)

    @property
    def index_name(self) -> str:
        """Name of the linked axis in tables: ``"z"`` or ``"t"``."""
        return "z" if self.axis == "z" else "t"

    @property
    def id_name(self) -> str:
        """``"object_id"`` for 3D objects (axis ``"z"``), else ``"track_id"``."""
        return "object_id" if self.axis == "z" else "track_id"

    def objects(self) -> dict[str, np.ndarray]:
        """One row per object: its id, first and last plane, parent (0: none), planes present.

        Returns
        -------
        dict of str to ndarray, each of shape (n_objects,)
            ``"id"`` (uint32, ascending), ``"first"``, ``"last"``, ``"parent"`` (uint32),
            ``"planes"`` (planes in which the object has pixels; fewer than
            ``last - first + 1`` where it was bridged over a missed plane).
        """
        ids, start, counts = np.unique(self.id, return_index=True, return_counts=True)
        last = self.index[start + counts - 1]
        parent = np.array([self.parents.get(int(i), 0) for i in ids], dtype=np.uint32)
        return {
            "id": ids.astype(np.uint32),
            "first": self.index[start].copy(),
            "last": last,
            "parent": parent,
            "planes": counts.astype(np.int64),
        }

    def tracks_data(self) -> np.ndarray:
        """napari Tracks layer data: rows ``(track_id, t, y, x)`` (``(track_id, t, z, y, x)``
        for ``"zt"``), float64, sorted by track then t. For axis ``"z"`` the plane index
        takes the place of t. Pass with ``graph=table.graph()``.
        """
        return np.column_stack([self.id.astype(np.float64), self.index, self.centroid])

    def graph(self) -> dict[int, list[int]]:
        """napari Tracks graph: ``{child track id: [parent track id]}`` for each division."""
        return {child: [parent] for child, parent in sorted(self.parents.items())}

    def to_csv(self) -> str:
        """The table as CSV text, one row per object per plane.

        Columns: ``track_id`` (``object_id`` for axis ``"z"``), ``t`` (``z``), the
        centroid (``z,`` for ``"zt"``, then ``y,x``), ``area``, ``predicted_iou``
        (empty where none), ``parent_track_id`` (0: none), ``first``, ``last``
        (the object's first and last plane). The first four columns are what napari's
        Tracks layer and most tracking tools read; ``parent_track_id`` carries the
        lineage.
        """
        objs = self.objects()
        pos = np.searchsorted(objs["id"], self.id)
        coords = ["z", "y", "x"] if self.centroid.shape[1] == 3 else ["y", "x"]
        head = [self.id_name, self.index_name, *coords, "area", "predicted_iou"]
        head += ["parent_" + self.id_name, "first", "last"]
        buf = io.StringIO()
        buf.write(",".join(head) + "\n")
        for k in range(len(self.id)):
            score = self.predicted_iou[k]
            row = [str(int(self.id[k])), str(int(self.index[k]))]
            row += [f"{v:.3f}" for v in self.centroid[k]]
            row += [str(int(self.area[k])), "" if math.isnan(score) else f"{score:.6g}"]
            o = pos[k]
            row += [str(int(objs["parent"][o])), str(int(objs["first"][o]))]
            row.append(str(int(objs["last"][o])))
            buf.write(",".join(row) + "\n")
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_csv` to ``path`` atomically (a temporary renamed onto it)."""
        write_text_atomic(path, self.to_csv())
