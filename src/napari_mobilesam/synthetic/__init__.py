"""Synthetic fluorescence microscopy with known answers: images and instance labels.

Seeded generators of microscopy-like images whose ground truth is exact:

- :func:`cells_2d`: a (Y, X) image of round and elongated cells, touching but never
  overlapping, with texture, uneven illumination, blur, shot and read noise;
- :func:`cells_3d`: a (Z, Y, X) stack of cells with a z extent (ellipsoids);
- :func:`cell_time_series`: (T, Y, X) or (T, Z, Y, X) frames of moving cells, some
  of which divide, with track ids and the lineage;
- :func:`write_dataset`: image + label TIFF pairs on disk, in the layouts training
  tools read (``img.tif`` + ``img_labels.tif``, or ``images/`` + ``labels/``).

The same seed always gives the same arrays. Geometry is described in
``synthetic/_layout.py`` and image formation in ``synthetic/_render.py``;
:class:`Appearance` holds the camera settings (dtype, photons, noise, blur).

Examples
--------
>>> from napari_mobilesam import synthetic
>>> s = synthetic.cells_2d(seed=0)
>>> s.image.shape, s.image.dtype, s.labels.dtype
((512, 512), dtype('uint16'), dtype('uint32'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._layout import Cell, paint, place_cells
from ._render import Appearance, illumination_field, render
from ._timeseries import simulate
from ._write import write_dataset, write_sample

__all__ = [
    "Appearance",
    "Sample",
    "cell_time_series",
    "cells_2d",
    "cells_3d",
    "write_dataset",
    "write_sample",
]


@dataclass(frozen=True)
class Sample:
    """A synthetic image and its ground truth.

    Attributes
    ----------
    image : uint8 or uint16 array
        Axes as in ``axes``.
    labels : uint32 array of the same shape
        Instance labels, 0 = background. For a time series the label of a cell is
        its track id in every frame.
    axes : str
        ``"YX"``, ``"ZYX"``, ``"TYX"`` or ``"TZYX"``.
    parents : dict
        Time series only: track id -> parent track id (0 = none) for every track.
    """

    image: np.ndarray
    labels: np.ndarray
    axes: str
    parents: dict[int, int] = field(default_factory=dict)

    @property
    def divisions(self) -> dict[int, tuple[int, ...]]:
        """Parent track id -> its daughters' track ids."""
        out: dict[int, list[int]] = {}
        for child, parent in sorted(self.parents.items()):
            if parent:
                out.setdefault(parent, []).append(child)
        return {p: tuple(c) for p, c in out.items()}


def _shape(value, ndim: int, name: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of {ndim} ints, got {value!r}") from None
    if len(shape) != ndim or min(shape) < 16 or shape != tuple(value):
        raise ValueError(f"{name} must be {ndim} ints >= 16, got {value!r}")
    return shape


def _range(value, name: str, low: float = 1.0) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi):
        raise ValueError(
            f"{name} must be a (min, max) pair with {low:g} <= min <= max, got {value!r}"
        )
    return lo, hi


def _fraction(value, name: str) -> float:
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _appearance(appearance: Appearance | None, dtype: str | None) -> Appearance:
    if appearance is None:
        return Appearance(dtype="uint16" if dtype is None else str(np.dtype(dtype)))
    if not isinstance(appearance, Appearance):
        raise TypeError(f"appearance must be an Appearance, got {type(appearance).__name__}")
    if dtype is not None and str(np.dtype(dtype)) != appearance.dtype:
        raise ValueError(f"dtype {dtype!r} contradicts appearance.dtype {appearance.dtype!r}")
    return appearance


def _count(n_cells) -> int | None:
    if n_cells is not None and (not isinstance(n_cells, int | np.integer) or n_cells < 0):
        raise ValueError(f"n_cells must be None or an int >= 0, got {n_cells!r}")
    return None if n_cells is None else int(n_cells)


def cells_2d(
    shape: tuple[int, int] = (512, 512),
    *,
    seed: int | None = None,
    n_cells: int | None = None,
    coverage: float = 0.3,
    radius: tuple[float, float] = (10.0, 32.0),
    elongated: float = 0.25,
    clustered: float = 0.5,
    dtype: str | None = None,
    appearance: Appearance | None = None,
) -> Sample:
    """A 2D fluorescence image of cells and its instance labels.

    Parameters
    ----------
    shape : (Y, X)
        Image size in pixels.
    seed : int, optional
        Seed of the random generator (same seed, same sample).
    n_cells : int, optional
        Number of cells; default: as many as cover ``coverage`` of the image.
    coverage : float
        Fraction of the image covered by cells when ``n_cells`` is None.
    radius : (min, max)
        Range of the cells' radius (of the circle of equal area), pixels; drawn
        log-uniformly. Any range within 2-200 px works; 4-60 px is typical.
    elongated : float
        Fraction of elongated cells (aspect ratio 1.8-3.2; the others 1.0-1.35).
    clustered : float
        Probability that a cell is placed beside another one (touching clusters).
    dtype : {"uint16", "uint8"}, optional
        Shortcut for ``Appearance(dtype=...)`` (default uint16).
    appearance : Appearance, optional
        Camera settings (photons, noise, blur, illumination).

    Returns
    -------
    Sample
        ``image`` (Y, X) uint8/uint16, ``labels`` (Y, X) uint32 with ids 1..N.
    """
    shape = _shape(shape, 2, "shape")
    look = _appearance(appearance, dtype)
    rng = np.random.default_rng(seed)
    cells = place_cells(
        rng,
        shape,
        n_cells=_count(n_cells),
        coverage=_fraction(coverage, "coverage"),
        radius=_range(radius, "radius"),
        elongated=_fraction(elongated, "elongated"),
        clustered=_fraction(clustered, "clustered"),
    )
    labels, dist, by_label = _painted(cells, shape)
    image = render(labels, dist, by_label, look, rng)
    return Sample(image=image, labels=labels, axes="YX")


def cells_3d(
    shape: tuple[int, int, int] = (24, 256, 256),
    *,
    seed: int | None = None,
    n_cells: int | None = None,
    coverage: float = 0.2,
    radius: tuple[float, float] = (10.0, 28.0),
    z_radius: tuple[float, float] = (3.0, 7.0),
    elongated: float = 0.25,
    clustered: float = 0.4,
    dtype: str | None = None,
    appearance: Appearance | None = None,
) -> Sample:
    """A (Z, Y, X) stack of cells with a z extent, and its 3D instance labels.

    Cells are ellipsoids: an in-plane ellipse as in :func:`cells_2d` with a z
    semi-axis drawn uniformly from ``z_radius`` (planes). Each cell has one id in
    all the planes it spans. ``coverage`` is the fraction of the volume covered.
    Other parameters as in :func:`cells_2d`; the blur along z is
    ``appearance.psf_sigma_z``.

    Returns
    -------
    Sample
        ``image`` and ``labels`` of shape (Z, Y, X), ``axes`` ``"ZYX"``.
    """
    shape = tuple(shape)
    if len(shape) != 3 or min(shape) < 1 or min(shape[1:]) < 16:
        raise ValueError(f"shape must be (Z, Y, X) with Z >= 1 and Y, X >= 16, got {shape!r}")
    look = _appearance(appearance, dtype)
    rng = np.random.default_rng(seed)
    cells = place_cells(
        rng,
        shape,
        n_cells=_count(n_cells),
        coverage=_fraction(coverage, "coverage"),
        radius=_range(radius, "radius"),
        elongated=_fraction(elongated, "elongated"),
        clustered=_fraction(clustered, "clustered"),
        z_radius=_range(z_radius, "z_radius", low=0.5),
    )
    labels, dist, by_label = _painted(cells, shape)
    image = render(labels, dist, by_label, look, rng)
    return Sample(image=image, labels=labels, axes="ZYX")


def cell_time_series(
    n_frames: int = 20,
    shape: tuple[int, ...] = (256, 256),
    *,
    seed: int | None = None,
    n_cells: int | None = None,
    coverage: float = 0.15,
    radius: tuple[float, float] = (10.0, 22.0),
    z_radius: tuple[float, float] = (3.0, 6.0),
    elongated: float = 0.2,
    speed: float = 1.5,
    divisions: int = 3,
    dtype: str | None = None,
    appearance: Appearance | None = None,
) -> Sample:
    """Frames of moving cells, a few of which divide, with track ids.

    Parameters
    ----------
    n_frames : int
        Number of time points (>= 1).
    shape : (Y, X) or (Z, Y, X)
        Size of one frame: 2D frames give a (T, Y, X) series, 3D ones (T, Z, Y, X).
    speed : float
        Typical displacement per frame, pixels.
    divisions : int
        Number of cell divisions (fewer when no cell is large enough to divide, or
        none of those lies wholly in view: a division cut by the border is not seen).
    z_radius : (min, max)
        z semi-axes for 3D frames.
    Other parameters as in :func:`cells_2d`.

    Returns
    -------
    Sample
        ``labels`` hold each cell's track id in every frame it appears in; daughters
        of a division get new track ids and ``parents`` maps them to the mother's.
        ``axes`` is ``"TYX"`` or ``"TZYX"``.
    """
    if not isinstance(n_frames, int | np.integer) or n_frames < 1:
        raise ValueError(f"n_frames must be an int >= 1, got {n_frames!r}")
    if not isinstance(divisions, int | np.integer) or divisions < 0:
        raise ValueError(f"divisions must be an int >= 0, got {divisions!r}")
    if not (isinstance(speed, int | float) and math.isfinite(speed) and speed >= 0):
        raise ValueError(f"speed must be a number >= 0, got {speed!r}")
    shape = tuple(shape)
    if len(shape) not in (2, 3) or min(shape[-2:]) < 16 or min(shape) < 1:
        raise ValueError(f"shape must be (Y, X) or (Z, Y, X) with Y, X >= 16, got {shape!r}")
    look = _appearance(appearance, dtype)
    rng = np.random.default_rng(seed)
    rad = _range(radius, "radius")
    cells = place_cells(
        rng,
        shape,
        n_cells=_count(n_cells),
        coverage=_fraction(coverage, "coverage"),
        radius=rad,
        elongated=_fraction(elongated, "elongated"),
        clustered=0.2,
        z_radius=_range(z_radius, "z_radius", low=0.5) if len(shape) == 3 else None,
        max_overlap=0.05,
    )
    tracks = simulate(
        rng,
        cells,
        shape,
        int(n_frames),
        speed=speed,
        divisions=int(divisions),
        min_radius=0.7 * rad[0],
    )
    lamp = illumination_field(rng, shape[-2:], look.illumination)
    images, labels = [], []
    for t in range(n_frames):
        present = [tr for tr in tracks if t in tr.cells]
        lab, dist = paint([tr.cells[t] for tr in present], shape, ids=[tr.id for tr in present])
        images.append(render(lab, dist, {tr.id: tr.cells[t] for tr in present}, look, rng, lamp))
        labels.append(lab)
    parents = {tr.id: tr.parent for tr in tracks if any(tr.cells)}
    return Sample(
        image=np.stack(images),
        labels=np.stack(labels),
        axes="TYX" if len(shape) == 2 else "TZYX",
        parents=parents,
    )


def _painted(cells: list[Cell], shape: tuple[int, ...]):
    """Labels 1..N (cells lost in painting dropped, painting order kept), the
    distance map, and the cell of each label."""
    labels, dist = paint(cells, shape)
    old = np.unique(labels)
    old = old[old > 0]
    lut = np.zeros(len(cells) + 1, np.uint32)
    lut[old] = np.arange(1, len(old) + 1, dtype=np.uint32)
    by_label = {new: cells[int(o) - 1] for new, o in enumerate(old, start=1)}
    return lut[labels], dist, by_label
