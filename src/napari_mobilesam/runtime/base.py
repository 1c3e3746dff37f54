"""The interface every encoder/decoder backend implements, and its argument checks.

A backend runs the two networks of a :class:`~napari_mobilesam.model.Sam` on numpy
arrays: the image encoder on one preprocessed image, and the prompt encoder plus
mask decoder on a batch of prompts against one image embedding. Everything before
(resize, normalise, pad: :meth:`Sam.preprocess`) and after (upsampling the low-res
logits, thresholding) stays with the caller, so backends are interchangeable.

Prompt convention (that of segment-anything's ONNX decoder)
-----------------------------------------------------------
All prompts of one batch row are points: ``coords`` (B, N, 2) float32 (x, y) in
the *model input frame* (the image after resize-longest-side, before padding; what
:class:`~napari_mobilesam.predictor.Predictor` gives the prompt encoder), and
``labels`` (B, N) float32:

====== =====================================================================
label  meaning
====== =====================================================================
1      foreground point
0      background point
-1     padding ("not a point"; its coordinates are ignored)
2      top-left corner (x0, y0) of a box
3      bottom-right corner (x1, y1) of a box
====== =====================================================================

A box is two rows labelled 2 and 3, placed after the points. SAM's prompt encoder
appends one padding point when there is no box: callers must do the same (a row
``(0, 0)`` labelled -1 after the points), otherwise the result differs from
:class:`Sam`'s. Rows with fewer prompts than N are filled with padding points.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

__all__ = ["EncoderDecoderBackend"]


class EncoderDecoderBackend(ABC):
    """Runs a SAM image encoder and mask decoder on numpy arrays.

    Attributes
    ----------
    name : str
        ``"torch"`` or ``"onnx"``.
    img_size : int
        Side S of the square model input (1024 for ``vit_t``).
    embed_shape : (int, int, int)
        (C, h, w) of the image embedding ((256, 64, 64) for ``vit_t``).
    """

    name: str
    img_size: int
    embed_shape: tuple[int, int, int]

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """(H, W) of ``mask_input`` and of the low-res logits: 4x the embedding grid."""
        return (4 * self.embed_shape[1], 4 * self.embed_shape[2])

    @abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray:
        """Image embedding of one preprocessed image.

        Parameters
        ----------
        x : np.ndarray
            (1, 3, S, S) float32, normalised and zero-padded
            (:meth:`Sam.preprocess` output).

        Returns
        -------
        np.ndarray
            (1, C, h, w) float32 embedding.
        """

    @abstractmethod
    def decode(
        self,
        embedding: np.ndarray,
        coords: np.ndarray,
        labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Low-res mask logits and predicted IoU of all four mask tokens.

        Parameters
        ----------
        embedding : np.ndarray
            (1, C, h, w) float32 from :meth:`encode`.
        coords : np.ndarray
            (B, N, 2) float32 (x, y) in the model input frame, box corners included
            (see the module docstring).
        labels : np.ndarray
            (B, N) float32: 1 foreground, 0 background, -1 padding, 2 / 3 box
            top-left / bottom-right corner. Without a box, the last point of each
            row must be a padding point, as SAM's prompt encoder appends one.
        mask_input : np.ndarray, optional
            (B, 1, 4h, 4w) float32 low-res logits of a previous prediction.

        Returns
        -------
        low_res : np.ndarray
            (B, 4, 4h, 4w) float32 logits; token 0 is the single-mask output
            (``multimask_output=False``), tokens 1..3 the multimask outputs.
        iou : np.ndarray
            (B, 4) float32 predicted IoU of the same tokens.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, embed_shape={self.embed_shape})"

    # -- argument checks shared by the implementations ---------------------------------

    def _check_image(self, x: np.ndarray) -> np.ndarray:
        x = _as_float32(x, "x")
        s = self.img_size
        if x.shape != (1, 3, s, s):
            raise ValueError(f"x must have shape (1, 3, {s}, {s}), got {x.shape}")
        return x

    def _check_prompts(
        self,
        embedding: np.ndarray,
        coords: np.ndarray,
        labels: np.ndarray,
        mask_input: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        embedding = _as_float32(embedding, "embedding")
        if embedding.shape != (1, *self.embed_shape):
            raise ValueError(
                f"embedding must have shape (1, {', '.join(map(str, self.embed_shape))}), "
                f"got {embedding.shape}"
            )
        coords = _as_float32(coords, "coords")
        if coords.ndim != 3 or coords.shape[2] != 2 or coords.shape[0] < 1 or coords.shape[1] < 1:
            raise ValueError(f"coords must have shape (B, N, 2) with B, N >= 1, got {coords.shape}")
        labels = _as_float32(labels, "labels")
        if labels.shape != coords.shape[:2]:
            raise ValueError(
                f"labels must have shape (B, N) = {coords.shape[:2]} like coords, "
                f"got {labels.shape}"
            )
        bad = ~np.isin(labels, (-1.0, 0.0, 1.0, 2.0, 3.0))
        if bad.any():
            raise ValueError(
                f"labels must be -1, 0, 1, 2 or 3, got {np.unique(labels[bad]).tolist()}"
            )
        if mask_input is not None:
            mask_input = _as_float32(mask_input, "mask_input")
            want = (coords.shape[0], 1, *self.mask_input_size)
            if mask_input.shape != want:
                raise ValueError(f"mask_input must have shape {want}, got {mask_input.shape}")
        return embedding, coords, labels, mask_input


def _as_float32(value: object, name: str) -> np.ndarray:
    """C-contiguous float32 array, or TypeError naming the argument."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(value).__name__}")
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise TypeError(f"{name} must be a numeric array, got dtype {value.dtype}")
    return np.ascontiguousarray(value, dtype=np.float32)
