"""Object geometry of the synthetic cells: ellipses / ellipsoids and their label image.

A cell is an ellipse in (y, x), optionally with a z extent (an ellipsoid whose z axis
is the stack axis). Its normalised distance at a pixel is

``d = (u / a_long) ** 2 + (v / a_short) ** 2 (+ (dz / a_z) ** 2)``

with ``(u, v)`` the pixel's offset from the centre rotated by the cell's angle; the
cell covers ``d <= 1``. Where cells overlap, a pixel goes to the cell with the smaller
``d``, so neighbours *touch* along a shared boundary and never overlap, and each cell
keeps only its largest connected part (a sliver cut off by a neighbour goes to the
background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

__all__ = ["Cell", "paint", "place_cells", "random_cell"]


@dataclass(frozen=True)
class Cell:
    """One synthetic cell.

    Attributes
    ----------
    center : tuple of float
        (y, x) or (z, y, x) in pixels.
    axes : tuple of float
        Semi-axes (long, short) in pixels, or (long, short, z) for a cell with a z extent.
    angle : float
        Rotation of the long axis from the y axis, radians.
    brightness : float
        Relative intensity (about 1).
    texture : float
        Amplitude of the cell's intensity texture (0 = flat).
    """

    center: tuple[float, ...]
    axes: tuple[float, ...]
    angle: float
    brightness: float = 1.0
    texture: float = 0.2

    @property
    def radius(self) -> float:
        """Radius of the circle with the cell's in-plane area."""
        return math.sqrt(self.axes[0] * self.axes[1])


def random_cell(
    rng: np.random.Generator,
    center: tuple[float, ...],
    radius: tuple[float, float],
    elongated: float,
    z_radius: tuple[float, float] | None = None,
) -> Cell:
    """A random cell at ``center`` with an in-plane radius drawn log-uniformly from ``radius``.

    A fraction ``elongated`` of cells get an aspect ratio of 1.8-3.2, the others 1.0-1.35.
    """
    r = math.exp(rng.uniform(math.log(radius[0]), math.log(radius[1])))
    aspect = rng.uniform(1.8, 3.2) if rng.random() < elongated else rng.uniform(1.0, 1.35)
    axes: tuple[float, ...] = (r * math.sqrt(aspect), r / math.sqrt(aspect))
    if z_radius is not None:
        axes = (*axes, rng.uniform(*z_radius))
    return Cell(
        center=tuple(float(c) for c in center),
        axes=axes,
        angle=float(rng.uniform(0, math.pi)),
        brightness=float(rng.lognormal(0.0, 0.3)),
        texture=float(rng.uniform(0.05, 0.3)),
    )


def _window(cell: Cell, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The bounding box of ``cell`` clipped to ``shape`` (None if outside)."""
    reach = max(cell.axes[0], cell.axes[1]) + 1
    spans = [reach, reach]
    if len(shape) == 3:
        spans = [cell.axes[2] + 1, *spans]
    out = []
    for c, s, n in zip(cell.center, spans, shape, strict=True):
        lo, hi = max(0, math.floor(c - s)), min(n, math.ceil(c + s) + 1)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return tuple(out)


def distance(cell: Cell, window: tuple[slice, ...]) -> np.ndarray:
    """Normalised distance ``d`` of ``cell`` over ``window`` (float32, window's shape)."""
    grids = np.ogrid[window]
    dy = grids[-2] - cell.center[-2]
    dx = grids[-1] - cell.center[-1]
    cos, sin = math.cos(cell.angle), math.sin(cell.angle)
    u = dy * cos + dx * sin
    v = -dy * sin + dx * cos
    d = (u / cell.axes[0]) ** 2 + (v / cell.axes[1]) ** 2
    if len(window) == 3:
        d = d + ((grids[0] - cell.center[0]) / cell.axes[2]) ** 2
    return d.astype(np.float32)


def paint(
    cells: list[Cell], shape: tuple[int, ...], ids: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The label image of ``cells`` and each pixel's normalised distance to its cell.

    Parameters
    ----------
    cells : list of Cell
    shape : (Y, X) or (Z, Y, X)
    ids : list of int, optional
        The label of each cell (default 1..N); 0 is not allowed.

    Returns
    -------
    labels : uint32 array of ``shape``
        0 = background; touching cells share a boundary, never a pixel.
    dist : float32 array of ``shape``
        ``d`` of the pixel's cell (inf on the background).
    """
    ids = list(range(1, len(cells) + 1)) if ids is None else list(ids)
    labels = np.zeros(shape, np.uint32)
    best = np.full(shape, np.inf, np.float32)
    for cell, i in zip(cells, ids, strict=True):
        win = _window(cell, shape)
        if win is None:
            continue
        d = distance(cell, win)
        take = (d <= 1.0) & (d < best[win])
        labels[win][take] = i
        best[win][take] = d[take]
    _keep_largest_parts(labels, best)
    return labels, best


def _keep_largest_parts(labels: np.ndarray, best: np.ndarray) -> None:
    """Give every id only its largest connected component (in place)."""
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        own = labels[sl] == i
        parts, n = ndimage.label(own)
        if n <= 1:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        drop = own & (parts != 1 + int(np.argmax(sizes)))
        labels[sl][drop] = 0
        best[sl][drop] = np.inf


def place_cells(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    *,
    n_cells: int | None,
    coverage: float,
    radius: tuple[float, float],
    elongated: float,
    clustered: float,
    z_radius: tuple[float, float] | None = None,
    max_overlap: float = 0.2,
    attempts: int = 40,
) -> list[Cell]:
    """Random non-overlapping (but possibly touching) cells filling ``shape``.

    Cells are proposed one by one, at a uniform position or, with probability
    ``clustered``, just beside an accepted cell (so that they touch). A proposal is
    accepted when at most ``max_overlap`` of its own area and of each neighbour's
    area falls inside the other; the overlap is later split along the boundary of
    equal normalised distance. Placement stops at ``n_cells`` cells or when the
    cells cover ``coverage`` of the image (when ``n_cells`` is None), or after
    ``attempts`` consecutive rejected proposals.
    """
    cells: list[Cell] = []
    labels = np.zeros(shape, np.uint32)
    sizes = [0]  # painted pixels per id
    covered, total, misses = 0, math.prod(shape), 0
    while misses < attempts:
        if n_cells is not None and len(cells) >= n_cells:
            break
        if n_cells is None and covered >= coverage * total:
            break
        center = _proposal_center(rng, shape, cells, clustered)
        cell = random_cell(rng, center, radius, elongated, z_radius)
        win = _window(cell, shape)
        if win is None:
            misses += 1
            continue
        inside = distance(cell, win) <= 1.0
        area = int(inside.sum())
        under = labels[win][inside]
        if area < 8 or not _overlap_ok(under, area, sizes, max_overlap):
            misses += 1
            continue
        free = inside & (labels[win] == 0)
        labels[win][free] = len(cells) + 1
        cells.append(cell)
        sizes.append(int(free.sum()))
        covered += sizes[-1]
        misses = 0
    return cells


def _proposal_center(
    rng: np.random.Generator, shape: tuple[int, ...], cells: list[Cell], clustered: float
) -> tuple[float, ...]:
    if cells and rng.random() < clustered:
        near = cells[rng.integers(len(cells))]
        theta = rng.uniform(0, 2 * math.pi)
        step = near.radius * rng.uniform(1.6, 2.4)
        yx = (near.center[-2] + step * math.sin(theta), near.center[-1] + step * math.cos(theta))
        if len(shape) == 3:
            return (near.center[0] + rng.normal(0, 1.0), *yx)
        return yx
    return tuple(rng.uniform(0, n - 1) for n in shape)


def _overlap_ok(under: np.ndarray, area: int, sizes: list[int], max_overlap: float) -> bool:
    taken = under[under > 0]
    if taken.size > max_overlap * area:
        return False
    if taken.size == 0:
        return True
    ids, counts = np.unique(taken, return_counts=True)
    return bool(np.all(counts <= max_overlap * np.asarray(sizes)[ids]))


def moved(cell: Cell, center: tuple[float, ...], angle: float) -> Cell:
    """``cell`` at a new centre and angle."""
    return replace(cell, center=tuple(float(c) for c in center), angle=float(angle))
