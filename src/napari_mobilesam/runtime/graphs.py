"""The computations behind the backends, as torch modules (also what is exported).

:class:`DecoderGraph` is SAM's prompt encoder plus mask decoder with
segment-anything's ONNX interface: prompts as labelled points (boxes are two corner
points labelled 2 and 3), a mask input with a per-prompt "has mask" flag, and the
outputs of all four mask tokens. It is composed of the model's own modules and
runs the plain reference computation (``factorized=False``, no image cache): it
equals ``prompt_encoder`` + ``mask_decoder`` of the same model up to float
rounding.

:func:`plain_copy` returns a copy of a model that runs only standard torch
operators (no oneDNN fused convolution + GELU), as the exporters need.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..model import Sam
from ..model.common import ConvGELU, OneDNNLinear

__all__ = ["DecoderGraph", "plain_copy"]


def plain_copy(model: Sam) -> Sam:
    """A CPU float32 eval-mode copy of ``model`` that runs only standard operators.

    Fused convolution + GELU pairs (:class:`~napari_mobilesam.model.common.ConvGELU`)
    keep their (folded) weights but take the two-step ``gelu(conv(x))`` path instead
    of oneDNN's fused kernel (so the encoder's convolutions are not computed in
    slices either), oneDNN linear layers
    (:class:`~napari_mobilesam.model.common.OneDNNLinear`) take ``F.linear``, window
    attention takes matmul + softmax instead of torch's fused CPU kernel, and
    the decoder's transformer runs unfactorised.
    ``model`` itself is not changed.

    Parameters
    ----------
    model : Sam

    Returns
    -------
    Sam
    """
    if not isinstance(model, Sam):
        raise TypeError(f"model must be a Sam model, got {type(model).__name__}")
    plain = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    for mod in plain.modules():
        if isinstance(mod, ConvGELU | OneDNNLinear):
            mod.use_onednn = False
        if hasattr(mod, "fused_cpu"):
            mod.fused_cpu = False
    plain.mask_decoder.transformer.factorized = False
    return plain


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
        dec = self.mask_decoder
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_masks(mask_input, has_mask_input)
        hs, keys, (h, w) = dec.forward_tokens(
            image_embeddings, self.image_pe, sparse, dense, factorized=False
        )
        iou = dec.iou_prediction_head(hs[:, 0, :])
        # MaskDecoder.masks_from_tokens for all tokens at once (it takes either the
        # first or the last three; running it twice would upscale twice)
        b = hs.shape[0]
        mask_tokens = hs[:, 1 : 1 + dec.num_mask_tokens, :]
        c = keys.shape[-1]
        grid = keys.expand(b, -1, -1).reshape(b, h, w, c).permute(0, 3, 1, 2)
        upscaled = dec.output_upscaling(grid)  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)],
            dim=1,
        )  # (B, 4, C/8)
        _, cu, hu, wu = upscaled.shape
        pixels = upscaled.permute(0, 2, 3, 1).reshape(b, hu * wu, cu)
        masks = (pixels @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b, -1, hu, wu)
        return masks, iou
