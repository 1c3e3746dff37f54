"""Small image files of every input format, for the tests of mobilesam_batch.inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from PIL import Image

RNG = np.random.default_rng(0)


def u8(*shape):
    """Random uint8 pixels of ``shape``."""
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def touch_png(path: Path) -> Path:
    """An 8 x 8 PNG at ``path``."""
    Image.fromarray(u8(8, 8)).save(path)
    return path


def write_zarr_array(path: Path, data: np.ndarray) -> Path:
    """``data`` as a zarr array at ``path``."""
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype)
    arr[:] = data
    return path


def write_ome_zarr(path: Path, data: np.ndarray, names: list[str]) -> Path:
    """``data`` as a one-level OME-Zarr (v0.4) image with axes ``names``."""
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=data.shape)
    arr[:] = data
    axes = [{"name": n, "type": "channel" if n == "c" else "space"} for n in names]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1] * 4}]}
            ],
        }
    ]
    return path
