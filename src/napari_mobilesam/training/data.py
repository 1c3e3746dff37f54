"""Annotated images for ``mobilesam-train``: discovery, loading, checks, the split.

Three layouts are read (the ones microscopy and SAM users have):

- **suffix**: ``img.tif`` + ``img_labels.tif`` side by side (any of ``.tif``,
  ``.tiff``, ``.png``, ``.jpg``, ``.jpeg`` for the image; ``.tif``, ``.tiff``,
  ``.png`` for the labels), searched recursively;
- **folders**: ``images/img.tif`` + ``labels/img.tif`` (same stem, any suffix);
- **SA-1B**: ``sa_1.jpg`` + ``sa_1.json`` (COCO RLE masks). Overlapping masks are
  painted largest first into one label image, so a small object lying on a large one
  keeps all its pixels and the large one loses those.

A label image holds instance ids (0 = background) in an integer dtype; it must have
the image's (Y, X) shape (an RGB image is (Y, X, 3)). A stack (Z/T, Y, X) of images
with a stack of labels of the same shape gives one training example per plane; planes
without objects are skipped, but a file without any object is an error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from ..distill.data import DataError, read_annotations, rle_decode
from ..normalize import to_rgb_uint8

__all__ = ["DataError", "Example", "Pair", "find_pairs", "load_examples", "split_pairs"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
LABEL_TAG = "_labels"


@dataclass(frozen=True)
class Pair:
    """An image file and its annotation file (a label image or an SA-1B json)."""

    image: Path
    labels: Path

    @property
    def name(self) -> str:
        return self.image.stem


@dataclass
class Example:
    """One training plane.

    Attributes
    ----------
    name : str
        ``<file stem>`` or ``<file stem>[<plane>]`` for a plane of a stack.
    image : (H, W) or (H, W, 3) array
        As read (any dtype); converted to RGB uint8 when used.
    labels : (H, W) uint32
        Instance ids, 0 = background.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray

    def rgb(self, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
        """The image as RGB uint8 (H, W, 3), as the predictor makes it."""
        return to_rgb_uint8(self.image, percentiles=percentiles)


def _read(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB") if im.mode not in ("L", "I", "I;16") else im)
    except Exception as exc:  # any reader error becomes a named DataError
        raise DataError(f"cannot read {str(path)!r}: {exc}") from None


def _partner(image: Path) -> Path | None:
    for suffix in LABEL_SUFFIXES:
        for s in (suffix, suffix.upper()):
            cand = image.with_name(image.stem + LABEL_TAG + s)
            if cand.is_file():
                return cand
    json_path = image.with_suffix(".json")
    return json_path if json_path.is_file() else None


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_pairs(folder: str | PathLike) -> list[Pair]:
    """All image/annotation pairs under ``folder``, sorted by image path.

    Raises
    ------
    DataError
        ``folder`` is missing, or holds no pair, or (folders layout) an image in
        ``images/`` has no label image in ``labels/``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"training folder {str(root)!r} does not exist or is not a folder")
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return _folder_pairs(root)
    pairs = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _visible(path, root):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.stem.endswith(LABEL_TAG):
            continue
        partner = _partner(path)
        if partner is not None:
            pairs.append(Pair(path, partner))
    if not pairs:
        raise DataError(
            f"no annotated images in {str(root)!r}: expected img.tif + img_labels.tif, "
            "images/ + labels/ folders, or SA-1B img.jpg + img.json"
        )
    return pairs


def _folder_pairs(root: Path) -> list[Pair]:
    labels = {}
    for p in sorted((root / "labels").rglob("*")):
        if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES and _visible(p, root):
            rel = p.relative_to(root / "labels").with_suffix("")
            labels[rel.as_posix().removesuffix(LABEL_TAG)] = p
    pairs = []
    for p in sorted((root / "images").rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES or not _visible(p, root):
            continue
        key = p.relative_to(root / "images").with_suffix("").as_posix()
        if key not in labels:
            raise DataError(
                f"image {str(p)!r} has no label image in {str(root / 'labels')!r} "
                f"(expected {key}.tif)"
            )
        pairs.append(Pair(p, labels[key]))
    if not pairs:
        raise DataError(f"no images in {str(root / 'images')!r}")
    return pairs


def _labels_from_json(pair: Pair, shape: tuple[int, int]) -> np.ndarray:
    anns = read_annotations(pair.image)
    masks = [rle_decode(a["segmentation"]) for a in anns]
    for i, m in enumerate(masks):
        if m.shape != shape:
            raise DataError(
                f"annotation {i} of {str(pair.labels)!r} is {m.shape[0]}x{m.shape[1]}, "
                f"the image {str(pair.image)!r} is {shape[0]}x{shape[1]}"
            )
    labels = np.zeros(shape, np.uint32)
    for i in np.argsort([-int(m.sum()) for m in masks], kind="stable"):
        labels[masks[i]] = i + 1
    return labels


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels).all()
        if not finite or not np.array_equal(labels, np.round(labels)):
            raise DataError(
                f"label image {str(path)!r} is {labels.dtype} with non-integer values: "
                "instance labels must be integers (0 = background)"
            )
    elif labels.dtype.kind not in "iub":
        raise DataError(f"label image {str(path)!r} has dtype {labels.dtype}, not an integer type")
    if labels.size and labels.min() < 0:
        raise DataError(f"label image {str(path)!r} has negative ids (min {labels.min()})")
    if labels.size and labels.max() > np.iinfo(np.uint32).max:
        raise DataError(f"label image {str(path)!r} has ids above 2**32 - 1")
    return labels.astype(np.uint32)


def load_examples(pair: Pair) -> list[Example]:
    """The training planes of one pair.

    Raises
    ------
    DataError
        Unreadable files, image and labels of different shapes, labels that are not
        integer, or no object at all; the message names the file.
    """
    image = _read(pair.image)
    is_rgb = image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 4
    plane_shape = image.shape[:2] if is_rgb else image.shape[-2:]
    if pair.labels.suffix.lower() == ".json":
        labels = _labels_from_json(pair, tuple(plane_shape))
    else:
        labels = _check_labels(_read(pair.labels), pair.labels)
    if is_rgb:
        image = image[..., :3]
        expected = image.shape[:2]
    else:
        expected = image.shape
    if labels.shape != tuple(expected):
        raise DataError(
            f"image {str(pair.image)!r} has shape {image.shape} but its labels "
            f"{str(pair.labels)!r} have shape {labels.shape}"
        )
    if image.ndim - is_rgb not in (2, 3):
        raise DataError(
            f"image {str(pair.image)!r} has shape {image.shape}: expected (Y, X), (Y, X, 3) "
            "or a stack (P, Y, X)"
        )
    if not labels.any():
        raise DataError(f"label image {str(pair.labels)!r} holds no object (all zero)")
    if labels.ndim == 2:
        return [Example(pair.name, image, labels)]
    return [
        Example(f"{pair.name}[{i}]", image[i], labels[i])
        for i in range(labels.shape[0])
        if labels[i].any()
    ]


def split_pairs(
    pairs: list[Pair], val_fraction: float, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Split into (train, held-out) by a seeded hash of each image's name.

    The split of a file does not depend on the other files, so adding images to a
    folder never moves an old one between the two sets. At least one pair goes to
    each side when there are two or more pairs and ``0 < val_fraction < 1``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if val_fraction == 0 or len(pairs) < 2:
        return list(pairs), []

    def u(p: Pair) -> float:
        h = hashlib.sha256(f"{seed}:{p.image.name}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    scored = sorted(pairs, key=u)
    held = [p for p in scored if u(p) < val_fraction] or scored[:1]
    if len(held) == len(pairs):
        held = held[:-1]
    keep = set(held)
    return [p for p in pairs if p not in keep], [p for p in pairs if p in keep]
