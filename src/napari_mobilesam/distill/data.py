"""Training images: discovery, loading, preprocessing, and SA-1B annotations.

SA-1B layout: a folder of ``sa_<id>.jpg`` images, each with an optional
``sa_<id>.json`` beside it holding ``{"image": {...}, "annotations": [{"segmentation":
{"size": [H, W], "counts": <COCO RLE>}, "bbox": [x, y, w, h], "point_coords": [[x, y]],
...}]}``. Any folder of images works (``.jpg``, ``.jpeg``, ``.png``, ``.tif``,
``.tiff``, searched recursively, hidden files and folders skipped).

Images become model inputs exactly as the predictor makes them: RGB ``uint8``
(grayscale / 16-bit / float through
:func:`napari_mobilesam.normalize.to_rgb_uint8`), resize-longest-side with PIL
bilinear, normalisation with the model's pixel mean / std, zero padding bottom-right
to a square.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from ..model.sam import PIXEL_MEAN, PIXEL_STD
from ..normalize import to_rgb_uint8
from ..transforms import resize_longest_side

__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "annotation_path",
    "find_images",
    "load_image",
    "preprocess",
    "read_annotations",
    "rle_decode",
    "rle_encode",
]

#: File suffixes taken as images (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


class DataError(ValueError):
    """An input that cannot be used; the message names the file or folder."""


def find_images(folder: str | PathLike) -> list[Path]:
    """All images under ``folder`` (recursive), sorted by relative path.

    Raises
    ------
    DataError
        ``folder`` is not a directory or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist or is not a folder")
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    if not found:
        kinds = ", ".join(f"*{s}" for s in IMAGE_SUFFIXES)
        raise DataError(f"no images ({kinds}) found in {str(root)!r}")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_image(path: str | PathLike) -> np.ndarray:
    """Read an image file as RGB ``uint8`` (H, W, 3).

    Raises
    ------
    DataError
        The file cannot be read or is not a 2-D (optionally multichannel) image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode in ("RGB", "L"):
                    arr = np.asarray(im.convert("RGB"))
                else:
                    arr = np.asarray(im)
    except Exception as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA
        arr = arr[..., :3]
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return np.ascontiguousarray(arr)
    try:
        channel_axis = 2 if arr.ndim == 3 else None
        return to_rgb_uint8(arr, channel_axis=channel_axis)
    except (ValueError, TypeError) as exc:
        raise DataError(f"image {str(path)!r} cannot be used: {exc}") from None


def preprocess(
    image: np.ndarray,
    img_size: int = 1024,
    pixel_mean=PIXEL_MEAN,
    pixel_std=PIXEL_STD,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Model input of an RGB ``uint8`` image.

    Returns
    -------
    x : torch.Tensor
        (3, img_size, img_size) float32: resized (longest side = ``img_size``),
        normalised, zero-padded bottom / right.
    input_size : tuple of int
        (h, w) of the resized image inside the padded square.
    """
    resized = resize_longest_side(image, img_size)
    h, w = resized.shape[:2]
    x = torch.tensor(resized).permute(2, 0, 1).float()
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    out = torch.zeros(3, img_size, img_size)
    out[:, :h, :w] = x
    return out, (h, w)


def annotation_path(image_path: str | PathLike) -> Path:
    """The SA-1B annotation file beside an image (``x.jpg`` -> ``x.json``)."""
    return Path(image_path).with_suffix(".json")


def read_annotations(image_path: str | PathLike) -> list[dict]:
    """The annotations of an image, ``[]`` when it has no ``.json`` beside it.

    Each returned dict has ``segmentation`` (the RLE dict, decode with
    :func:`rle_decode`), ``bbox`` [x, y, w, h] (computed from the mask if absent) and
    ``point_coords`` (list of [x, y], possibly empty), in original image pixels.

    Raises
    ------
    DataError
        Unreadable JSON or annotations without an RLE ``segmentation``.
    """
    path = annotation_path(image_path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read annotations {str(path)!r}: {exc}") from None
    anns = data.get("annotations", data if isinstance(data, list) else None)
    if not isinstance(anns, list):
        raise DataError(f"annotations {str(path)!r}: no 'annotations' list")
    out = []
    for i, ann in enumerate(anns):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise DataError(
                f"annotations {str(path)!r}: entry {i} has no RLE segmentation "
                "({'size': [H, W], 'counts': ...})"
            )
        bbox = ann.get("bbox")
        if bbox is None:
            bbox = _bbox(rle_decode(seg))
        out.append(
            {
                "segmentation": seg,
                "bbox": [float(v) for v in bbox],
                "point_coords": [list(map(float, p)) for p in ann.get("point_coords") or []],
            }
        )
    return out


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]  # fmt: skip


def _decode_counts_string(counts: str) -> list[int]:
    """COCO's compressed run lengths (LEB128-like, 5 bits per char, offset 48, delta)."""
    runs: list[int] = []
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("truncated RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rle_decode(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (compressed string or list of counts) to a bool (H, W) mask.

    Runs are column-major (Fortran order) and start with a background run.

    Raises
    ------
    ValueError
        Malformed counts, negative runs, or runs that do not add up to H * W.
    """
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = _decode_counts_string(counts) if isinstance(counts, str | bytes) else list(counts)
    if any(r < 0 for r in runs):
        raise ValueError("RLE has negative run lengths")
    if sum(runs) != h * w:
        raise ValueError(f"RLE runs add up to {sum(runs)}, not H * W = {h * w}")
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for i, r in enumerate(runs):
        if i % 2:
            flat[pos : pos + r] = True
        pos += r
    return flat.reshape(w, h).T


def rle_encode(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a 2-D mask: ``{"size": [H, W], "counts": str}``.

    The inverse of :func:`rle_decode` (the string format of SA-1B and pycocotools).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D mask, got shape {mask.shape}")
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    out = bytearray()
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(c + 48)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": out.decode("ascii")}
