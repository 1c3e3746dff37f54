"""Moving and dividing cells: the object side of a synthetic time series.

Each cell has a velocity that follows a damped random walk (``v <- 0.8 v + noise``);
cells closer than their radii push each other apart, and cells bounce off the image
border. At a few frames a cell divides (the largest one wholly in view): it ends, and
two daughters with half its area each (semi-axes / sqrt 2 in the plane), placed on
either side of its centre along its long axis and moving apart, start new tracks whose
parent is the mother's track.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ._layout import Cell

__all__ = ["Track", "simulate"]


@dataclass
class Track:
    """A cell followed through time.

    Attributes
    ----------
    id : int
        Track id (the cell's label in every frame it appears in).
    parent : int
        Track id of the mother cell (0 = none).
    cells : dict
        Frame index -> :class:`Cell`.
    """

    id: int
    parent: int = 0
    cells: dict[int, Cell] = field(default_factory=dict)


def _repel(cells: list[Cell]) -> list[np.ndarray]:
    """Displacements that push overlapping cells apart (in y, x)."""
    pushes = [np.zeros(2) for _ in cells]
    for i in range(len(cells)):
        ci = np.asarray(cells[i].center[-2:])
        for j in range(i + 1, len(cells)):
            cj = np.asarray(cells[j].center[-2:])
            gap = ci - cj
            dist = float(np.hypot(*gap))
            reach = 0.9 * (cells[i].radius + cells[j].radius)
            if dist < reach:
                unit = gap / dist if dist > 1e-6 else np.array([1.0, 0.0])
                push = 0.5 * (reach - dist) * unit
                pushes[i] += push
                pushes[j] -= push
    return pushes


def simulate(
    rng: np.random.Generator,
    cells: list[Cell],
    shape: tuple[int, ...],
    n_frames: int,
    *,
    speed: float,
    divisions: int,
    min_radius: float,
) -> list[Track]:
    """Tracks of ``cells`` over ``n_frames`` frames of ``shape`` ((Y, X) or (Z, Y, X)).

    ``divisions`` cells divide (fewer when no cell is large enough, i.e. its daughters'
    radius would fall below ``min_radius``, and wholly in view), at frames spread over
    the middle of the series.
    """
    tracks = [Track(id=i + 1) for i in range(len(cells))]
    alive = _relax({t.id: c for t, c in zip(tracks, cells, strict=True)}, shape)
    velocity = {tid: rng.normal(0, speed, 2) for tid in alive}
    division_frames: list[int] = []
    if divisions > 0 and n_frames >= 4:
        lo, hi = max(1, n_frames // 5), max(2, n_frames - 2)
        division_frames = sorted(rng.choice(np.arange(lo, hi), size=divisions, replace=True))
    by_id = {t.id: t for t in tracks}
    born: dict[int, int] = {}  # track id -> frame of birth (daughters)
    for frame in range(n_frames):
        if frame > 0:
            alive = _step(rng, alive, velocity, shape, speed)
        for _ in range(division_frames.count(frame)):
            # a daughter divides again only after a few frames of its own
            ready = {t: c for t, c in alive.items() if frame - born.get(t, -10) > 3}
            mother = _pick_mother(ready, min_radius, shape)
            if mother is None:
                continue
            mother_cell = alive.pop(mother)
            for daughter in _divide(rng, mother_cell, shape):
                track = Track(id=len(by_id) + 1, parent=mother)
                by_id[track.id] = track
                tracks.append(track)
                alive[track.id] = daughter
                born[track.id] = frame
                away = np.subtract(daughter.center[-2:], mother_cell.center[-2:])
                norm = float(np.hypot(*away)) or 1.0
                velocity[track.id] = away / norm * max(speed, 0.5)
        for tid, cell in alive.items():
            by_id[tid].cells[frame] = cell
    return tracks


def _relax(alive: dict[int, Cell], shape: tuple[int, ...], rounds: int = 20) -> dict[int, Cell]:
    """Push overlapping cells apart before the first frame, so that frame 0 -> 1 shows
    motion, not the resolution of the placement's overlaps."""
    ids = list(alive)
    cells = [alive[i] for i in ids]
    for _ in range(rounds):
        pushes = _repel(cells)
        if not any(np.any(p) for p in pushes):
            break
        cells = [
            replace(
                c,
                center=(
                    *c.center[:-2],
                    float(np.clip(c.center[-2] + p[0], 0, shape[-2] - 1)),
                    float(np.clip(c.center[-1] + p[1], 0, shape[-1] - 1)),
                ),
            )
            for c, p in zip(cells, pushes, strict=True)
        ]
    return dict(zip(ids, cells, strict=True))


def _pick_mother(alive: dict[int, Cell], min_radius: float, shape: tuple[int, ...]) -> int | None:
    """The largest cell that can divide: its daughters at least ``min_radius`` and its
    whole (y, x) extent in view, so that the division can be seen (a mother cut by the
    frame's border divides into daughters that barely overlap its visible part)."""
    big = [
        (c.radius, tid)
        for tid, c in alive.items()
        if c.radius / math.sqrt(2) >= min_radius and _in_view(c, shape)
    ]
    return max(big)[1] if big else None


def _in_view(cell: Cell, shape: tuple[int, ...]) -> bool:
    """Whether ``cell``'s (y, x) extent (its long semi-axis around its centre) lies in
    the frame."""
    reach = max(cell.axes[:2])
    yx, size = cell.center[-2:], shape[-2:]
    return all(reach <= c <= n - 1 - reach for c, n in zip(yx, size, strict=True))


def _divide(rng: np.random.Generator, cell: Cell, shape: tuple[int, ...]) -> list[Cell]:
    axes = (cell.axes[0] / math.sqrt(2), cell.axes[1] / math.sqrt(2), *cell.axes[2:])
    # along the long axis (angle measured from y)
    dy, dx = math.cos(cell.angle), math.sin(cell.angle)
    step = 0.6 * cell.axes[0]
    out = []
    for sign in (1, -1):
        center = list(cell.center)
        center[-2] = float(np.clip(center[-2] + sign * step * dy, 0, shape[-2] - 1))
        center[-1] = float(np.clip(center[-1] + sign * step * dx, 0, shape[-1] - 1))
        out.append(
            replace(
                cell,
                center=tuple(center),
                axes=axes,
                angle=float(cell.angle + rng.normal(0, 0.3)),
                brightness=float(cell.brightness * rng.lognormal(0, 0.1)),
            )
        )
    return out


def _step(
    rng: np.random.Generator,
    alive: dict[int, Cell],
    velocity: dict[int, np.ndarray],
    shape: tuple[int, ...],
    speed: float,
) -> dict[int, Cell]:
    ids = list(alive)
    cells = [alive[i] for i in ids]
    pushes = _repel(cells)
    out = {}
    for tid, cell, push in zip(ids, cells, pushes, strict=True):
        v = 0.8 * velocity[tid] + rng.normal(0, 0.6 * speed, 2)
        yx = np.asarray(cell.center[-2:]) + v + push
        margin = 0.5 * cell.radius
        for k, n in enumerate(shape[-2:]):
            if yx[k] < margin or yx[k] > n - 1 - margin:
                v[k] = -v[k]
                yx[k] = float(np.clip(yx[k], margin, n - 1 - margin))
        velocity[tid] = v
        out[tid] = replace(
            cell,
            center=(*cell.center[:-2], float(yx[0]), float(yx[1])),
            angle=float(cell.angle + rng.normal(0, 0.05)),
        )
    return out
