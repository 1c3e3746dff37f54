"""What an embedding store belongs to: the model, the image and its normalisation.

Three JSON-able records go into a store's attributes and are compared when the store is
reused: :func:`model_identity` (name, checkpoint sha256, a fingerprint of the weights),
:func:`image_fingerprint` (layout, dtype and a sampled content hash of the planes) and
:func:`normalisation` (how a plane becomes the model's RGB input).
:func:`differences` lists, in words, what differs between two such records.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..interactive.cache import model_fingerprint
from ..interactive.planes import ImagePlanes
from ..validation import check_contrast_limits

__all__ = [
    "DEFAULT_PERCENTILES",
    "SAMPLE_ROWS",
    "differences",
    "image_fingerprint",
    "model_differences",
    "model_identity",
    "normalisation",
]

#: Rows read per sampled plane by :func:`image_fingerprint`.
SAMPLE_ROWS = 16
#: The percentiles that PromptSession (and the widgets) use when no contrast limits are set.
DEFAULT_PERCENTILES = (0.5, 99.5)


def model_identity(model) -> dict:
    """The model's identity, as stored in an embedding store.

    Parameters
    ----------
    model : Sam
        A loaded model; :func:`~napari_mobilesam.build.load_model` records
        ``model_name`` and ``checkpoint_path`` on it (other models have neither).

    Returns
    -------
    dict
        ``name`` (str or None), ``checkpoint_sha256`` (64 hex digits of the checkpoint
        file, or None), ``weights_fingerprint``
        (:func:`~napari_mobilesam.interactive.model_fingerprint`, which differs between
        an optimised and a reference model of the same weights), ``img_size`` (the
        model's input side, pixels) and ``embedding_shape`` ([C, h, w]).
    """
    from ..weights import file_sha256

    path = getattr(model, "checkpoint_path", None)
    pe = model.prompt_encoder
    return {
        "name": getattr(model, "model_name", None),
        "checkpoint_sha256": None if path is None else file_sha256(path),
        "weights_fingerprint": model_fingerprint(model),
        "img_size": int(model.img_size),
        "embedding_shape": [int(pe.embed_dim), *(int(s) for s in pe.image_embedding_size)],
    }


def model_differences(stored: dict, current: dict) -> list[str]:
    """What makes ``current`` another model than ``stored`` (both :func:`model_identity`).

    Names are compared when both are known; the checkpoint sha256 when both are known,
    else the weights fingerprint; the input size and embedding shape always.
    """
    out = []
    if stored.get("name") and current.get("name") and stored["name"] != current["name"]:
        out.append(f"model name {stored['name']!r} != {current['name']!r}")
    a, b = stored.get("checkpoint_sha256"), current.get("checkpoint_sha256")
    if a and b:
        if a != b:
            out.append(f"checkpoint sha256 {a[:12]}... != {b[:12]}...")
    elif stored.get("weights_fingerprint") != current.get("weights_fingerprint"):
        out.append(
            f"weights fingerprint {stored.get('weights_fingerprint')} != "
            f"{current.get('weights_fingerprint')}"
        )
    out += differences(stored, current, ("img_size", "embedding_shape"))
    return out


def _sample_positions(planes: ImagePlanes) -> list[tuple[int, ...]]:
    """The sampled planes: the first, the middle and the last in C order (distinct)."""
    n = planes.n_planes
    positions = sorted({0, n // 2, n - 1})
    if not planes.plane_shape:
        return [()]
    return [tuple(int(i) for i in np.unravel_index(p, planes.plane_shape)) for p in positions]


def image_fingerprint(planes: ImagePlanes) -> dict:
    """A cheap identity of an image or stack: its layout, dtype and sampled pixels.

    The content hash is a sha256 over the first, middle and last plane (C order of the
    plane indices), each as :meth:`ImagePlanes.plane` reads it ((H, W) or (H, W, C)
    channels-last): for each, ``repr`` of its plane index, then the bytes of
    :data:`SAMPLE_ROWS` rows evenly spaced from the first to the last
    (``round(linspace(0, H - 1, min(H, 16)))``, every column and channel), in
    little-endian byte order. Three planes are read, whatever the stack's size.

    Parameters
    ----------
    planes : ImagePlanes

    Returns
    -------
    dict
        ``plane_shape``, ``shape_hw``, ``channels`` (per plane, 0 for grayscale),
        ``dtype`` (little-endian numpy string, e.g. ``"<u2"``), ``sample_sha256``,
        ``sample_planes`` and ``sample_rows`` (what was hashed).
    """
    h = planes.shape_hw[0]
    rows = np.unique(np.linspace(0, h - 1, min(h, SAMPLE_ROWS)).round().astype(np.int64))
    dtype = np.dtype(planes.image.dtype).newbyteorder("<")
    digest = hashlib.sha256()
    channels = 0
    positions = _sample_positions(planes)
    for idx in positions:
        plane = planes.plane(idx)
        channels = plane.shape[2] if plane.ndim == 3 else 0
        sample = np.ascontiguousarray(plane[rows], dtype=dtype)
        digest.update(repr(idx).encode())
        digest.update(sample.tobytes())
    return {
        "plane_shape": list(planes.plane_shape),
        "shape_hw": list(planes.shape_hw),
        "channels": int(channels),
        "dtype": dtype.str,
        "sample_sha256": digest.hexdigest(),
        "sample_planes": [list(p) for p in positions],
        "sample_rows": rows.tolist(),
    }


def normalisation(
    planes: ImagePlanes, percentiles=DEFAULT_PERCENTILES, max_upscale: float | None = None
) -> dict:
    """How each plane becomes the model's RGB input, in a form that compares by effect.

    Parameters
    ----------
    planes : ImagePlanes
        Its channels and contrast limits.
    percentiles : (float, float)
        Used as contrast limits when none are set (:func:`~napari_mobilesam.normalize.
        to_rgb_uint8`); PromptSession always uses :data:`DEFAULT_PERCENTILES`.
    max_upscale : float, optional
        The predictor's upscale limit for small planes (``Predictor(max_upscale=)``).

    Returns
    -------
    dict
        ``channels``: the channels of a plane shown as R, G, B (None: grayscale,
        replicated); ``contrast_limits``: one [lo, hi] per picked channel, or None
        (percentiles of each plane); ``percentiles``: [lo, hi]; ``max_upscale`` only
        when set (stores without it were made without a limit).
    """
    channels = planes.channels
    if channels is None and planes.rgb:
        channels = (0, 1, 2)
    n_picked = 1 if channels is None else len(channels)
    pairs = check_contrast_limits(planes.contrast_limits, n_picked)
    out = {
        "channels": None if channels is None else [int(c) for c in channels],
        "contrast_limits": None if pairs is None else [[float(lo), float(hi)] for lo, hi in pairs],
        "percentiles": [float(p) for p in percentiles],
    }
    if max_upscale is not None:
        out["max_upscale"] = float(max_upscale)
    return out


def differences(stored: dict, current: dict, fields) -> list[str]:
    """``"<field> <stored> != <current>"`` for each of ``fields`` that differs."""
    return [
        f"{name} {stored.get(name)!r} != {current.get(name)!r}"
        for name in fields
        if stored.get(name) != current.get(name)
    ]
