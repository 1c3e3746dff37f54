"""The batched and tensor prompt API of :class:`~napari_mobilesam.predictor.Predictor`.

``predict_batch`` (B prompts of numpy arrays in the original image's pixels) and
``predict_torch`` (tensors already in the model's input frame, segment-anything's
``SamPredictor.predict_torch``), both one decoder pass for the whole batch. They are
methods of ``Predictor`` (this class is its base); the single-prompt API and the
image live in :mod:`napari_mobilesam.predictor`.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine import Prompts
from .validation import check_boxes, check_mask_input, check_points

__all__ = ["BatchPrediction"]


class BatchPrediction:
    """``predict_batch`` and ``predict_torch``, over the predictor's current image
    (``_current``), prompt conversion (``_prompts``) and decoding (``_predict``)."""

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for B prompts in one decoder pass.

        Parameters
        ----------
        point_coords : (B, N, 2) array, optional
            (x, y) pixels of the original image; N points per prompt.
        point_labels : (B, N) array, optional
        boxes : (B, 4) array, optional
            XYXY in original pixels, one box per prompt.
        mask_input : (B, 1, 256, 256) array, optional
        multimask_output, return_logits : bool
            As in :meth:`predict`.

        Returns
        -------
        masks : (B, C, H, W) bool
        scores : (B, C) float32
        low_res_logits : (B, C, 256, 256) float32
            B = 0 prompts (e.g. ``boxes`` of shape (0, 4)) give empty arrays of these
            shapes without running the decoder.
        """
        image = self._current()
        coords, labels = check_points(point_coords, point_labels, batched=True)
        boxes_ = check_boxes(boxes, batched=True)
        masks_in = check_mask_input(
            mask_input, self.model.prompt_encoder.mask_input_size, batched=True
        )
        sizes = {
            name: a.shape[0]
            for name, a in (("point_coords", coords), ("boxes", boxes_), ("mask_input", masks_in))
            if a is not None
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {sizes}")
        prompts = None  # an empty batch: no decoder pass
        if 0 not in sizes.values():
            prompts = self._prompts(image, coords, labels, boxes_, masks_in)
        masks, scores, low_res = self._predict(image, prompts, multimask_output, return_logits)
        return masks.cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction on tensors already in the *input* frame.

        Parameters
        ----------
        point_coords : (B, N, 2) float tensor or None
            (x, y) in the resized-image frame (see ``transform.apply_coords_torch``).
        point_labels : (B, N) tensor or None
        boxes : (B, 4) float tensor or None
        mask_input : (B, 1, 256, 256) float tensor or None
        multimask_output, return_logits : bool

        Returns
        -------
        masks : (B, C, H, W) bool (or float logits) at the original size
        iou_predictions : (B, C)
        low_res_logits : (B, C, 256, 256)
        """
        image = self._current()
        prompts = Prompts(point_coords, point_labels, boxes, mask_input)
        return self._predict(image, prompts, multimask_output, return_logits)
