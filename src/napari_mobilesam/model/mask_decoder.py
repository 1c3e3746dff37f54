"""SAM's mask decoder: image embedding + prompt embeddings -> mask logits and IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks and their IoU per prompt.

    Parameters
    ----------
    transformer_dim : int
        Channel width of the image embedding and the tokens (256).
    transformer : nn.Module
        A :class:`~napari_mobilesam.model.transformer.TwoWayTransformer`.
    num_multimask_outputs : int
        Masks returned when ``multimask_output`` is set (3); one more token gives
        the single-mask output.
    activation : nn.Module class
        Activation of the upscaling path (GELU).
    iou_head_depth, iou_head_hidden_dim : int
        Layers and width of the IoU prediction MLP (3, 256).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Parameters
        ----------
        image_embeddings : (1 or B, C, h, w)
            One embedding shared by all prompts (broadcast, not copied), or one per
            prompt.
        image_pe : (1, C, h, w)
        sparse_prompt_embeddings : (B, N, C)
        dense_prompt_embeddings : (1 or B, C, h, w)
        multimask_output : bool
            Return the ``num_multimask_outputs`` masks instead of the single one.

        Returns
        -------
        masks : (B, M, 4h, 4w) low-resolution logits, M = 3 or 1
        iou_pred : (B, M)
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks (B, T, 4h, 4w) and IoU (B, T)."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1
        )
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] not in (1, b):
            raise ValueError(
                f"image embeddings have batch {src.shape[0]} but there are {b} prompts"
            )
        c, h, w = src.shape[1:]
        hs, keys = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        _, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, cu, hu * wu)).view(b, -1, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
