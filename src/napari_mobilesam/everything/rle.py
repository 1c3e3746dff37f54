"""Run-length encodings of binary masks (uncompressed and COCO-compressed).

Conventions, identical to segment-anything (``utils/amg.py``) and COCO:

- an *uncompressed RLE* is ``{"size": [h, w], "counts": [int, ...]}``;
- ``counts`` are the lengths of the runs of the mask flattened in
  **column-major (Fortran) order** (down the first column, then the second, ...);
- runs alternate background / foreground and always start with a background run,
  which is 0 when the first pixel (row 0, column 0) is foreground;
- a *COCO RLE* is ``{"size": [h, w], "counts": str}``, the same counts written
  as pycocotools' compressed string (``mask.frPyObjects`` then ``.decode()``).

Everything here is vectorised over pixels; the only Python loops run over masks
(building the output dicts) and over runs (the COCO string codec).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "area_from_rle",
    "coco_to_rle",
    "masks_to_coco",
    "masks_to_rle",
    "rle_to_coco",
    "rle_to_mask",
]


def _as_numpy_masks(masks: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, H, W) bool numpy array from a numpy array or a tensor on any device."""
    if isinstance(masks, torch.Tensor):
        if masks.dtype != torch.bool:
            raise TypeError(f"masks must be a bool tensor, got dtype {masks.dtype}")
        masks = masks.detach().cpu().numpy()
    elif isinstance(masks, np.ndarray):
        if masks.dtype != bool:
            raise TypeError(f"masks must be a bool array, got dtype {masks.dtype}")
    else:
        raise TypeError(f"masks must be a numpy array or a torch tensor, got {type(masks)}")
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got shape {masks.shape}")
    return masks


def masks_to_rle(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """Uncompressed RLEs of a batch of masks.

    Gives exactly what segment-anything's ``mask_to_rle_pytorch`` gives, but finds
    the run boundaries of all masks at once.

    Parameters
    ----------
    masks : (N, H, W) bool numpy array or torch tensor
        Tensors may live on any device. On a GPU the run boundaries are found
        there and only their positions are copied to the host (one copy, no
        per-mask synchronisation); CPU tensors are read as numpy arrays.

    Returns
    -------
    list of N dicts ``{"size": [H, W], "counts": [int, ...]}``
        Run lengths over each mask in column-major order, starting with a
        (possibly empty) background run. An all-False mask gives ``[H * W]``,
        an all-True mask ``[0, H * W]``; a mask with no pixels gives ``[0]``.
    """
    if isinstance(masks, torch.Tensor) and masks.device.type != "cpu":
        n, h, w, mask_idx, pix_idx, first = _changes_on_device(masks)
    else:
        arr = _as_numpy_masks(masks)
        n, h, w = arr.shape
        if h * w == 0:
            return [{"size": [h, w], "counts": [0]} for _ in range(n)]
        # (N, H*W) in column-major order within each mask
        flat = arr.transpose(0, 2, 1).reshape(n, h * w)
        mask_idx, pix_idx = np.nonzero(flat[:, 1:] != flat[:, :-1])
        first = flat[:, 0]
    return _runs(n, h, w, mask_idx, pix_idx, first)


def _changes_on_device(masks: torch.Tensor):
    """Where each mask changes value, found on its device; only the positions are copied.

    Returns ``(n, h, w, mask_idx, pix_idx, first)``: numpy arrays of the mask and
    column-major pixel index before every change, and each mask's first pixel.
    """
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be a bool tensor, got dtype {masks.dtype}")
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got shape {tuple(masks.shape)}")
    n, h, w = masks.shape
    flat = masks.detach().transpose(1, 2).reshape(n, h * w)
    if h * w == 0:
        empty = np.zeros(0, dtype=np.int64)
        return n, h, w, empty, empty, np.zeros(n, dtype=bool)
    changes = torch.nonzero(flat[:, 1:] != flat[:, :-1])  # (K, 2): one copy of K positions
    changes, first = changes.cpu().numpy(), flat[:, 0].cpu().numpy()
    return n, h, w, changes[:, 0], changes[:, 1], first


def _runs(n, h, w, mask_idx, pix_idx, first) -> list[dict[str, Any]]:
    hw = h * w
    if hw == 0:
        return [{"size": [h, w], "counts": [0]} for _ in range(n)]
    # A run starts at pix_idx + 1 (in 1..hw-1). Shifted by mask_idx * hw these cut
    # positions lie strictly between the mask boundaries k * hw, so the merged and
    # sorted cuts give every run of every mask as consecutive differences.
    cuts = mask_idx.astype(np.int64) * hw + pix_idx.astype(np.int64) + 1
    bounds = np.arange(n + 1, dtype=np.int64) * hw
    cuts = np.insert(cuts, np.searchsorted(cuts, bounds), bounds)
    runs = np.diff(cuts).tolist()
    # mask k owns runs[offsets[k]:offsets[k + 1]] (its changes + 1 runs)
    offsets = np.searchsorted(cuts, bounds).tolist()
    first_fg = first.tolist()
    out = []
    for k in range(n):
        counts = [0] if first_fg[k] else []
        counts.extend(runs[offsets[k] : offsets[k + 1]])
        out.append({"size": [h, w], "counts": counts})
    return out


def _check_rle(rle: dict[str, Any]) -> tuple[int, int, np.ndarray]:
    """(h, w, counts as int64 array) of an uncompressed RLE, validated."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"rle must be a dict with 'size' [h, w] and 'counts' [int, ...], got {rle!r}"
        ) from err
    if counts.dtype.kind not in "iu" and counts.size:
        raise ValueError(f"rle 'counts' must be integers, got {rle['counts']!r}")
    counts = counts.astype(np.int64).reshape(-1)
    if h < 0 or w < 0:
        raise ValueError(f"rle 'size' must be non-negative, got {rle['size']!r}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"rle 'counts' must be non-negative, got {rle['counts']!r}")
    if int(counts.sum()) != h * w:
        raise ValueError(
            f"rle 'counts' sum to {int(counts.sum())} but 'size' {[h, w]} has {h * w} pixels"
        )
    return h, w, counts


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE (the inverse of :func:`masks_to_rle`).

    Parameters
    ----------
    rle : dict
        ``{"size": [h, w], "counts": [int, ...]}``, column-major runs starting
        with background.

    Returns
    -------
    (h, w) bool array, C-contiguous.

    Raises
    ------
    ValueError
        If the counts are negative or do not sum to ``h * w``.
    """
    h, w, counts = _check_rle(rle)
    values = (np.arange(counts.size) % 2).astype(bool)
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixel count of an uncompressed RLE (sum of the odd-position counts)."""
    return int(sum(rle["counts"][1::2]))


def rle_to_coco(rle: dict[str, Any]) -> dict[str, Any]:
    """Compress an uncompressed RLE into a COCO RLE.

    The string is byte-for-byte what ``pycocotools.mask.frPyObjects(rle, h, w)``
    followed by ``counts.decode("utf-8")`` gives (segment-anything's
    ``coco_encode_rle``): each count, from the 4th on replaced by its difference
    to the count two before, is written as a signed little-endian base-32 number,
    5 bits per character, bit 0x20 meaning "more follows", plus 48.

    Parameters
    ----------
    rle : dict
        ``{"size": [h, w], "counts": [int, ...]}``.

    Returns
    -------
    dict ``{"size": [h, w], "counts": str}``.
    """
    h, w, counts = _check_rle(rle)
    cnts = counts.tolist()
    chars = []
    for i, c in enumerate(cnts):
        x = c - cnts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift, as on the C long
            more = x != -1 if ch & 0x10 else x != 0
            if more:
                ch |= 0x20
            chars.append(ch + 48)
    return {"size": [h, w], "counts": bytes(chars).decode("ascii")}


def coco_to_rle(coco: dict[str, Any]) -> dict[str, Any]:
    """Decode a COCO RLE back to an uncompressed RLE (inverse of :func:`rle_to_coco`).

    Parameters
    ----------
    coco : dict
        ``{"size": [h, w], "counts": str or bytes}``, as pycocotools writes it.

    Returns
    -------
    dict ``{"size": [h, w], "counts": [int, ...]}``, column-major runs.

    Raises
    ------
    ValueError
        If the string has characters outside the codec's range, ends in the
        middle of a number, or decodes to negative counts or to counts that do
        not sum to ``h * w``.
    """
    try:
        h, w = (int(v) for v in coco["size"])
        s = coco["counts"]
        if isinstance(s, str):
            data = s.encode("ascii")
        elif isinstance(s, bytes | bytearray):
            data = bytes(s)
        else:
            raise TypeError(f"counts is a {type(s)}")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"coco must be a dict with 'size' [h, w] and 'counts' str, got {coco!r}"
        ) from err
    counts: list[int] = []
    x = k = 0
    more = False
    for byte in data:
        c = byte - 48
        if not 0 <= c < 64:
            raise ValueError(f"coco 'counts' has a character outside '0'..'o': {chr(byte)!r}")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        more = bool(c & 0x20)
        if not more:
            if c & 0x10:
                x |= -1 << (5 * k)
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
            x = k = 0
    if more:
        raise ValueError(f"coco 'counts' ends in the middle of a number: {s!r}")
    out = {"size": [h, w], "counts": counts}
    _check_rle(out)
    return out


def masks_to_coco(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """COCO RLEs of a batch of (N, H, W) bool masks (see :func:`masks_to_rle`)."""
    return [rle_to_coco(rle) for rle in masks_to_rle(masks)]
