"""Synthetic samples on disk as image + label TIFF pairs."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import atomic_path, write_text_atomic
from ..label_stack import labels_dtype, write_labels_tiff

if TYPE_CHECKING:
    from . import Sample

__all__ = ["KINDS", "LAYOUTS", "write_dataset", "write_sample"]

#: What :func:`write_dataset` can make.
KINDS = ("2d", "3d", "timeseries")
#: ``suffix``: ``name.tif`` + ``name_labels.tif`` side by side;
#: ``folders``: ``images/name.tif`` + ``labels/name.tif``.
LAYOUTS = ("suffix", "folders")


def write_sample(sample: Sample, image_path: str | Path, labels_path: str | Path) -> None:
    """Write ``sample``'s image and labels as TIFFs (atomically), with their axes.

    The labels are stored in the smallest of uint8/uint16/uint32 that holds their
    largest id. A time series also gets ``<labels stem>_tracks.csv`` beside the labels
    (``track_id,parent_id,first_frame,last_frame``).
    """
    import tifffile

    image_path, labels_path = Path(image_path), Path(labels_path)
    for p in (image_path, labels_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(image_path) as tmp:
        tifffile.imwrite(
            tmp,
            sample.image,
            metadata={"axes": sample.axes},
            compression="zlib",
            photometric="minisblack",
        )
    shape = sample.labels.shape
    planes = sample.labels.reshape(-1, *shape[-2:])
    write_labels_tiff(
        labels_path,
        iter(planes),
        shape,
        sample.axes,
        labels_dtype(int(sample.labels.max())),
        description={"source": "napari_mobilesam.synthetic"},
    )
    if sample.axes.startswith("T"):
        write_text_atomic(labels_path.with_name(labels_path.stem + "_tracks.csv"), _tracks(sample))


def _tracks(sample: Sample) -> str:
    frames = sample.labels.reshape(sample.labels.shape[0], -1)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["track_id", "parent_id", "first_frame", "last_frame"])
    for tid, parent in sorted(sample.parents.items()):
        present = np.flatnonzero((frames == tid).any(axis=1))
        if present.size:
            w.writerow([tid, parent, int(present[0]), int(present[-1])])
    return out.getvalue()


def write_dataset(
    folder: str | Path,
    n: int,
    *,
    seed: int = 0,
    kind: str = "2d",
    layout: str = "suffix",
    prefix: str = "cells",
    **kwargs,
) -> list[tuple[Path, Path]]:
    """Write ``n`` synthetic samples as image + label TIFF pairs into ``folder``.

    Parameters
    ----------
    folder : path
        Created if missing.
    n : int
        Number of samples (>= 1).
    seed : int
        Sample ``i`` uses the ``i``-th child of ``numpy.random.SeedSequence(seed)``,
        so a dataset is reproducible and its first samples do not change with ``n``.
    kind : {"2d", "3d", "timeseries"}
        :func:`cells_2d`, :func:`cells_3d` or :func:`cell_time_series`.
    layout : {"suffix", "folders"}
        See :data:`LAYOUTS`.
    prefix : str
        File names are ``<prefix>_<i:03d>.tif``.
    **kwargs
        Passed to the generator (``shape``, ``radius``, ``dtype``, ...).

    Returns
    -------
    list of (image path, labels path)
    """
    from . import cell_time_series, cells_2d, cells_3d

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not prefix or any(c in prefix for c in "/\\") or prefix.startswith("."):
        raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
    make = {"2d": cells_2d, "3d": cells_3d, "timeseries": cell_time_series}[kind]
    folder = Path(folder)
    seeds = np.random.SeedSequence(seed).spawn(n)
    width = max(3, len(str(n - 1)))
    out = []
    for i, child in enumerate(seeds):
        sample = make(seed=int(child.generate_state(1)[0]), **kwargs)
        name = f"{prefix}_{i:0{width}d}"
        if layout == "suffix":
            pair = (folder / f"{name}.tif", folder / f"{name}_labels.tif")
        else:
            pair = (folder / "images" / f"{name}.tif", folder / "labels" / f"{name}.tif")
        write_sample(sample, *pair)
        out.append(pair)
    return out
