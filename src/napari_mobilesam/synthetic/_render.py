"""Image formation of the synthetic cells: what a widefield fluorescence camera records.

The noiseless object is ``sum_i b_i * profile_i * (1 + t_i * texture) * rim`` over the
cells (a cytoplasmic stain: brightest in the middle, dimmer towards the boundary and
dimmest along it, so touching cells are separated by a darker line), plus a faint
textured background. It is multiplied by an uneven illumination field (a gradient and a
vignette), blurred by a Gaussian point spread function, turned into photons, drawn
from a Poisson distribution (shot noise), and recorded with a camera gain, offset and
Gaussian read noise, then clipped to the dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

from ._layout import Cell

__all__ = ["Appearance", "render"]

_DTYPES = ("uint8", "uint16")


@dataclass(frozen=True)
class Appearance:
    """How the cells look on the camera.

    Parameters
    ----------
    dtype : {"uint16", "uint8"}
        Stored pixel type.
    photons : float, optional
        Expected photons at the centre of a cell of brightness 1. Default: 400 for
        uint16, 150 for uint8. Lower values give dim, noisy cells.
    gain : float, optional
        Counts per photon. Default: 4 for uint16 (a 12-bit-like range), 1 for uint8.
    offset : float, optional
        Camera offset in counts. Default: 100 for uint16, 8 for uint8.
    read_noise : float
        Standard deviation of the camera's read noise, counts.
    background : float
        Background fluorescence relative to a cell of brightness 1.
    illumination : float
        Amplitude of the uneven illumination: the field ranges over about
        ``1 +- illumination``.
    psf_sigma : float
        Gaussian blur in (y, x), pixels.
    psf_sigma_z : float
        Gaussian blur along z for stacks, planes.
    rim : float
        How much dimmer a cell is along its boundary (0 = not at all).
    texture_scale : float
        Correlation length of the cells' texture, pixels.
    """

    dtype: str = "uint16"
    photons: float | None = None
    gain: float | None = None
    offset: float | None = None
    read_noise: float = 2.0
    background: float = 0.06
    illumination: float = 0.3
    psf_sigma: float = 1.2
    psf_sigma_z: float = 1.5
    rim: float = 0.45
    texture_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        for name in ("photons", "gain", "offset"):
            value = getattr(self, name)
            if value is None:
                continue
            low_ok = value >= 0 if name == "offset" else value > 0
            if not (isinstance(value, int | float) and math.isfinite(value) and low_ok):
                rel = ">= 0" if name == "offset" else "> 0"
                raise ValueError(f"{name} must be a number {rel}, got {value!r}")
        for name in (
            "read_noise",
            "background",
            "illumination",
            "psf_sigma",
            "psf_sigma_z",
            "rim",
            "texture_scale",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.rim > 1 or self.illumination >= 1:
            raise ValueError(
                f"rim must be <= 1 and illumination < 1, got {self.rim!r} and {self.illumination!r}"
            )

    def camera(self) -> tuple[float, float, float, int]:
        """(photons, gain, offset, max count) with the dtype's defaults filled in."""
        wide = self.dtype == "uint16"
        photons = self.photons if self.photons is not None else (400.0 if wide else 150.0)
        gain = self.gain if self.gain is not None else (4.0 if wide else 1.0)
        offset = self.offset if self.offset is not None else (100.0 if wide else 8.0)
        return photons, gain, offset, 65535 if wide else 255


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-correlated noise of ``shape`` (float32)."""
    field = rng.standard_normal(shape).astype(np.float32)
    if sigma > 0:
        field = ndimage.gaussian_filter(field, sigma)
    std = float(field.std())
    return field / std if std > 0 else field


def illumination_field(
    rng: np.random.Generator, shape: tuple[int, int], amplitude: float
) -> np.ndarray:
    """A smooth (Y, X) field ``1 + amplitude * f`` with ``f`` in about [-1, 1].

    Half a linear gradient in a random direction, half a vignette around a random
    centre, as a misaligned lamp and the objective's falloff give.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / max(h - 1, 1) - 0.5, xx / max(w - 1, 1) - 0.5
    theta = rng.uniform(0, 2 * math.pi)
    gradient = 2 * (yy * math.sin(theta) + xx * math.cos(theta))
    cy, cx = rng.uniform(-0.25, 0.25, size=2)
    vignette = 1 - 2.5 * ((yy - cy) ** 2 + (xx - cx) ** 2)
    f = 0.5 * gradient + 0.5 * vignette
    f = f - f.mean()
    f = f / max(float(np.abs(f).max()), 1e-6)
    return (1 + amplitude * f).astype(np.float32)


def render(
    labels: np.ndarray,
    dist: np.ndarray,
    cells: dict[int, Cell],
    appearance: Appearance,
    rng: np.random.Generator,
    illumination: np.ndarray | None = None,
) -> np.ndarray:
    """The camera image of painted cells.

    Parameters
    ----------
    labels : (Y, X) or (Z, Y, X) uint32
        From :func:`~napari_mobilesam.synthetic._layout.paint`.
    dist : float32 array like ``labels``
        Each pixel's normalised distance to its cell.
    cells : dict
        Label id -> :class:`Cell` (brightness and texture are used).
    appearance : Appearance
    rng : numpy Generator
    illumination : (Y, X) float32, optional
        A fixed illumination field (a time series keeps one lamp); default: a new one.

    Returns
    -------
    array like ``labels`` of ``appearance.dtype``
    """
    shape = labels.shape
    n = int(labels.max()) + 1
    brightness = np.zeros(n, np.float32)
    texture = np.zeros(n, np.float32)
    for i, cell in cells.items():
        if i < n:
            brightness[i], texture[i] = cell.brightness, cell.texture
    inside = labels > 0
    d = np.where(inside, dist, 1.0).astype(np.float32)
    profile = 0.75 + 0.25 * (1 - np.clip(d, 0, 1))
    tex = _smooth_noise(rng, shape, appearance.texture_scale)
    obj = brightness[labels] * profile * np.clip(1 + texture[labels] * tex, 0.2, None)
    if appearance.rim > 0:
        edge = find_boundaries(labels, mode="inner")
        to_edge = ndimage.distance_transform_edt(~edge) if edge.any() else np.full(shape, np.inf)
        obj *= 1 - appearance.rim * np.exp(-0.5 * (to_edge / 1.2) ** 2).astype(np.float32)
    obj = np.where(inside, obj, 0.0).astype(np.float32)
    bg = appearance.background * (1 + 0.3 * _smooth_noise(rng, shape, 8.0))
    signal = obj + np.clip(bg, 0, None)
    if illumination is None:
        illumination = illumination_field(rng, shape[-2:], appearance.illumination)
    signal *= illumination
    sigma: tuple[float, ...] = (appearance.psf_sigma, appearance.psf_sigma)
    if len(shape) == 3:
        sigma = (appearance.psf_sigma_z, *sigma)
    if max(sigma) > 0:
        signal = ndimage.gaussian_filter(signal, sigma)
    photons, gain, offset, top = appearance.camera()
    counts = offset + gain * rng.poisson(np.clip(signal, 0, None) * photons)
    counts = counts + rng.normal(0.0, appearance.read_noise, shape)
    return np.clip(np.rint(counts), 0, top).astype(appearance.dtype)
