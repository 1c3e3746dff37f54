"""SAM's prompt encoder: points, boxes and a low-resolution mask to embeddings.

Coordinates are (x, y) pixels of the *model input frame* (the image after
resize-longest-side to ``input_image_size``), not of the original image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) positions.

    ``positional_encoding_gaussian_matrix`` (2, F) maps a point in [0, 1]^2 (after
    ``2p - 1``) to 2F features ``[sin(2 pi p G), cos(2 pi p G)]``.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        g = self.positional_encoding_gaussian_matrix.to(coords.dtype)
        c = 2 * coords - 1
        # (..., 2) @ (2, F) written out: a BLAS call costs more than the arithmetic
        coords = c[..., 0:1] * g[0] + c[..., 1:2] * g[1]
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (H, W) grid -> (2F, H, W)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Encode (..., 2) pixel coordinates (x, y) in an image of (H, W)."""
        size = coords.new_tensor([image_size[1], image_size[0]])
        return self._encode((coords / size).to(torch.float32))


class PromptEncoder(nn.Module):
    """Embeds point, box and mask prompts for the mask decoder.

    Parameters
    ----------
    embed_dim : int
        Width of the prompt embeddings (256).
    image_embedding_size : (int, int)
        (H, W) of the image embedding (64, 64).
    input_image_size : (int, int)
        (H, W) of the padded model input (1024, 1024).
    mask_in_chans : int
        Hidden channels of the mask downscaling convolutions (16).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, (1, embed_dim, H, W)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0
        )
        return emb + corner_embed

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Parameters
        ----------
        points : (coords (B, N, 2) float (x, y), labels (B, N) int) or None
            Labels: 1 foreground, 0 background, -1 padding.
        boxes : (B, 4) float XYXY or None
        masks : (B, 1, 256, 256) float logits or None

        Returns
        -------
        sparse : (B, N', embed_dim)
            Point and box-corner embeddings.
        dense : (B, embed_dim, H, W) or (1, embed_dim, H, W)
            Mask embedding; without a mask it is the learned "no mask" vector,
            returned once with batch 1 (it broadcasts, no per-prompt copy).
        """
        bs = self._batch_size(points, boxes, masks)
        ref = self.no_mask_embed.weight
        sparse = [ref.new_empty((bs, 0, self.embed_dim))]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        return sparse_embeddings, dense
