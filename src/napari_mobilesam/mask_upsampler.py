"""``MaskUpsampler``: one image's low-res logits -> its masks, as ``Predictor.predict``
makes them (what :meth:`~napari_mobilesam.predictor.Predictor.predict_low_res` returns)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MaskUpsampler"]


@dataclass(frozen=True)
class MaskUpsampler:
    """Low-res logits of one image -> its bool masks, as :meth:`Predictor.predict` makes
    them (:meth:`Predictor.predict_low_res`).

    Attributes
    ----------
    frames : Frames
        The engine's frames (:meth:`~napari_mobilesam.engine.Frames.masks`).
    input_size : (int, int)
        (h, w) of the image resized to the model's input.
    original_size : (int, int)
        (H, W) of the image.
    """

    frames: object
    input_size: tuple[int, int]
    original_size: tuple[int, int]

    @property
    def scale(self) -> float:
        """Input-frame pixels per low-res logit (4 for SAM: 1024 / 256)."""
        return self.frames.model.img_size / self.frames.model.prompt_encoder.mask_input_size[0]

    def __call__(self, low_res: np.ndarray) -> np.ndarray:
        """(K, h', w') float32 low-res logits -> (K, H, W) bool masks."""
        dev = self.frames.model.device
        logits = torch.as_tensor(np.asarray(low_res, dtype=np.float32), device=dev)[None]
        with torch.no_grad():
            masks = self.frames.masks(logits, self.input_size, self.original_size)
        return masks[0].cpu().numpy()
