"""Inputs and checks shared by the hostile-input tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.draw import disk

from mobilesam_batch.folder import LOCK_NAME, WORK_DIR

FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _cells(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full(shape, 20.0)
    for _ in range(4):
        r, c = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        img[disk((r, c), rng.integers(4, 8), shape=shape)] = rng.integers(90, 220)
    return np.clip(img + rng.normal(0, 3, shape), 0, 255).astype(np.uint8)


def _image(path: Path, seed: int = 0, shape=(48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_cells(shape, seed)).save(path)
    return path


def _stack(path: Path, planes: int = 3, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.stack([_cells((40, 40), seed + i) for i in range(planes)])
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"})
    return path


def _visible(outdir: Path) -> dict[str, bytes]:
    """The outputs in ``outdir`` (hidden work files left out), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir()) if not p.name.startswith(".")}


def _record(outdir: Path, stem: str) -> dict:
    return json.loads((outdir / f"{stem}_labels.json").read_text())


def _assert_sets_complete(outdir: Path) -> None:
    """Every label image has its provenance record, and nothing of a run is left."""
    for labels in outdir.glob("*_labels.tif"):
        assert labels.with_suffix(".json").exists(), f"{labels.name} without its record"
    assert not (outdir / LOCK_NAME).exists() and not (outdir / WORK_DIR).exists()
