"""The computations behind the backends, as torch modules (also what is exported).

:class:`DecoderGraph` is SAM's prompt encoder plus mask decoder with
segment-anything's ONNX interface: prompts as labelled points (boxes are two corner
points labelled 2 and 3), a mask input with a per-prompt "has mask" flag, and the
outputs of all four mask tokens. It is composed of the model's own modules and
runs their plain computation (:meth:`MaskDecoder.predict_masks`, no image cache): it
equals ``prompt_encoder`` + ``mask_decoder`` of the same model up to float
rounding.

:func:`plain_copy` returns a copy of a model that runs only standard torch
operators (:func:`napari_mobilesam.accel.reference`), as the exporters need.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..accel import reference
from ..model import Sam

__all__ = ["DecoderGraph", "plain_copy"]


def plain_copy(model: Sam) -> Sam:
    """A CPU float32 eval-mode copy of ``model`` that runs only standard operators.

    :func:`napari_mobilesam.accel.reference` of a copy: the model's own modules (folded
    BatchNorm stays folded). ``model`` itself is not changed.

    Parameters
    ----------
    model : Sam

    Returns
    -------
    Sam
    """
    if not isinstance(model, Sam):
        raise TypeError(f"model must be a Sam model, got {type(model).__name__}")
    return reference(copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval())


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder on labelled points; all four mask tokens out.

    Holds references to ``model``'s prompt encoder and mask decoder (no copy) and
    a buffer with the dense positional encoding of the embedding grid.

    Parameters
    ----------
    model : Sam
    """

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        with torch.no_grad():
            pe = self.prompt_encoder.get_dense_pe()
        self.register_buffer("image_pe", pe, persistent=False)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embeddings (B, N, C) of labelled points.

        The same arithmetic as :meth:`PromptEncoder._embed_points` (labels 1 / 0 /
        -1) and :meth:`PromptEncoder._embed_boxes` (corners labelled 2 / 3): the
        Fourier encoding of the pixel centre plus the label's learned embedding;
        padding points get the "not a point" embedding instead.
        """
        pe = self.prompt_encoder
        emb = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, pe.not_a_point_embed.weight, emb)
        for i, point_embed in enumerate(pe.point_embeddings):
            emb = emb + torch.where(labels == i, point_embed.weight, 0.0)
        return emb

    def embed_masks(
        self, mask_input: torch.Tensor | None, has_mask_input: torch.Tensor | None
    ) -> torch.Tensor:
        """Dense prompt embeddings: (B, C, h, w), or (1, C, h, w) without masks.

        Rows whose ``has_mask_input`` is 0 get the learned "no mask" embedding
        (their ``mask_input`` is ignored).
        """
        pe = self.prompt_encoder
        h, w = pe.image_embedding_size
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        if mask_input is None:
            return no_mask.expand(1, -1, h, w)
        dense = pe.mask_downscaling(mask_input)
        return torch.where(has_mask_input.reshape(-1, 1, 1, 1) > 0.5, dense, no_mask)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
        has_mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts against one image embedding.

        Parameters
        ----------
        image_embeddings : (1, C, h, w) float32
        point_coords : (B, N, 2) float32
            (x, y) in the model input frame; see :mod:`napari_mobilesam.runtime.base`.
        point_labels : (B, N) float32
            1, 0, -1 (padding), 2 / 3 (box corners).
        mask_input : (B, 1, 4h, 4w) float32, optional
        has_mask_input : (B,) float32, optional
            1 where ``mask_input`` holds a mask, 0 where it is to be ignored.
            Required with ``mask_input``.

        Returns
        -------
        low_res_masks : (B, 4, 4h, 4w) float32
            Logits of all four mask tokens (0: single-mask output, 1..3: multimask).
        iou_predictions : (B, 4) float32
        """
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_masks(mask_input, has_mask_input)
        return self.mask_decoder.predict_masks(image_embeddings, self.image_pe, sparse, dense)
