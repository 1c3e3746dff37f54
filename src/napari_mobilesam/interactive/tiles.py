"""Overlapping tiles over a large plane: where each tile lies and which tile answers a prompt.

A plane whose longer side exceeds a threshold (2048 px by default) is not shrunk to the
model's 1024 px input as a whole, which would make a 10 px nucleus of a 10k px mosaic one
pixel wide; it is cut into overlapping square tiles of about the model's input size, each
embedded on its own (:mod:`.tiled`). Pure geometry here, no model:

- along each axis, tiles of ``tile_size`` start evenly spaced from 0 to ``L - tile_size``,
  as few as give at least ``overlap`` pixels between neighbours;
- every pixel is *owned* by one tile: the boundary between two neighbours lies in the
  middle of their overlap, so a pixel's owner is the tile in which it lies farthest from
  a cut edge (the most central one);
- a prompt is answered from the owner of its centre when that tile contains it whole,
  else from the containing tile where it lies most centrally, else from every tile it
  crosses, stitched by ownership.

Coordinates are napari's: (row, col) pixels of the plane, windows ``(r0, c0, r1, c1)``
with exclusive ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..validation import check_int

__all__ = ["DEFAULT_TILE_OVERLAP", "DEFAULT_TILE_SIZE", "DEFAULT_TILE_THRESHOLD", "TileGrid"]

#: longer side (px) above which a plane is tiled
DEFAULT_TILE_THRESHOLD = 2048
#: side of a square tile (px): the model's input size
DEFAULT_TILE_SIZE = 1024
#: least overlap between neighbouring tiles (px); boxes up to this size always fit a tile
DEFAULT_TILE_OVERLAP = 256


def _starts(length: int, size: int, overlap: int) -> tuple[int, ...]:
    """Tile starts along one axis: evenly spaced, at least ``overlap`` apart from the next
    tile's end, the first at 0 and the last at ``length - size``."""
    if length <= size:
        return (0,)
    step = size - overlap
    n = math.ceil((length - size) / step) + 1
    return tuple(round(float(s)) for s in np.linspace(0, length - size, n))


def _cuts(starts: tuple[int, ...], size: int, length: int) -> tuple[int, ...]:
    """Ownership boundaries along one axis: 0, the middle of each overlap, ``length``."""
    ends = [min(s + size, length) for s in starts]
    middles = [(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)]
    return (0, *middles, length)


@dataclass(frozen=True)
class TileGrid:
    """Overlapping square tiles covering an (H, W) plane.

    Parameters
    ----------
    shape_hw : (int, int)
        (H, W) of the plane.
    tile_size : int
        Side of a tile in pixels (a tile is smaller only where the plane is).
    overlap : int
        Least overlap between neighbouring tiles, ``0 <= overlap < tile_size``.

    Notes
    -----
    Tiles are numbered in C order over (tile row, tile column). Windows are
    ``(r0, c0, r1, c1)`` plane pixels with exclusive ends.
    """

    shape_hw: tuple[int, int]
    tile_size: int = DEFAULT_TILE_SIZE
    overlap: int = DEFAULT_TILE_OVERLAP
    _rows: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _cols: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.shape_hw, (tuple, list)) or len(self.shape_hw) != 2:
            raise ValueError(f"shape_hw must be (H, W), got {self.shape_hw!r}")
        h, w = (check_int(s, "shape_hw", minimum=1) for s in self.shape_hw)
        size = check_int(self.tile_size, "tile_size", minimum=16)
        overlap = check_int(self.overlap, "overlap", minimum=0)
        if overlap >= size:
            raise ValueError(
                f"overlap must be smaller than tile_size ({size}), got {overlap}: tiles "
                "would never advance"
            )
        object.__setattr__(self, "shape_hw", (h, w))
        object.__setattr__(self, "tile_size", size)
        object.__setattr__(self, "overlap", overlap)
        object.__setattr__(self, "_rows", _starts(h, size, overlap))
        object.__setattr__(self, "_cols", _starts(w, size, overlap))

    # -- the tiles ------------------------------------------------------------------------

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(tile rows, tile columns)."""
        return len(self._rows), len(self._cols)

    def __len__(self) -> int:
        return len(self._rows) * len(self._cols)

    def window(self, tile: int) -> tuple[int, int, int, int]:
        """``(r0, c0, r1, c1)`` of tile number ``tile``."""
        tile = check_int(tile, "tile", minimum=0)
        if tile >= len(self):
            raise ValueError(f"tile must be below the number of tiles ({len(self)}), got {tile}")
        i, j = divmod(tile, len(self._cols))
        h, w = self.shape_hw
        r0, c0 = self._rows[i], self._cols[j]
        return r0, c0, min(r0 + self.tile_size, h), min(c0 + self.tile_size, w)

    def windows(self) -> list[tuple[int, int, int, int]]:
        """Every tile's window, in tile order."""
        return [self.window(t) for t in range(len(self))]

    def owned(self, tile: int) -> tuple[int, int, int, int]:
        """``(r0, c0, r1, c1)`` of the pixels tile ``tile`` owns; the owned windows of all
        tiles partition the plane."""
        self.window(tile)  # checks
        i, j = divmod(tile, len(self._cols))
        rows = _cuts(self._rows, self.tile_size, self.shape_hw[0])
        cols = _cuts(self._cols, self.tile_size, self.shape_hw[1])
        return rows[i], cols[j], rows[i + 1], cols[j + 1]

    # -- which tile answers ---------------------------------------------------------------

    def owner(self, row: float, col: float) -> int:
        """The tile that owns the pixel at (``row``, ``col``) (clipped into the plane): of
        the tiles holding it, the one where it lies farthest from a cut edge."""
        h, w = self.shape_hw
        r = min(max(math.floor(row), 0), h - 1)
        c = min(max(math.floor(col), 0), w - 1)
        rows = _cuts(self._rows, self.tile_size, h)
        cols = _cuts(self._cols, self.tile_size, w)
        i = int(np.searchsorted(rows, r, side="right")) - 1
        j = int(np.searchsorted(cols, c, side="right")) - 1
        return i * len(self._cols) + j

    def containing(self, bounds: tuple[float, float, float, float]) -> int | None:
        """The tile that holds the whole region ``bounds`` = ``(r0, c0, r1, c1)`` (plane
        pixels, inclusive of the pixel at the far corner), or None when none does.

        The owner of the region's centre when it holds the region, else the holding tile
        where the region keeps the widest margin to a cut edge.
        """
        r0, c0, r1, c1 = bounds
        centre = self.owner((r0 + r1) / 2, (c0 + c1) / 2)
        best, best_margin = None, -1.0
        h, w = self.shape_hw
        for t in [centre, *range(len(self))]:
            tr0, tc0, tr1, tc1 = self.window(t)
            if not (tr0 <= r0 and r1 < tr1 and tc0 <= c0 and c1 < tc1):
                continue
            if t == centre:
                return t
            # distance to edges that cut the plane (a plane border is no cut)
            margins = [
                r0 - tr0 if tr0 > 0 else math.inf,
                tr1 - 1 - r1 if tr1 < h else math.inf,
                c0 - tc0 if tc0 > 0 else math.inf,
                tc1 - 1 - c1 if tc1 < w else math.inf,
            ]
            margin = min(margins)
            if margin > best_margin:
                best, best_margin = t, margin
        return best

    def crossing(self, bounds: tuple[float, float, float, float]) -> list[int]:
        """Tiles whose owned pixels meet the region ``bounds`` = ``(r0, c0, r1, c1)``
        (inclusive), in tile order."""
        r0, c0, r1, c1 = bounds
        first, last = self.owner(r0, c0), self.owner(r1, c1)
        n_cols = len(self._cols)
        (i0, j0), (i1, j1) = divmod(first, n_cols), divmod(last, n_cols)
        return [i * n_cols + j for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]

    def near(self, row: float, col: float, radius: int = 1) -> list[int]:
        """The owner of (``row``, ``col``) and the tiles up to ``radius`` tile steps
        around it, nearest first (to embed ahead where the user works)."""
        radius = check_int(radius, "radius", minimum=0)
        n_rows, n_cols = self.grid_shape
        i, j = divmod(self.owner(row, col), n_cols)
        around = [
            (max(abs(a - i), abs(b - j)), abs(a - i) + abs(b - j), a * n_cols + b)
            for a in range(max(0, i - radius), min(n_rows, i + radius + 1))
            for b in range(max(0, j - radius), min(n_cols, j + radius + 1))
        ]
        return [t for *_, t in sorted(around)]
