"""Where training examples come from: folders of annotated images, or the generator.

A source hands out, for epoch ``e``, a list of zero-argument callables that each
return one :class:`~napari_mobilesam.training.data.Example`, in a seeded order. Loading
is lazy so that an epoch over thousands of files holds one image at a time.

- :class:`FolderSource`: the planes of image/label pairs on disk, shuffled per epoch;
- :class:`SyntheticSource`: images made by :mod:`napari_mobilesam.synthetic` with
  varied sizes, cell radii, shapes, densities, dtypes and brightness, a fresh set
  every epoch (so the model never sees an image twice), each fixed by
  ``(seed, epoch, index)``; :meth:`SyntheticSource.held_out` makes a fixed set from a
  different seed stream for validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .data import Example, Pair, load_examples

__all__ = ["FolderSource", "SyntheticSource", "augment"]

Loader = Callable[[], Example]

#: (side range, smallest-radius range) of :attr:`SyntheticSource.small`'s images.
SMALL_CELLS = ((1024, 1024), (5.0, 12.0))


def _seed(*parts: object) -> int:
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") % 2**63


class FolderSource:
    """The planes of annotated image files (see :func:`load_examples`).

    Parameters
    ----------
    pairs : list of Pair
    seed : int
        Seeds the per-epoch order.
    """

    def __init__(self, pairs: list[Pair], seed: int = 0) -> None:
        self.pairs = list(pairs)
        self.seed = seed
        # planes per file are only known after reading; index them once
        self._index: list[tuple[int, int]] = []
        for i, pair in enumerate(self.pairs):
            n = len(load_examples(pair))
            self._index += [(i, k) for k in range(n)]

    def __len__(self) -> int:
        return len(self._index)

    def _loader(self, i: int, k: int) -> Loader:
        return lambda: load_examples(self.pairs[i])[k]

    def all(self) -> list[Loader]:
        """Every plane, in file order."""
        return [self._loader(i, k) for i, k in self._index]

    def epoch(self, epoch: int) -> list[Loader]:
        """Every plane, shuffled by ``(seed, epoch)``."""
        order = np.random.default_rng(_seed(self.seed, "order", epoch)).permutation(len(self))
        return [self._loader(*self._index[j]) for j in order]


@dataclass(frozen=True)
class SyntheticSource:
    """Fresh synthetic cell images every epoch.

    Parameters
    ----------
    images_per_epoch : int
    seed : int
    size : (int, int)
        Range of the image side, pixels (square images; drawn per image).
    radius : (float, float)
        Range of the smallest cell radius of an image, pixels (drawn per image; its
        largest is 1.5-4 times that, at most 60).
    planes : float
        Fraction of the images that are one plane of a synthetic 3D stack
        (:func:`~napari_mobilesam.synthetic.cells_3d`: cells cut at every height, the
        out-of-focus light of the cells above and below, blur along z), drawn per
        image. 0 (the default) makes every image with ``cells_2d``, as before this
        option existed.
    small : float
        Fraction of the other images that are 1024 px planes of small cells (smallest
        radius 5-12 px, shown at native size by a 1024 px model input: the cells of a
        large plane's tiles), drawn per image. 0 (the default) keeps the images made
        before this option existed.
    """

    images_per_epoch: int
    seed: int = 0
    size: tuple[int, int] = (384, 768)
    radius: tuple[float, float] = (4.0, 16.0)
    planes: float = 0.0
    small: float = 0.0

    def __len__(self) -> int:
        return self.images_per_epoch

    def make(self, seed: int) -> Example:
        """One varied synthetic image (parameters drawn from ``seed``)."""
        from .. import synthetic

        # the plane-or-image draw has a stream of its own: with ``planes`` 0 the
        # images are those this source made before the option existed
        if self.planes > 0 and np.random.default_rng([seed, 1]).random() < self.planes:
            return self._plane(seed)
        size, radius = self.size, self.radius
        if self.small > 0 and np.random.default_rng([seed, 3]).random() < self.small:
            size, radius = SMALL_CELLS
        rng = np.random.default_rng(seed)
        side = int(rng.integers(size[0], size[1] + 1))
        r_lo = float(rng.uniform(*radius))
        r_hi = float(min(60.0, r_lo * rng.uniform(1.5, 4.0)))
        look = _look(rng)
        s = synthetic.cells_2d(
            (side, side),
            seed=int(rng.integers(2**63)),
            coverage=float(rng.uniform(0.1, 0.5)),
            radius=(r_lo, r_hi),
            elongated=float(rng.uniform(0.0, 0.6)),
            clustered=float(rng.uniform(0.0, 0.9)),
            appearance=look,
        )
        return Example(f"synthetic-{seed}", s.image, s.labels)

    def _plane(self, seed: int) -> Example:
        """One plane of a varied (Z, Y, X) stack: 12-24 planes of 256-512 px, cells'
        z semi-axes 2-8 planes, blur along z 0.8-2.5 planes; the plane drawn
        uniformly (cells cut near their tips included; a plane without cells gives
        way to the nearest one with some)."""
        from dataclasses import replace

        from .. import synthetic

        rng = np.random.default_rng([seed, 2])
        side = int(rng.integers(256, 513))
        depth = int(rng.integers(12, 25))
        r_lo = float(rng.uniform(max(self.radius[0], 6.0), max(self.radius[1], 8.0)))
        r_hi = float(min(60.0, r_lo * rng.uniform(1.5, 3.0)))
        look = replace(_look(rng), psf_sigma_z=float(rng.uniform(0.8, 2.5)))
        s = synthetic.cells_3d(
            (depth, side, side),
            seed=int(rng.integers(2**63)),
            coverage=float(rng.uniform(0.1, 0.3)),
            radius=(r_lo, r_hi),
            z_radius=(2.0, float(rng.uniform(4.0, 8.0))),
            elongated=float(rng.uniform(0.0, 0.5)),
            clustered=float(rng.uniform(0.0, 0.7)),
            appearance=look,
        )
        z = int(rng.integers(depth))
        filled = np.flatnonzero(s.labels.reshape(depth, -1).any(1))
        if len(filled) and z not in filled:  # a plane above or below every cell
            z = int(filled[np.argmin(np.abs(filled - z))])
        return Example(f"synthetic-plane-{seed}", s.image[z], s.labels[z])

    def epoch(self, epoch: int) -> list[Loader]:
        seeds = [_seed(self.seed, "train", epoch, i) for i in range(self.images_per_epoch)]
        return [lambda s=s: self.make(s) for s in seeds]

    def held_out(self, n: int) -> list[Loader]:
        """``n`` validation images from a seed stream the epochs never use."""
        return [lambda i=i: self.make(_seed(self.seed, "held-out", i)) for i in range(n)]


def _look(rng: np.random.Generator):
    """A varied :class:`~napari_mobilesam.synthetic.Appearance` (6 draws of ``rng``)."""
    from .. import synthetic

    return synthetic.Appearance(
        dtype=str(rng.choice(["uint8", "uint16"], p=[0.3, 0.7])),
        photons=float(np.exp(rng.uniform(np.log(40), np.log(1500)))),
        illumination=float(rng.uniform(0.0, 0.6)),
        psf_sigma=float(rng.uniform(0.6, 2.0)),
        rim=float(rng.uniform(0.1, 0.7)),
        background=float(rng.uniform(0.0, 0.2)),
    )


def augment(example: Example, rng: np.random.Generator) -> tuple[Example, tuple[float, float]]:
    """A random flip / 90-degree rotation of ``example`` and contrast percentiles.

    Returns
    -------
    (Example, (lo, hi))
        The transformed example and percentiles in [0, 2] x [98, 100] for
        :meth:`Example.rgb`, as users' contrast settings vary.
    """
    k = int(rng.integers(4))
    image, labels = example.image, example.labels
    rgb_axes = (0, 1)
    image = np.rot90(image, k, axes=rgb_axes)
    labels = np.rot90(labels, k)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    lo, hi = float(rng.uniform(0, 2)), float(rng.uniform(98, 100))
    out = Example(example.name, np.ascontiguousarray(image), np.ascontiguousarray(labels))
    return out, (lo, hi)
